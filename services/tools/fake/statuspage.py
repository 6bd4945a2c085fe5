"""The fake provider's status page: an Atlassian Statuspage ``GET /api/v2/summary.json``
with an incident an operator or a test scripts.

Components: one per model the fake knows (``FaultConfig.models``) plus ``API``, all
``operational`` at first. An incident is opened by naming it with the components it
touches (each given a status); resolving it sets them back to ``operational``.
``FaultConfig.status_incidents`` schedules incidents like the scripted outages:
``(start_s, duration_s, component, status)`` relative to when the config took effect.

``serve`` says how the page answers, to rehearse a page that cannot be read:
``ok``, ``error`` (a 503), ``garbage`` (200 with a body that is not JSON), ``stall``
(200, then never the end of the body) or ``huge`` (a valid page of several MiB).

Admin API (JSON), served by ``server``:

``GET /admin/statuspage``
    The page's state: components, the open incident, ``serve``.
``POST /admin/statuspage``
    ``{"components": {name: status}?, "incident": str?, "impact": str?, "serve": str?}``:
    set components' statuses; open an incident with that name (on the components just
    set, or on every non-operational one), or resolve the open one with ``""``; change
    how the page answers.
``DELETE /admin/statuspage``
    Back to every component operational, no incident, served normally.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

import msgspec

ComponentStatus: TypeAlias = Literal[
    "operational", "degraded_performance", "partial_outage", "major_outage", "under_maintenance"
]
COMPONENT_STATUSES: Final[tuple[str, ...]] = (
    "operational",
    "degraded_performance",
    "partial_outage",
    "major_outage",
    "under_maintenance",
)
Serve: TypeAlias = Literal["ok", "error", "garbage", "stall", "huge"]
SERVE_MODES: Final[tuple[str, ...]] = ("ok", "error", "garbage", "stall", "huge")
PAGE_PATH: Final = "/api/v2/summary.json"
API_COMPONENT: Final = "API"

#: Impact (and page indicator) of an incident by the worst status it gives a component.
_IMPACT: Final = {
    "operational": "none",
    "under_maintenance": "maintenance",
    "degraded_performance": "minor",
    "partial_outage": "major",
    "major_outage": "critical",
}
_RANK: Final = {"none": 0, "maintenance": 0, "minor": 1, "major": 2, "critical": 3}
_DESCRIPTION: Final = {
    "none": "All Systems Operational",
    "minor": "Minor Service Outage",
    "major": "Partial System Outage",
    "critical": "Major System Outage",
}


def check_component_status(status: str) -> None:
    """Raise ``ValueError`` unless ``status`` is a Statuspage component status."""
    if status not in COMPONENT_STATUSES:
        raise ValueError(f"component status {status!r} is not one of {COMPONENT_STATUSES}")


class PagePatch(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /admin/statuspage``."""

    components: dict[str, ComponentStatus] | None = None
    incident: str | None = None
    impact: str | None = None
    serve: Serve | None = None


_patch_decoder: Final = msgspec.json.Decoder(PagePatch)


def decode_patch(data: bytes) -> PagePatch:
    """Decode a ``POST /admin/statuspage`` body (``msgspec.DecodeError`` if it is none)."""
    return _patch_decoder.decode(data or b"{}")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(slots=True)
class _Incident:
    name: str
    components: dict[str, str]
    impact: str
    started_at: float
    id: str = field(default="")

    def __post_init__(self) -> None:
        self.id = self.id or _id(f"{self.name}{self.started_at}")


class StatusPage:
    """The state of the fake's status page; the server's event loop owns it."""

    def __init__(
        self,
        models: Iterable[str],
        scheduled: Iterable[tuple[float, float, str, str]] = (),
    ) -> None:
        """Components for ``models`` plus ``API``; ``scheduled`` incidents count from now."""
        self.components: dict[str, str] = {}
        self.incident: _Incident | None = None
        self.serve: Serve = "ok"
        self._created = time.time()
        self._scheduled: list[tuple[float, float, str, str]] = []
        self.configure(models, scheduled)

    def configure(
        self, models: Iterable[str], scheduled: Iterable[tuple[float, float, str, str]] = ()
    ) -> None:
        """New components (statuses of those that stay are kept); scheduled incidents
        restart from now."""
        names = [*dict.fromkeys(models), API_COMPONENT]
        self.components = {n: self.components.get(n, "operational") for n in names}
        now = time.time()
        self._scheduled = [
            (now + start_s, now + start_s + duration_s, component, status)
            for start_s, duration_s, component, status in scheduled
        ]
        for _, _, component, _ in self._scheduled:
            self.components.setdefault(component, "operational")

    # ---- scripting

    def patch(self, patch: PagePatch) -> dict[str, Any]:
        """Apply ``patch`` (see the admin API); return the state. ``ValueError`` for a bad one."""
        if patch.serve is not None:
            if patch.serve not in SERVE_MODES:
                raise ValueError(f"serve {patch.serve!r} is not one of {SERVE_MODES}")
            self.serve = patch.serve
        touched: dict[str, str] = {}
        for name, status in (patch.components or {}).items():
            check_component_status(status)
            self.components[name] = status
            touched[name] = status
        if patch.incident == "":
            self.resolve()
        elif patch.incident is not None:
            on = touched or {n: s for n, s in self.components.items() if s != "operational"}
            worst = max((_IMPACT[s] for s in on.values()), key=_RANK.__getitem__, default="minor")
            self.incident = _Incident(
                patch.incident, dict(on), patch.impact or worst, started_at=time.time()
            )
        return self.state()

    def resolve(self) -> None:
        """Resolve the open incident: its components are operational again."""
        if self.incident is not None:
            for name in self.incident.components:
                self.components[name] = "operational"
            self.incident = None

    def reset(self) -> None:
        """Every component operational, no incident, served normally."""
        self.components = dict.fromkeys(self.components, "operational")
        self.incident = None
        self.serve = "ok"

    def state(self) -> dict[str, Any]:
        """Components, the open incident (if any) and ``serve``, as the page shows them now."""
        components, incidents = self._now(time.time())
        return {
            "components": components,
            "incidents": [{"name": i.name, "impact": i.impact} for i in incidents],
            "serve": self.serve,
        }

    # ---- the page

    def _now(self, now: float) -> tuple[dict[str, str], list[_Incident]]:
        components = dict(self.components)
        incidents = [self.incident] if self.incident is not None else []
        for start, end, component, status in self._scheduled:
            if start <= now < end:
                components[component] = status
                incidents.append(
                    _Incident(
                        f"Elevated errors on {component}",
                        {component: status},
                        _IMPACT[status],
                        started_at=start,
                    )
                )
        return components, incidents

    def summary(self, base_url: str = "") -> bytes:
        """The ``summary.json`` of the page now (whatever ``serve`` says)."""
        now = time.time()
        components, incidents = self._now(now)
        worst = max(
            [_IMPACT[s] for s in components.values()] + [i.impact for i in incidents],
            key=lambda impact: _RANK.get(impact, 1),
            default="none",
        )
        worst = worst if worst in _DESCRIPTION else "none"
        page = {
            "id": "fakepage",
            "name": "Fake provider",
            "url": base_url,
            "time_zone": "Etc/UTC",
            "updated_at": _iso(now),
        }
        return msgspec.json.encode(
            {
                "page": page,
                "components": [
                    _component(name, status, position, self._created)
                    for position, (name, status) in enumerate(components.items(), 1)
                ],
                "incidents": [_incident(i, base_url) for i in incidents],
                "scheduled_maintenances": [],
                "status": {"indicator": worst, "description": _DESCRIPTION[worst]},
            }
        )


def _component(name: str, status: str, position: int, created: float) -> dict[str, Any]:
    return {
        "id": _id(name),
        "name": name,
        "status": status,
        "created_at": _iso(created),
        "updated_at": _iso(created),
        "position": position,
        "description": None,
        "showcase": True,
        "start_date": None,
        "group_id": None,
        "page_id": "fakepage",
        "group": False,
        "only_show_if_degraded": False,
    }


def _incident(incident: _Incident, base_url: str) -> dict[str, Any]:
    started = _iso(incident.started_at)
    return {
        "id": incident.id,
        "name": incident.name,
        "status": "investigating",
        "created_at": started,
        "updated_at": started,
        "monitoring_at": None,
        "resolved_at": None,
        "impact": incident.impact,
        "shortlink": f"{base_url}/incidents/{incident.id}",
        "started_at": started,
        "page_id": "fakepage",
        "incident_updates": [
            {
                "id": _id(incident.id),
                "status": "investigating",
                "body": "We are investigating elevated error rates.",
                "incident_id": incident.id,
                "created_at": started,
                "updated_at": started,
                "display_at": started,
                "affected_components": [
                    {"code": _id(n), "name": n, "old_status": "operational", "new_status": s}
                    for n, s in incident.components.items()
                ],
            }
        ],
        "components": [
            {"id": _id(n), "name": n, "status": s} for n, s in incident.components.items()
        ],
    }
