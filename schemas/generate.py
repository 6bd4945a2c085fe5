"""Write the JSON Schema files in ``schemas/json/`` from the Structs.

Run ``python -m schemas.generate`` after changing a Struct; a test fails when
the committed files drift from the Structs.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from schemas.events import EvidenceEvent, HealthEvent, TallyEvent
from schemas.health import BreakerState
from schemas.jobs import Job
from schemas.parking import DeadLetter, ParkedJob
from schemas.results import JobResult

OUT = Path(__file__).parent / "json"

#: file name -> Struct, for every message a non-Python program reads or writes
SCHEMAS: dict[str, type[msgspec.Struct]] = {
    "job.json": Job,
    "job_result.json": JobResult,
    "dead_letter.json": DeadLetter,
    "parked_job.json": ParkedJob,
    "breaker_state.json": BreakerState,
    "health_event.json": HealthEvent,
    "evidence_event.json": EvidenceEvent,
    "tally_event.json": TallyEvent,
}


def _clean_descriptions(node: Any) -> None:
    """Dedent every ``description`` in place, as ``inspect.cleandoc`` does.

    msgspec 0.23 dedents docstrings itself and 0.22 does not; cleaning them here
    makes the files the same whichever version generated them.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                node[key] = inspect.cleandoc(value)
            else:
                _clean_descriptions(value)
    elif isinstance(node, list):
        for item in node:
            _clean_descriptions(item)


def render(struct: type[msgspec.Struct]) -> str:
    """The JSON Schema of ``struct`` as stable, pretty text."""
    schema: dict[str, Any] = msgspec.json.schema(struct)
    _clean_descriptions(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = struct.__name__
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> int:
    """Write every schema file; print the ones that changed."""
    OUT.mkdir(exist_ok=True)
    for name, struct in SCHEMAS.items():
        path = OUT / name
        text = render(struct)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
