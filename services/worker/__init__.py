"""The worker service: consume jobs, call the provider, settle every message explicitly."""

from services.worker.app import build_app, run_worker
from services.worker.runtime import JobRunner

__all__ = ["JobRunner", "build_app", "run_worker"]
