"""A worker process's garbage collector: what it allocated to start is frozen, and young
collections come every ``WORKER_GC_YOUNG`` allocations rather than CPython's 700."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_worker_gc_freezes_the_heap_and_spaces_young_collections() -> None:
    """After ``worker_gc`` the start-up objects are out of the collector's scans and the
    young generation's threshold is the worker's; the older ones keep CPython's."""
    code = (
        "import gc; from services.runner import WORKER_GC_YOUNG, worker_gc; "
        "before = gc.get_threshold(); worker_gc(); after = gc.get_threshold(); "
        "print(gc.get_freeze_count(), after[0] == WORKER_GC_YOUNG != before[0], "
        "after[1:] == before[1:])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    )
    frozen, young, older = done.stdout.split()
    assert int(frozen) > 10_000
    assert young == "True"
    assert older == "True"
