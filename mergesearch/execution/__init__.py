"""Executors run candidates on workers: in process (local) now, a Ray actor pool later."""

from .local import LocalExecutor
from .worker import Worker, WorkerSpec, make_worker

__all__ = ["LocalExecutor", "Worker", "WorkerSpec", "make_worker"]
