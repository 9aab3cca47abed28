"""The Ray executor: a pool of worker actors that keep the models resident.

Each actor builds one :class:`Worker` (models loaded once onto its device,
one resident model) and then only ever receives candidates (recipes) and
sends back results.  Candidates go to the least busy live actor (up to
``1 + queue`` outstanding per actor), results are returned as they finish.
An actor whose process dies (killed, out of memory, segfault) is replaced by
a fresh one, and every candidate it held is retried on the pool, at most
``max_retries`` times each, then reported failed with the reason.  Actors are
owned by the driver, so they end with it: a killed controller leaves no
orphans.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from mergesearch.errors import MergesearchError
from mergesearch.execution.worker import WorkerSpec, make_worker
from mergesearch.trial import Candidate, Result

log = logging.getLogger(__name__)


class ExecutionError(MergesearchError, RuntimeError):
    """Workers cannot be started as configured; the message names the node and the fix."""


class WorkerActor:
    """The actor body: a Worker, plus where it runs.  Load errors are kept, not raised,
    so the driver can report them with the node's name instead of a Ray traceback."""

    def __init__(self, spec: WorkerSpec):
        self.node = socket.gethostname()
        self.error: str | None = None
        try:
            self.worker = make_worker(spec)
        except Exception as err:  # reported by ready()
            self.error = f"{type(err).__name__}: {err}"

    def ready(self) -> dict[str, Any]:
        return {"node": self.node, "pid": os.getpid(), "error": self.error}

    def evaluate(self, candidate: Candidate) -> Result:
        if self.error is not None:
            return Result.failed(candidate.id, f"worker on {self.node} cannot load: {self.error}")
        return self.worker.evaluate(candidate)


@dataclass
class _Slot:
    """One live actor and what it is working on."""

    actor: Any
    pid: int | None = None
    node: str | None = None
    outstanding: int = 0


def connect(address: str, *, num_cpus: int | None = None) -> None:
    """Join a Ray cluster (``auto``, ``ray://host:port``, ``host:port``) or start a private
    local one (``local``); does nothing if this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    _check_reachable(address)
    try:
        if address == "local":
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as err:  # unreachable address, no cluster running, version mismatch
        raise ExecutionError(
            f"cannot connect to Ray at {address!r}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''} (start one with `ray start --head` "
            "and pass --ray-address auto, or use execution.address: local)") from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a host:port nobody listens on (Ray itself retries for minutes)."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise ExecutionError(
            f"cannot connect to Ray at {address!r}: {type(err).__name__}: {err} (is the head "
            "node running, and is the port right? `ray start --head` prints the address)"
        ) from None


class RayExecutor:
    """``submit`` candidates, ``wait`` for finished results; ``free`` says how many more fit."""

    def __init__(self, spec: WorkerSpec, *, workers: int = 1, address: str = "local",
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, queue: int = 0,
                 max_retries: int = 2):
        import ray

        connect(address, num_cpus=max(int(workers * cpus_per_worker + 0.999), 1)
                if address == "local" else None)
        total = ray.cluster_resources()
        for what, each in (("GPU", gpus_per_worker), ("CPU", cpus_per_worker)):
            want, have = workers * each, total.get(what, 0.0)
            if want > have + 1e-9:
                raise ExecutionError(
                    f"{workers} worker(s) x {each:g} {what} = {want:g} {what}s requested, but "
                    f"the Ray cluster has {have:g}: lower execution.workers or "
                    f"execution.{what.lower()}s_per_worker")
        if gpus_per_worker > 0 and spec.device == "cpu":
            spec = replace(spec, device="cuda")
        self.spec = spec
        self.max_retries = max_retries
        self.per_actor = 1 + queue
        self._remote = ray.remote(WorkerActor).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0,
            max_task_retries=0)
        self._queue: deque[tuple[Candidate, int]] = deque()
        self._running: dict[Any, tuple[_Slot, Candidate, int]] = {}  # ref -> slot, cand, tries
        self.replaced = 0
        self._slots = [self._start() for _ in range(workers)]
        self._check_ready(self._slots)

    # -- actors -------------------------------------------------------------------------

    def _start(self) -> _Slot:
        return _Slot(actor=self._remote.remote(self.spec))

    def _check_ready(self, slots: list[_Slot]) -> None:
        import ray

        infos = ray.get([s.actor.ready.remote() for s in slots])
        for slot, info in zip(slots, infos, strict=True):
            slot.pid, slot.node = info["pid"], info["node"]
            if info["error"]:
                self.close()
                raise ExecutionError(f"worker on node {info['node']} cannot start: "
                                     f"{info['error']}")

    @property
    def worker_pids(self) -> list[int | None]:
        """Process ids of the live actors (known once each has started)."""
        return [s.pid for s in self._slots]

    # -- executor interface -------------------------------------------------------------

    @property
    def slots(self) -> int:
        return len(self._slots) * self.per_actor

    @property
    def in_flight(self) -> int:
        return len(self._queue) + len(self._running)

    @property
    def free(self) -> int:
        return max(0, self.slots - self.in_flight)

    def submit(self, candidate: Candidate) -> None:
        self._queue.append((candidate, 0))
        self._pump()

    def _pump(self) -> None:
        while self._queue:
            slot = min(self._slots, key=lambda s: s.outstanding)
            if slot.outstanding >= self.per_actor:
                return
            candidate, tries = self._queue.popleft()
            ref = slot.actor.evaluate.remote(candidate)
            slot.outstanding += 1
            self._running[ref] = (slot, candidate, tries)

    def wait(self) -> list[Result]:
        """Results of every candidate finished by now (blocks until at least one is)."""
        import ray

        out: list[Result] = []
        while not out and self._running:
            ready, _ = ray.wait(list(self._running), num_returns=1)
            more, _ = ray.wait(list(self._running), num_returns=len(self._running), timeout=0)
            for ref in dict.fromkeys([*ready, *more]):
                slot, candidate, tries = self._running.pop(ref)
                slot.outstanding -= 1
                try:
                    result = ray.get(ref)
                    result.attempts = tries + 1
                    out.append(result)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError) as err:
                    self._replace(slot, err)
                    reason = _death(err)
                    if tries + 1 > self.max_retries:
                        failed = Result.failed(
                            candidate.id, f"worker died {tries + 1} time(s) running it; "
                            f"last: {reason}")
                        failed.attempts = tries + 1
                        out.append(failed)
                    else:
                        log.warning("worker on %s died running candidate %d (%s); retrying",
                                    slot.node, candidate.id, reason)
                        self._queue.appendleft((candidate, tries + 1))
                except ray.exceptions.RayTaskError as err:  # Worker.evaluate catches its own
                    out.append(Result.failed(candidate.id, _death(err)))
            self._pump()
        return out

    def _replace(self, slot: _Slot, err: Exception) -> None:
        """Swap a dead actor for a fresh one in the same slot (once per death)."""
        if slot not in self._slots:
            return
        import ray

        i = self._slots.index(slot)
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass
        fresh = self._start()
        self._slots[i] = fresh
        self.replaced += 1
        # The dead actor's other calls fail on their own and are retried then; the dead
        # slot is no longer in the pool, so those failures replace nothing more.
        try:
            self._check_ready([fresh])
        except ExecutionError:
            raise
        except Exception as again:  # the replacement died too: report the first death
            raise ExecutionError(f"a replacement worker could not start after {_death(err)}: "
                                 f"{_death(again)}") from None

    def close(self) -> None:
        import ray

        for slot in self._slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        self._slots = []
        self._running.clear()
        self._queue.clear()


def _death(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
