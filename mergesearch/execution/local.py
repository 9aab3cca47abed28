"""The local executor: one worker in this process, one candidate at a time."""

from __future__ import annotations

from collections import deque

from mergesearch.execution.worker import Worker
from mergesearch.trial import Candidate, Result


class LocalExecutor:
    """``submit`` queues; ``wait`` evaluates the oldest queued candidate and returns it."""

    slots = 1

    def __init__(self, worker: Worker):
        self.worker = worker
        self._queue: deque[Candidate] = deque()

    @property
    def free(self) -> int:
        return max(0, self.slots - len(self._queue))

    def submit(self, candidate: Candidate) -> None:
        self._queue.append(candidate)

    def wait(self) -> list[Result]:
        """Results of the next finished candidates (at least one if any is queued)."""
        if not self._queue:
            return []
        return [self.worker.evaluate(self._queue.popleft())]

    def close(self) -> None:
        """Drop what is queued and close the worker (a vLLM engine shuts down here, not
        when the process exits)."""
        self._queue.clear()
        self.worker.close()
