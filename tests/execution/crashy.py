"""A worker that takes its own process down on one candidate (loaded inside Ray actors)."""

from __future__ import annotations

import os

from mergesearch.execution import Worker

CRASH_ON = 2


class CrashyWorker(Worker):
    def evaluate(self, candidate):
        if candidate.id == CRASH_ON:
            os._exit(1)  # as an out-of-memory kill or a segfault would
        return super().evaluate(candidate)
