"""The Ray executor: a pool of worker actors that keep the models resident.

Each actor builds one :class:`Worker` (models loaded once onto its device,
one resident model) and then only ever receives candidates (recipes) and
sends back results.  Candidates go to the least busy live actor (up to
``1 + queue`` outstanding per actor), results are returned as they finish.
An actor whose process dies (killed, out of memory, segfault) is replaced by
a fresh one, and every candidate it held is retried on the pool, at most
``max_retries`` times each, then reported failed with the reason.  The
replacement starts in the background while the other actors keep working; one
that cannot start within ``start_timeout`` (its node is gone and no other has
room) is given up, and the pool goes on smaller, or, with no actor left,
stops with a clear error after returning every result already in hand.  An
actor that is only unreachable for a while (``ActorUnavailableError``) is kept:
its candidate is retried, its models stay loaded.  Actors are owned by the
driver, so they end with it: a killed controller leaves no orphans.

A private cluster (``address: local``) keeps Ray's token authentication on;
``RAY_AUTH_MODE=disabled`` in the environment turns it off.
"""

from __future__ import annotations

import logging
import os
import socket
import time
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
    """One actor and what it is working on; ``starting`` until its models are loaded."""

    actor: Any
    ready: Any = None  # the ready() call while starting
    deadline: float = 0.0  # when a start is given up
    pid: int | None = None
    node: str | None = None
    outstanding: int = 0

    @property
    def starting(self) -> bool:
        return self.ready is not None


def connect(address: str, *, num_cpus: int | None = None) -> None:
    """Join a Ray cluster (``auto``, ``ray://host:port``, ``host:port``) or start a private
    local one (``local``); does nothing if this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    _check_reachable(address)
    try:
        if address == "local":  # token authentication stays on unless RAY_AUTH_MODE says not
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False,
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
                 max_retries: int = 2, start_timeout: float = 600.0):
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
        self.start_timeout = float(start_timeout)
        self._remote = ray.remote(WorkerActor).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0,
            max_task_retries=0)
        self._queue: deque[tuple[Candidate, int]] = deque()
        self._running: dict[Any, tuple[_Slot, Candidate, int]] = {}  # ref -> slot, cand, tries
        self._fatal: ExecutionError | None = None  # raised once the results in hand are out
        self._lost = "workers died"  # why the pool last shrank
        self.replaced = 0
        self._slots = [self._start() for _ in range(workers)]
        self._check_ready(self._slots)

    # -- actors -------------------------------------------------------------------------

    def _start(self) -> _Slot:
        actor = self._remote.remote(self.spec)
        return _Slot(actor=actor, ready=actor.ready.remote(),
                     deadline=time.monotonic() + self.start_timeout)

    def _check_ready(self, slots: list[_Slot]) -> None:
        """Wait (at most ``start_timeout``) for the first actors to load their models."""
        import ray

        try:
            infos = ray.get([s.ready for s in slots], timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ExecutionError(
                f"the Ray workers did not start within {self.start_timeout:g} s (the cluster "
                "may have no room for them: check `ray status`, or raise "
                "execution.start_timeout for slow model loads)") from None
        except ray.exceptions.RayError as err:
            self.close()
            raise ExecutionError(f"a Ray worker died while starting: {_death(err)}") from None
        for slot, info in zip(slots, infos, strict=True):
            self._started(slot, info)

    def _started(self, slot: _Slot, info: dict[str, Any]) -> None:
        slot.ready, slot.pid, slot.node = None, info["pid"], info["node"]
        if info["error"]:
            self.close()
            raise ExecutionError(f"worker on node {info['node']} cannot start: {info['error']}")

    @property
    def worker_pids(self) -> list[int | None]:
        """Process ids of the actors (None for those still starting)."""
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
        live = [s for s in self._slots if not s.starting]
        while self._queue and live:
            slot = min(live, key=lambda s: s.outstanding)
            if slot.outstanding >= self.per_actor:
                return
            candidate, tries = self._queue.popleft()
            ref = slot.actor.evaluate.remote(candidate)
            slot.outstanding += 1
            self._running[ref] = (slot, candidate, tries)

    def wait(self) -> list[Result]:
        """Results of every candidate finished by now (blocks until at least one is).

        Raises :class:`ExecutionError` when no worker is left to run what is queued, but
        only after the results already gathered have been returned."""
        import ray

        if self._fatal is not None:
            raise self._fatal
        out: list[Result] = []
        while not out and (self._running or self._queue):
            starting = {s.ready: s for s in self._slots if s.starting}
            if not self._running and not starting:
                self._fatal = ExecutionError(
                    f"no Ray worker left to run {len(self._queue)} candidate(s): {self._lost}; "
                    "resume the search once the cluster has room")
                break
            timeout = None
            if starting:
                timeout = max(0.0, min(s.deadline for s in starting.values()) - time.monotonic())
            refs = [*self._running, *starting]
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in dict.fromkeys([*ready, *more]):
                if ref in starting:
                    self._on_started(starting[ref], ref)
                else:
                    out.extend(self._on_finished(ref))
            self._give_up_late_starts()
            self._pump()
        if self._fatal is not None and not out:
            raise self._fatal
        return out

    def _on_finished(self, ref) -> list[Result]:
        import ray

        slot, candidate, tries = self._running.pop(ref)
        slot.outstanding -= 1
        try:
            result = ray.get(ref)
            result.attempts = tries + 1
            return [result]
        except ray.exceptions.ActorUnavailableError as err:  # unreachable for now, not dead
            return self._retry(candidate, tries, slot, _death(err))
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError) as err:
            self._replace(slot)
            return self._retry(candidate, tries, slot, _death(err))
        except ray.exceptions.RayTaskError as err:  # Worker.evaluate catches its own
            return [Result.failed(candidate.id, _death(err))]

    def _retry(self, candidate: Candidate, tries: int, slot: _Slot, reason: str) -> list[Result]:
        if tries + 1 > self.max_retries:
            failed = Result.failed(candidate.id, f"worker died {tries + 1} time(s) running it; "
                                   f"last: {reason}")
            failed.attempts = tries + 1
            return [failed]
        log.warning("worker on %s failed running candidate %d (%s); retrying", slot.node,
                    candidate.id, reason)
        self._queue.appendleft((candidate, tries + 1))
        return []

    def _on_started(self, slot: _Slot, ref) -> None:
        import ray

        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as err:  # the replacement died too
            self._lost = f"a replacement worker died while starting: {_death(err)}"
            log.warning("%s; going on with %d worker(s)", self._lost, len(self._slots) - 1)
            self._drop(slot)
            return
        if info["error"]:  # it cannot load the models there
            self._lost = f"a replacement worker on node {info['node']} cannot start: " \
                f"{info['error']}"
            log.warning("%s; going on with %d worker(s)", self._lost, len(self._slots) - 1)
            self._drop(slot)
            return
        slot.ready, slot.pid, slot.node = None, info["pid"], info["node"]

    def _give_up_late_starts(self) -> None:
        now = time.monotonic()
        for slot in [s for s in self._slots if s.starting and s.deadline <= now]:
            self._lost = (f"a replacement worker could not start within {self.start_timeout:g} "
                          "s (a node was lost and the cluster has no room elsewhere?)")
            log.warning("%s; going on with %d worker(s)", self._lost, len(self._slots) - 1)
            self._drop(slot)

    def _drop(self, slot: _Slot) -> None:
        import ray

        if slot in self._slots:
            self._slots.remove(slot)
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass

    def _replace(self, slot: _Slot) -> None:
        """Swap a dead actor for a fresh one in the same place (once per death); the fresh
        one loads its models in the background."""
        if slot not in self._slots:
            return
        import ray

        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass
        self._slots[self._slots.index(slot)] = self._start()
        self.replaced += 1
        # The dead actor's other calls fail on their own and are retried then; the dead
        # slot is no longer in the pool, so those failures replace nothing more.

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
