"""The one interface every search strategy implements: ask / tell over genomes.

A strategy sees a :class:`Problem` (named dimensions with bounds and initial
values, named objectives with directions and weights) and nothing else: it
never touches models, executors or storage (pymoo's problem/algorithm split).

State is event-sourced.  The base class logs every ``ask(n)`` and every told
result (id, objective values, status); ``state_dict()`` is that log plus the
seed and options, plain JSON.  ``load_state_dict()`` rebuilds the strategy
from its seed and replays the log, which gives back exactly the state it had,
as long as the strategy draws all its randomness from generators it seeds
itself (the conformance suite checks this).  Strategies whose replay would be
slow may override both methods with a native state.
"""

from __future__ import annotations

import hashlib
import math
import struct
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from mergesearch.errors import MergesearchError
from mergesearch.trial import Candidate, Result

STATE_VERSION = 1


class StrategyError(MergesearchError, ValueError):
    """A strategy was misconfigured or misused; the message names the fix."""


class ReplayError(StrategyError):
    """Replaying a saved state does not reproduce the candidates the search asked for."""


def genome_hash(genome: Sequence[float], fidelity: float = 1.0) -> str:
    """A short, exact digest of a proposal (float64 bits), logged with every ask so a
    replay that would attach recorded results to other genomes is caught."""
    data = struct.pack(f"<{len(genome) + 1}d", *genome, fidelity)
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class Dimension:
    """One genome coordinate: a name (also the Optuna param name), bounds, a start value."""

    name: str
    low: float
    high: float
    init: float

    def __post_init__(self):
        if not self.low < self.high:
            raise StrategyError(
                f"dimension {self.name!r}: low {self.low} must be < high {self.high}")
        if not self.low <= self.init <= self.high:
            raise StrategyError(
                f"dimension {self.name!r}: init {self.init} outside [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Objective:
    """One objective: its name, whether larger is better, its weight in a scalarisation."""

    name: str
    direction: Literal["maximize", "minimize"] = "maximize"
    weight: float = 1.0

    @property
    def sign(self) -> float:
        """+1 for minimise, -1 for maximise: ``sign * value`` is a loss."""
        return 1.0 if self.direction == "minimize" else -1.0


@dataclass(frozen=True)
class Problem:
    """What a strategy may know: the genome's dimensions and the objectives."""

    dims: tuple[Dimension, ...]
    objectives: tuple[Objective, ...]

    def __post_init__(self):
        if not self.dims:
            raise StrategyError("a problem needs at least one dimension")
        if not self.objectives:
            raise StrategyError("a problem needs at least one objective")
        for kind, names in (("dimension", [d.name for d in self.dims]),
                            ("objective", [o.name for o in self.objectives])):
            twice = sorted(n for n, count in Counter(names).items() if count > 1)
            if twice:
                raise StrategyError(f"{kind} name(s) {', '.join(map(repr, twice))} used more "
                                    "than once: names must be unique")

    @property
    def n_dims(self) -> int:
        return len(self.dims)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    @property
    def low(self) -> np.ndarray:
        return np.array([d.low for d in self.dims], dtype=float)

    @property
    def high(self) -> np.ndarray:
        return np.array([d.high for d in self.dims], dtype=float)

    @property
    def x0(self) -> np.ndarray:
        return np.array([d.init for d in self.dims], dtype=float)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def losses(self, values: dict[str, float]) -> np.ndarray:
        """Objective values as losses (smaller is better), in objective order."""
        return np.array([o.sign * values[o.name] for o in self.objectives], dtype=float)

    def scalar_loss(self, values: dict[str, float]) -> float:
        """The weighted sum of losses: how single-objective strategies see several objectives."""
        total = sum(o.weight for o in self.objectives)
        return float(sum(o.weight * o.sign * values[o.name] for o in self.objectives) / total)

    def clip(self, genome: Sequence[float]) -> list[float]:
        return [float(min(max(g, d.low), d.high)) for g, d in zip(genome, self.dims, strict=True)]


class StrategyOptions(BaseModel):
    """Base of every strategy's options: typed, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid")


class Strategy(ABC):
    """Ask/tell search over a :class:`Problem`.

    Subclasses set ``name``, ``description`` (one line), ``multi_objective`` (True when
    the strategy optimises a Pareto front; False when it scalarises with
    :meth:`Problem.scalar_loss`) and ``Options``, and implement ``_setup``,
    ``_ask`` and ``_tell``.  The base class numbers candidates, checks the
    ask/tell contract and keeps the replay log.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    multi_objective: ClassVar[bool]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: distributions whose random streams the strategy's proposals depend on: their
    #: versions are part of a study's fingerprint, since an upgrade may change the replay
    rng_libraries: ClassVar[tuple[str, ...]] = ("numpy",)

    def __init__(self, problem: Problem, options: dict[str, Any] | StrategyOptions | None = None,
                 *, seed: int = 0):
        self.problem = problem
        self.seed = int(seed)
        self.options = self.parse_options(options)
        self._reset()

    @classmethod
    def parse_options(cls, options: dict[str, Any] | StrategyOptions | None) -> StrategyOptions:
        if isinstance(options, cls.Options):
            return options
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in err.errors())
            raise StrategyError(f"strategy {cls.name!r} options: {problems}") from None

    def _reset(self) -> None:
        self._next_id = 0
        self._pending: dict[int, Candidate] = {}
        self._log: list[list[Any]] = []
        self._replaying: list[list[str] | None] | None = None  # hashes of logged asks
        self._setup()

    # -- the contract -------------------------------------------------------------------

    def ask(self, n: int = 1) -> list[Candidate]:
        """Up to ``n`` new candidates; fewer (even none) when the strategy must wait for
        results first (e.g. at a generation boundary) or is done."""
        if n < 1:
            raise StrategyError(f"ask(n) needs n >= 1, got {n}")
        if self.done:
            return []
        proposed = self._ask(n)
        if len(proposed) > n:
            raise AssertionError(f"{self.name} returned {len(proposed)} candidates for ask({n})")
        out = []
        for k, (genome, fidelity) in enumerate(proposed):
            genome = [float(g) for g in genome]
            self._check_proposal(self._next_id + k, genome, float(fidelity))
            out.append(Candidate(id=self._next_id + k, genome=genome, fidelity=float(fidelity)))
        hashes = [genome_hash(c.genome, c.fidelity) for c in out]
        if self._replaying is not None:  # the log says what this ask gave when it ran
            self._check_replay(out, hashes)
        self._log.append(["ask", n, hashes])
        self._next_id += len(out)
        for cand in out:
            self._pending[cand.id] = cand
        return out

    def _check_proposal(self, cid: int, genome: list[float], fidelity: float) -> None:
        """A proposal outside the problem is the strategy's bug: refuse it before anything
        is evaluated (storage would refuse it after the evaluation)."""
        if len(genome) != self.problem.n_dims:
            raise StrategyError(f"{self.name} proposed candidate {cid} with {len(genome)} "
                                f"values for {self.problem.n_dims} dimensions (a strategy bug)")
        for g, d in zip(genome, self.problem.dims, strict=True):
            if not d.low <= g <= d.high:  # also false for NaN
                raise StrategyError(
                    f"{self.name} proposed {d.name} = {g!r} for candidate {cid}, outside "
                    f"[{d.low}, {d.high}] (a strategy bug: strategies must return genomes "
                    "within the bounds)")
        if not 0.0 < fidelity <= 1.0:
            raise StrategyError(f"{self.name} proposed fidelity {fidelity!r} for candidate "
                                f"{cid}: fidelities are in (0, 1]")

    def _check_replay(self, out: list[Candidate], hashes: list[str]) -> None:
        logged = self._replaying.pop(0)
        if logged is None:  # logged before genomes were hashed
            return
        for cand, was, now in zip(out, logged, hashes, strict=False):
            if was != now:
                raise ReplayError(
                    f"{self.name}: replaying the saved state proposes a different candidate "
                    f"{cand.id} than the search did (genome hash {now} != {was}): the search "
                    "space, the strategy's options or the libraries its randomness comes "
                    f"from ({', '.join(self.rng_libraries)}) changed since the study was run")
        if len(logged) != len(hashes):
            raise ReplayError(f"{self.name}: replaying the saved state gives {len(hashes)} "
                              f"candidate(s) where the search got {len(logged)}")

    def tell(self, results: Iterable[Result]) -> None:
        """Report finished candidates, in any order and any grouping."""
        results = list(results)
        pairs = []
        seen = set()
        for r in results:
            if r.candidate_id not in self._pending or r.candidate_id in seen:
                raise StrategyError(f"{self.name}: candidate {r.candidate_id} is not awaiting a "
                                    "result (never asked, or already told)")
            if r.ok:
                missing = [o.name for o in self.problem.objectives if o.name not in r.values]
                if missing:
                    raise StrategyError(f"{self.name}: result for candidate {r.candidate_id} lacks "
                                        f"objective(s) {', '.join(missing)}")
                bad = [o.name for o in self.problem.objectives
                       if not math.isfinite(r.values[o.name])]
                if bad:
                    raise StrategyError(f"{self.name}: result for candidate {r.candidate_id} has "
                                        f"non-finite {', '.join(bad)}: record it as failed")
            seen.add(r.candidate_id)
            pairs.append((self._pending[r.candidate_id], r))
        if not pairs:
            return
        self._log.append(["tell", [_log_record(r, self.problem) for r in results]])
        for cand, _ in pairs:
            del self._pending[cand.id]
        self._tell(pairs)

    @property
    def done(self) -> bool:
        """True when the strategy has nothing more to propose (most never are: the
        controller's budget stops them)."""
        return False

    @property
    def pending(self) -> list[Candidate]:
        """Candidates asked for and not yet told, oldest first."""
        return list(self._pending.values())

    # -- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state: seed, options and the ask/tell log."""
        return {"version": STATE_VERSION, "strategy": self.name, "seed": self.seed,
                "options": self.options.model_dump(mode="json"),
                "log": list(self._log)}  # events are never changed once logged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` by replaying its log from the seed."""
        if state.get("strategy") != self.name:
            raise StrategyError(f"state belongs to strategy {state.get('strategy')!r}, "
                                f"not {self.name!r}")
        if state.get("version") != STATE_VERSION:
            raise StrategyError(f"unsupported strategy state version {state.get('version')}")
        self.seed = int(state["seed"])
        self.options = self.parse_options(state["options"])
        self._reset()
        events = state["log"]
        self._replaying = [e[2] if len(e) > 2 else None for e in events if e[0] == "ask"]
        try:
            for kind, payload, *_ in events:
                if kind == "ask":
                    self.ask(int(payload))
                elif kind == "tell":
                    self.tell(Result(candidate_id=int(r["id"]), values=r["values"],
                                     status=r["status"]) for r in payload)
                else:
                    raise StrategyError(f"unknown event {kind!r} in strategy state")
        finally:
            self._replaying = None

    # -- for subclasses -----------------------------------------------------------------

    @abstractmethod
    def _setup(self) -> None:
        """(Re)build all internal state from ``self.problem``, ``self.options``, ``self.seed``."""

    @abstractmethod
    def _ask(self, n: int) -> list[tuple[Sequence[float], float]]:
        """Up to ``n`` ``(genome, fidelity)`` pairs, genomes within the bounds.

        The ``k``-th pair becomes candidate ``self._next_id + k`` (strategies that must map
        ids back to their own bookkeeping may rely on this)."""

    @abstractmethod
    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        """Take finished candidates (failed ones have ``result.ok`` False and no values)."""


def _log_record(result: Result, problem: Problem) -> dict[str, Any]:
    values = {o.name: float(result.values[o.name]) for o in problem.objectives} if result.ok else {}
    return {"id": result.candidate_id, "values": values, "status": result.status}


_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available under ``cls.name``."""
    for attr in ("name", "description", "multi_objective"):
        if not hasattr(cls, attr):
            raise TypeError(f"strategy {cls.__name__} must define {attr}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"strategy name {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str) -> type[Strategy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise StrategyError(f"unknown strategy {name!r}; available: "
                            f"{', '.join(sorted(_REGISTRY))}") from None


def strategies() -> dict[str, type[Strategy]]:
    """Every registered strategy by name, sorted."""
    return dict(sorted(_REGISTRY.items()))


def create_strategy(name: str, problem: Problem, options: dict[str, Any] | None = None,
                    *, seed: int = 0) -> Strategy:
    """Build a registered strategy; a single-objective strategy on several objectives
    scalarises them with their weights."""
    return get_strategy(name)(problem, options, seed=seed)
