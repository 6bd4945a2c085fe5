"""A 3-node nats-server cluster with JetStream on loopback, for the cluster tests.

Three processes (``NatsServer`` each), cluster routes on 127.0.0.1, one store
directory and one distinct ``server_name`` per node, and a monitoring port per
node whose ``/healthz`` says when JetStream is ready. Nodes can be SIGKILLed
and restarted with their store, as a host failure would do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from services.tools.devstack import NatsServer, free_port

CLUSTER_NAME = "ridethrough-test"


class ClusterNode:
    """One member of the cluster: its server, name and ports."""

    def __init__(self, name: str, server: NatsServer, route_port: int, monitor_port: int) -> None:
        self.name = name
        self.server = server
        self.route_port = route_port
        self.monitor_port = monitor_port

    @property
    def url(self) -> str:
        """Client URL of this node."""
        return self.server.url

    @property
    def running(self) -> bool:
        """Whether the node's process is alive."""
        proc = self.server.proc
        return proc is not None and proc.poll() is None

    def monitor(self, path: str, timeout: float = 2.0) -> Any:
        """GET a monitoring endpoint (``/healthz``, ``/connz``, ``/jsz``...) as JSON."""
        url = f"http://127.0.0.1:{self.monitor_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback only
            return json.loads(resp.read())

    def healthy(self) -> bool:
        """Whether ``/healthz`` reports the node up with JetStream current."""
        try:
            return bool(self.monitor("/healthz").get("status") == "ok")
        except (OSError, urllib.error.URLError, ValueError):
            return False


class NatsCluster:
    """``size`` JetStream nodes routed to each other on 127.0.0.1."""

    def __init__(self, root: Path, size: int = 3, *, extra_args: list[str] | None = None) -> None:
        self.root = root
        routes = [free_port() for _ in range(size)]
        self.nodes: list[ClusterNode] = []
        for i in range(size):
            name = f"n{i + 1}"
            monitor = free_port()
            peers = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i)
            args = [
                "--server_name", name,
                "--cluster_name", CLUSTER_NAME,
                "--cluster", f"nats://127.0.0.1:{routes[i]}",
                "--routes", peers,
                "-m", str(monitor),
                *(extra_args or []),
            ]  # fmt: skip
            server = NatsServer(
                data_dir=root / name, extra_args=args, log_file=root / f"{name}.log"
            )
            self.nodes.append(ClusterNode(name, server, routes[i], monitor))

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated (what clients get as ``NATS_URL``)."""
        return ",".join(n.url for n in self.nodes)

    def node(self, name: str) -> ClusterNode:
        """The node whose ``server_name`` is ``name``."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every node and wait until all of them report JetStream healthy."""
        for n in self.nodes:
            n.server.start()
        self.wait_healthy(timeout)
        return self

    def formed(self) -> bool:
        """Whether the JetStream meta group has a leader that sees every other running
        node as a current peer. ``/healthz`` can be ok on every node before that, and an
        R3 stream created then fails with "no suitable peers for placement"."""
        running = [n for n in self.nodes if n.running]
        try:
            meta = running[0].monitor("/jsz").get("meta_cluster") or {}
            leader = self.node(meta.get("leader") or "")
            if not leader.running:
                return False
            seen = leader.monitor("/jsz").get("meta_cluster") or {}
        except (KeyError, IndexError, OSError, urllib.error.URLError, ValueError):
            return False
        current = {r.get("name") for r in seen.get("replicas") or [] if r.get("current")}
        return {n.name for n in running if n is not leader} <= current

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until every running node's ``/healthz`` is ok and the JetStream
        meta group has formed over them."""
        deadline = time.monotonic() + timeout
        while not (all(n.healthy() for n in self.nodes if n.running) and self.formed()):
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster not healthy within {timeout}s: see {self.root}")
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        """SIGKILL one node, as a lost host would."""
        self.node(name).server.stop(kill=True)

    def restart(self, name: str, timeout: float = 30.0) -> None:
        """Start a stopped node again, same ports and store, and wait until it is healthy."""
        node = self.node(name)
        node.server.start()
        deadline = time.monotonic() + timeout
        while not (node.healthy() and self.formed()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not healthy within {timeout}s after restart")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every node (the store directories belong to ``root``)."""
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.server.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def gather_leaders(
    nc: Any,
    to: str,
    streams: list[str],
    consumers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    timeout: float = 30.0,
) -> None:
    """Make node ``to`` the leader of every stream and consumer named, with JetStream's
    leader step-down towards a preferred server; wait (bounded) until it is.

    Killing that node then takes every one of those leaders away at once: the worst
    case for the clients, and the same case on every run.
    """
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    targets: list[tuple[str, str]] = [(f"STREAM.LEADER.STEPDOWN.{st}", st) for st in streams]
    targets += [(f"CONSUMER.LEADER.STEPDOWN.{st}.{c}", f"{st}/{c}") for st, c in consumers]
    for api_subject, label in targets:
        while True:
            if "/" in label:
                stream, consumer = label.split("/")
                leader = (await js.consumer_info(stream, consumer)).cluster.leader
            else:
                leader = (await js.stream_info(label)).cluster.leader
            if leader == to:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{label} still led by {leader}, not {to}, after {timeout}s")
            with contextlib.suppress(Exception):  # an election already under way answers late
                await nc.request(
                    f"$JS.API.{api_subject}",
                    json.dumps({"placement": {"preferred": to}}).encode(),
                    timeout=2,
                )
            await asyncio.sleep(0.2)
