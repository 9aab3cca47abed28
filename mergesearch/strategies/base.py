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

import math
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
        self._setup()

    # -- the contract -------------------------------------------------------------------

    def ask(self, n: int = 1) -> list[Candidate]:
        """Up to ``n`` new candidates; fewer (even none) when the strategy must wait for
        results first (e.g. at a generation boundary) or is done."""
        if n < 1:
            raise StrategyError(f"ask(n) needs n >= 1, got {n}")
        if self.done:
            return []
        self._log.append(["ask", n])
        proposed = self._ask(n)
        if len(proposed) > n:
            raise AssertionError(f"{self.name} returned {len(proposed)} candidates for ask({n})")
        out = []
        for genome, fidelity in proposed:
            genome = [float(g) for g in genome]
            if len(genome) != self.problem.n_dims:
                raise AssertionError(f"{self.name} returned a genome of length {len(genome)}")
            cand = Candidate(id=self._next_id, genome=genome, fidelity=float(fidelity))
            self._next_id += 1
            self._pending[cand.id] = cand
            out.append(cand)
        return out

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
        for kind, payload in state["log"]:
            if kind == "ask":
                self.ask(int(payload))
            elif kind == "tell":
                self.tell(Result(candidate_id=int(r["id"]), values=r["values"],
                                 status=r["status"]) for r in payload)
            else:
                raise StrategyError(f"unknown event {kind!r} in strategy state")

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
