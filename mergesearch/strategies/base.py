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
import json
import math
import struct
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from mergesearch.errors import MergesearchError
from mergesearch.recipe import Recipe, RecipeError
from mergesearch.trial import SCORE, Candidate, Result, pack_bits, pack_ids, unpack_bits, unpack_ids

STATE_VERSION = 1


class StrategyError(MergesearchError, ValueError):
    """A strategy was misconfigured or misused; the message names the fix."""


class ReplayError(StrategyError):
    """Replaying a saved state does not reproduce the candidates the search asked for."""


def genome_hash(genome: Sequence[float], fidelity: float = 1.0) -> str:
    """A short, exact digest of a genome proposal (float64 bits)."""
    data = struct.pack(f"<{len(genome) + 1}d", *genome, fidelity)
    return hashlib.sha256(data).hexdigest()[:16]


def proposal_hash(candidate: Candidate) -> str:
    """A short digest of what a candidate asks for, logged with every ask, so that a replay
    which would attach recorded results to other proposals is caught."""
    if candidate.genome is not None and candidate.kind == SCORE:
        return genome_hash(candidate.genome, candidate.fidelity)  # as states logged it first
    what = {"genome": candidate.genome, "fidelity": candidate.fidelity, "kind": candidate.kind,
            "recipe": None if candidate.recipe is None else candidate.recipe.to_dict()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Proposal:
    """What ``_ask`` returns for one candidate: a ``genome`` in the problem's space *or* a
    ``recipe`` the strategy built (a :class:`Recipe` or its dict), with the fidelity, the
    request ``kind`` (``"score"``, or a probe's name) and JSON ``meta`` to store with it.
    A plain ``(genome, fidelity)`` pair is the short form of a genome to score."""

    genome: Sequence[float] | None = None
    recipe: Recipe | dict[str, Any] | None = None
    fidelity: float = 1.0
    kind: str = SCORE
    meta: dict[str, Any] = field(default_factory=dict)


Kind = Literal["real", "int", "categorical", "binary"]
KINDS: tuple[str, ...] = ("real", "int", "categorical", "binary")


@dataclass(frozen=True)
class Dimension:
    """One genome coordinate: a name (also the Optuna param name), its kind, bounds and a
    start value.

    Every kind lives in the genome as a float: ``real`` anywhere in ``[low, high]``;
    ``int`` and ``binary`` (``[0, 1]``) on whole numbers; ``categorical`` as the index of
    one of ``choices`` (``low`` 0, ``high`` the last index).  Build the discrete kinds
    with :meth:`integer`, :meth:`binary` and :meth:`categorical`.
    """

    name: str
    low: float
    high: float
    init: float
    kind: Kind = "real"
    choices: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise StrategyError(f"dimension {self.name!r}: unknown kind {self.kind!r} "
                                f"(known: {', '.join(KINDS)})")
        if self.kind == "categorical":
            if len(self.choices) < 2 or len(set(self.choices)) != len(self.choices):
                raise StrategyError(f"dimension {self.name!r}: a categorical needs two or more "
                                    f"distinct choices, got {list(self.choices)}")
            if (self.low, self.high) != (0, len(self.choices) - 1):
                raise StrategyError(f"dimension {self.name!r}: a categorical spans the indices "
                                    f"0..{len(self.choices) - 1}")
        elif self.choices:
            raise StrategyError(f"dimension {self.name!r}: only categoricals have choices")
        if self.kind == "binary" and (self.low, self.high) != (0, 1):
            raise StrategyError(f"dimension {self.name!r}: a binary spans [0, 1]")
        if not self.low < self.high:
            raise StrategyError(
                f"dimension {self.name!r}: low {self.low} must be < high {self.high}")
        if not self.contains(self.init):
            what = "outside" if not self.low <= self.init <= self.high else \
                f"not a {self.kind} value in"
            raise StrategyError(f"dimension {self.name!r}: init {self.init} {what} "
                                f"[{self.low}, {self.high}]")

    @classmethod
    def integer(cls, name: str, low: int, high: int, init: int | None = None) -> Dimension:
        return cls(name, float(low), float(high), float(low if init is None else init), "int")

    @classmethod
    def binary(cls, name: str, init: int = 0) -> Dimension:
        return cls(name, 0.0, 1.0, float(init), "binary")

    @classmethod
    def categorical(cls, name: str, choices: Sequence[str], init: int | str = 0) -> Dimension:
        choices = tuple(str(c) for c in choices)
        index = choices.index(init) if isinstance(init, str) else int(init)
        return cls(name, 0.0, float(len(choices) - 1), float(index), "categorical", choices)

    @property
    def discrete(self) -> bool:
        return self.kind != "real"

    def contains(self, value: float) -> bool:
        """Whether ``value`` is a genome value of this dimension (NaN never is)."""
        if not self.low <= value <= self.high:
            return False
        return not self.discrete or float(value).is_integer()

    def label(self, value: float) -> float | int | str:
        """The value as a reader (and Optuna's storage) sees it: the choice of a categorical,
        a whole number for int and binary."""
        if self.kind == "categorical":
            return self.choices[int(value)]
        return int(value) if self.discrete else float(value)


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
    """What a strategy may know: the genome's dimensions and the objectives, and (in a
    search) ``decode``, the search space's pure genome -> :class:`Recipe` map, for
    strategies that build recipes from earlier ones (archives, crossovers), and
    ``exact``: the objectives whose value is a pure function of the genome (recipe
    metrics such as storage, through ``decode``), name -> ``genome -> value``, for
    strategies that would otherwise model them (surrogates)."""

    dims: tuple[Dimension, ...]
    objectives: tuple[Objective, ...]
    decode: Callable[[Sequence[float]], Recipe] | None = field(default=None, compare=False,
                                                               repr=False)
    exact: Mapping[str, Callable[[Sequence[float]], float]] = field(
        default_factory=dict, compare=False, repr=False)

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
        unknown = sorted(set(self.exact) - {o.name for o in self.objectives})
        if unknown:
            raise StrategyError(f"exact value(s) for {', '.join(map(repr, unknown))}, which "
                                "is not an objective")

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

    @property
    def discrete(self) -> list[Dimension]:
        """The dimensions that are not real numbers."""
        return [d for d in self.dims if d.discrete]

    def losses(self, values: dict[str, float]) -> np.ndarray:
        """Objective values as losses (smaller is better), in objective order."""
        return np.array([o.sign * values[o.name] for o in self.objectives], dtype=float)

    def scalar_loss(self, values: dict[str, float]) -> float:
        """The weighted sum of losses: how single-objective strategies see several objectives."""
        total = sum(o.weight for o in self.objectives)
        return float(sum(o.weight * o.sign * values[o.name] for o in self.objectives) / total)

    def clip(self, genome: Sequence[float]) -> list[float]:
        """``genome`` within the bounds, discrete dimensions rounded to their nearest value."""
        out = []
        for g, d in zip(genome, self.dims, strict=True):
            g = float(min(max(g, d.low), d.high))
            out.append(float(round(g)) if d.discrete else g)
        return out


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
    #: whether the strategy reads per-item correctness (M2N2, IRT estimators): then the
    #: replay log keeps each result's correctness and item ids, so a resumed strategy
    #: sees exactly what it saw before
    uses_items: ClassVar[bool] = False
    #: the variable kinds the strategy searches; a problem with others is refused when the
    #: strategy is built, with a message naming strategies that handle them
    kinds: ClassVar[frozenset[str]] = frozenset(KINDS)

    def __init__(self, problem: Problem, options: dict[str, Any] | StrategyOptions | None = None,
                 *, seed: int = 0):
        unknown = [d for d in problem.dims if d.kind not in self.kinds]
        if unknown:
            able = sorted(n for n, c in _REGISTRY.items()
                          if {d.kind for d in unknown} <= c.kinds)
            raise StrategyError(
                f"{self.name} searches {', '.join(sorted(self.kinds))} variables only, but "
                f"dimension {unknown[0].name!r} is {unknown[0].kind} ({len(unknown)} such): "
                f"use {', '.join(able) or 'another strategy'}, which handle every type")
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
        results first (e.g. at a generation boundary) or is done.

        Each proposal is checked here, before anything is evaluated: a genome outside its
        dimensions (bounds, whole numbers, choices), a recipe that does not validate, a
        fidelity outside (0, 1] or metadata that is not JSON is the strategy's bug.
        """
        if n < 1:
            raise StrategyError(f"ask(n) needs n >= 1, got {n}")
        if self.done:
            return []
        proposed = self._ask(n)
        if len(proposed) > n:
            raise AssertionError(f"{self.name} returned {len(proposed)} candidates for ask({n})")
        out = [self._candidate(self._next_id + k, p) for k, p in enumerate(proposed)]
        hashes = [proposal_hash(c) for c in out]
        if self._replaying is not None:  # the log says what this ask gave when it ran
            self._check_replay(out, hashes)
        self._log.append(["ask", n, hashes])
        self._next_id += len(out)
        for cand in out:
            self._pending[cand.id] = cand
        return out

    def _candidate(self, cid: int, proposal: Proposal | tuple) -> Candidate:
        """A checked candidate from what ``_ask`` returned."""
        if not isinstance(proposal, Proposal):  # the short form: (genome, fidelity)
            genome, fidelity = proposal
            proposal = Proposal(genome=genome, fidelity=fidelity)
        where = f"{self.name} proposed candidate {cid}"
        if (proposal.genome is None) == (proposal.recipe is None):
            what = "both a genome and" if proposal.genome is not None else "neither a genome nor"
            raise StrategyError(f"{where} with {what} a recipe: give exactly one (a strategy "
                                "bug)")
        genome = recipe = None
        if proposal.genome is not None:
            genome = [float(g) for g in proposal.genome]
            self._check_genome(cid, genome)
        else:
            try:
                recipe = (proposal.recipe if isinstance(proposal.recipe, Recipe)
                          else Recipe.from_dict(proposal.recipe))
            except RecipeError as err:
                raise StrategyError(f"{where} with an invalid recipe: {err}") from None
        fidelity = float(proposal.fidelity)
        if not 0.0 < fidelity <= 1.0:
            raise StrategyError(f"{where} with fidelity {fidelity!r}: fidelities are in (0, 1]")
        if not isinstance(proposal.kind, str) or not proposal.kind:
            raise StrategyError(f"{where} with request kind {proposal.kind!r}: use 'score' or "
                                "a probe's name")
        try:
            meta = json.loads(json.dumps(proposal.meta, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise StrategyError(f"{where} with metadata that is not plain JSON: {err}") from None
        return Candidate(id=cid, genome=genome, fidelity=fidelity, kind=proposal.kind,
                         recipe=recipe, meta=meta)

    def _check_genome(self, cid: int, genome: list[float]) -> None:
        """A genome outside the problem is the strategy's bug: refuse it before anything
        is evaluated (storage would refuse it after the evaluation)."""
        if len(genome) != self.problem.n_dims:
            raise StrategyError(f"{self.name} proposed candidate {cid} with {len(genome)} "
                                f"values for {self.problem.n_dims} dimensions (a strategy bug)")
        for g, d in zip(genome, self.problem.dims, strict=True):
            if not d.contains(g):  # also false for NaN
                what = "outside" if not d.low <= g <= d.high else f"not a {d.kind} value in"
                raise StrategyError(
                    f"{self.name} proposed {d.name} = {g!r} for candidate {cid}, {what} "
                    f"[{d.low}, {d.high}] (a strategy bug: strategies must return genomes "
                    "within their dimensions)")

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
            if r.ok and not self._pending[r.candidate_id].is_probe:
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
        records = [self._log_record(r) for r in results]
        self._log.append(["tell", records])
        # the strategy hears what the log keeps, no more: the same live and on replay
        pairs = [(cand, _replayed(rec)) for (cand, _), rec in zip(pairs, records, strict=True)]
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

    def _log_record(self, result: Result) -> dict[str, Any]:
        """What the replay log keeps of a told result: everything the strategy may read."""
        values = {}
        if result.ok and not self._pending[result.candidate_id].is_probe:
            values = {o.name: float(result.values[o.name]) for o in self.problem.objectives}
        record = {"id": result.candidate_id, "values": values, "status": result.status}
        if result.payload is not None:
            record["payload"] = result.payload
        if self.uses_items and result.correct:
            record["correct"] = {t: pack_bits(v) for t, v in result.correct.items()}
            record["items"] = {t: pack_ids(v) for t, v in result.items.items()}
        return record

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
                    self.tell(_replayed(r) for r in payload)
                else:
                    raise StrategyError(f"unknown event {kind!r} in strategy state")
        finally:
            self._replaying = None

    # -- for subclasses -----------------------------------------------------------------

    @abstractmethod
    def _setup(self) -> None:
        """(Re)build all internal state from ``self.problem``, ``self.options``, ``self.seed``."""

    @abstractmethod
    def _ask(self, n: int) -> list[Proposal | tuple[Sequence[float], float]]:
        """Up to ``n`` proposals (or ``(genome, fidelity)`` pairs), within the problem.

        The ``k``-th pair becomes candidate ``self._next_id + k`` (strategies that must map
        ids back to their own bookkeeping may rely on this)."""

    @abstractmethod
    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        """Take finished candidates (failed ones have ``result.ok`` False and no values)."""


def _replayed(record: dict[str, Any]) -> Result:
    """The result a log record stands for: what the strategy is told (treat its payload as
    read-only: the log keeps it)."""
    return Result(candidate_id=int(record["id"]), values=dict(record["values"]),
                  status=record["status"], payload=record.get("payload"),
                  correct={t: unpack_bits(v) for t, v in record.get("correct", {}).items()},
                  items={t: unpack_ids(v) for t, v in record.get("items", {}).items()})


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
    """A registered strategy by name, or one given by import path (``package.module:Class``,
    a Strategy subclass: an extension point that needs no registration)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    module, sep, attr = name.partition(":")
    if sep:
        import importlib

        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise StrategyError(f"strategy {name!r} cannot be imported: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise StrategyError(f"strategy {name!r} is not a Strategy subclass")
        return cls
    raise StrategyError(f"unknown strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}"
                        " (or give one as module:Class)")


def strategies() -> dict[str, type[Strategy]]:
    """Every registered strategy by name, sorted."""
    return dict(sorted(_REGISTRY.items()))


def create_strategy(name: str, problem: Problem, options: dict[str, Any] | None = None,
                    *, seed: int = 0) -> Strategy:
    """Build a registered strategy; a single-objective strategy on several objectives
    scalarises them with their weights."""
    return get_strategy(name)(problem, options, seed=seed)
