"""Multi-fidelity search for any strategy: successive halving, synchronous or asynchronous.

``strategy: {name: asha, options: {strategy: cmaes, options: {popsize: 8},
fidelities: [0.111, 0.333, 1.0], eta: 3}}`` wraps another strategy (the *inner* one).
New configurations come from the inner strategy and are scored at the lowest fidelity
(rung 0); the best ``1/eta`` of a rung are scored again at the next fidelity, up to the
last (1: the whole evaluation set).  The inner strategy is told each configuration's
rung-0 result, once: it searches the cheap objective, and the rungs above decide which of
its points get paid for in full.  With ``tell: last`` (synchronous only) it is told instead,
once a bracket has ended, each configuration's result at the highest rung it reached, so
the points it ranks best are ranked by their full evaluations (``bracket`` is best set to
the inner strategy's batch, e.g. CMA-ES's population).

* ``asynchronous: true`` (ASHA; Li et al., "A System for Massively Parallel Hyperparameter
  Tuning", MLSys 2020): whenever a candidate is asked for, the highest rung with a
  configuration in the top ``floor(n/eta)`` of its ``n`` finished results that has not
  been promoted yet promotes it; otherwise a new configuration starts at rung 0.  Never
  waits, so parallel workers stay busy.
* ``asynchronous: false`` (successive halving; Jamieson & Talwalkar 2016): brackets of
  ``bracket`` configurations (default ``eta ** (rungs - 1)``); a rung is promoted once all
  its configurations are back: exactly its best ``floor(n/eta)``.  Asks return nothing while
  a rung is waiting.

Ranking is by the problem's weighted-sum loss (a failed result ranks last), also for a
multi-objective inner strategy (our choice; the inner one still sees every objective).
A configuration's trials carry ``meta.asha = {config, rung}``.  Low-fidelity trials are
cheap in ``budget.cost`` (items scored); the front, ``best`` and export read
full-fidelity trials only (``TrialStore.pareto_front``).  State: the base class's replay
log, which rebuilds the inner strategy too (the inner one is driven only from here).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mergesearch.strategies.base import (
    Problem,
    Proposal,
    Strategy,
    StrategyError,
    StrategyOptions,
    get_strategy,
    register,
)
from mergesearch.trial import Candidate, Result


class ASHAOptions(StrategyOptions):
    strategy: str = "random"
    """The inner strategy (a registered name or ``module:Class``) that proposes configs."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The inner strategy's options."""
    fidelities: list[float] = Field(default_factory=lambda: [1 / 9, 1 / 3, 1.0], min_length=1)
    """The rungs' fidelities, increasing, the last 1 (full evaluation)."""
    eta: float = Field(3.0, gt=1)
    """A rung promotes its best ``1/eta``."""
    asynchronous: bool = True
    """ASHA (never waits) or synchronous successive halving in brackets."""
    bracket: int | None = Field(None, gt=0)
    """Synchronous only: configurations per bracket (default ``eta ** (rungs - 1)``)."""
    tell: Literal["first", "last"] = "first"
    """What the inner strategy is told of a configuration: its first (rung-0) result, as
    soon as it is back, or (synchronous only) its result at the highest rung it reached,
    once its bracket has ended."""

    @field_validator("fidelities")
    @classmethod
    def _increasing(cls, fid: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in fid):
            raise ValueError(f"fidelities must be in (0, 1], got {fid}")
        if any(b <= a for a, b in zip(fid, fid[1:], strict=False)):
            raise ValueError(f"fidelities must increase, got {fid}")
        if fid[-1] != 1:
            raise ValueError(f"the last fidelity must be 1 (the full evaluation), got {fid[-1]}")
        return fid

    @model_validator(mode="after")
    def _bracket_sync(self) -> ASHAOptions:
        if self.bracket is not None and self.asynchronous:
            raise ValueError("bracket is for asynchronous: false only")
        if self.tell == "last" and self.asynchronous:
            raise ValueError("tell: last is for asynchronous: false only (ASHA may promote a "
                             "configuration at any later time, so no result of it is its last)")
        if self.strategy == "asha":
            raise ValueError("strategy: asha cannot wrap itself; name the inner strategy")
        return self


@register
class SuccessiveHalving(Strategy):
    """Successive halving / ASHA over fidelities around any strategy."""

    name = "asha"
    description = ("Multi-fidelity wrapper: successive halving / ASHA over fidelities around "
                   "any strategy (options.strategy)")
    multi_objective = True  # as the inner strategy: random (the default) is
    Options = ASHAOptions
    options: ASHAOptions

    def __init__(self, problem: Problem, options: dict[str, Any] | StrategyOptions | None = None,
                 *, seed: int = 0):
        opts = self.parse_options(options)
        try:
            self._inner_cls = get_strategy(opts.strategy)
        except StrategyError as err:
            raise StrategyError(f"strategy 'asha' options.strategy: {err}") from None
        try:
            self._inner_cls.parse_options(opts.options)
        except StrategyError as err:
            raise StrategyError(f"strategy 'asha' options.options: {err}") from None
        self.uses_items = self._inner_cls.uses_items
        self.kinds = self._inner_cls.kinds
        self.rng_libraries = self._inner_cls.rng_libraries
        super().__init__(problem, opts, seed=seed)
        self.multi_objective = self.inner.multi_objective

    # -- bookkeeping --------------------------------------------------------------------

    def _setup(self) -> None:
        self.inner: Strategy = self._inner_cls(self.problem, self.options.options, seed=self.seed)
        self._fid = list(self.options.fidelities)
        self._configs: list[dict[str, Any]] = []  # proposal + inner id + loss by rung
        self._rungs: list[list[int]] = [[] for _ in self._fid]  # configs started per rung
        self._promoted: list[set[int]] = [set() for _ in self._fid]
        self._asked: dict[int, tuple[int | None, int, int]] = {}  # outer -> config, rung, inner
        self._queue: list[tuple[int, int]] = []  # synchronous: (config, rung) to ask
        self._bracket: list[list[int]] = [[] for _ in self._fid]
        eta, rungs = self.options.eta, len(self._fid)
        self._size = self.options.bracket or max(1, round(eta ** (rungs - 1)))

    def _loss(self, config: int, rung: int) -> float | None:
        """A config's loss at a rung (inf when it failed), None while pending."""
        return self._configs[config]["loss"].get(rung)

    def _top(self, configs: list[int], rung: int) -> list[int]:
        """The best ``floor(n / eta)`` of the finished ``configs`` at ``rung``."""
        done = [c for c in configs if self._loss(c, rung) is not None]
        keep = math.floor(len(done) / self.options.eta + 1e-9)
        return sorted(done, key=lambda c: (self._loss(c, rung), c))[:keep]

    def _promotion(self) -> tuple[int, int] | None:
        """ASHA: the best unpromoted config in a rung's top 1/eta, highest rung first."""
        for rung in range(len(self._fid) - 2, -1, -1):
            for c in self._top(self._rungs[rung], rung):
                if c not in self._promoted[rung] and math.isfinite(self._loss(c, rung)):
                    return c, rung + 1
        return None

    def _proposal(self, config: int, rung: int) -> Proposal:
        cfg = self._configs[config]
        self._rungs[rung].append(config)
        if rung:
            self._promoted[rung - 1].add(config)
        meta = dict(cfg["meta"]) | {"asha": {"config": config, "rung": rung}}
        return Proposal(genome=cfg["genome"], recipe=cfg["recipe"], fidelity=self._fid[rung],
                        meta=meta)

    def _new(self, n: int) -> list[Proposal]:
        """Up to ``n`` new configurations from the inner strategy, at rung 0 (its probes
        pass through as they are)."""
        out = []
        for cand in self.inner.ask(n):
            if cand.is_probe:
                self._asked[self._base + len(out)] = (None, -1, cand.id)
                out.append(Proposal(genome=cand.genome, recipe=cand.recipe,
                                    fidelity=cand.fidelity, kind=cand.kind, meta=cand.meta))
                continue
            self._configs.append({"genome": cand.genome,
                                  "recipe": None if cand.recipe is None
                                  else cand.recipe.to_dict(),
                                  "meta": cand.meta, "inner": cand.id, "loss": {},
                                  "result": {}})
            config = len(self._configs) - 1
            if not self.options.asynchronous:
                self._bracket[0].append(config)
            self._asked[self._base + len(out)] = (config, 0, cand.id)
            out.append(self._proposal(config, 0))
        return out

    # -- ask / tell ---------------------------------------------------------------------

    def _ask(self, n: int) -> list[Proposal]:
        out: list[Proposal] = []
        while len(out) < n:
            self._base = self._next_id + len(out)  # the id of the next proposal
            step = self._ask_async(n - len(out)) if self.options.asynchronous \
                else self._ask_sync(n - len(out))
            if not step:
                break
            out += step
        return out

    def _ask_async(self, n: int) -> list[Proposal]:
        promo = self._promotion()
        if promo is not None:
            config, rung = promo
            self._asked[self._base] = (config, rung, self._configs[config]["inner"])
            return [self._proposal(config, rung)]
        return self._new(n)

    def _ask_sync(self, n: int) -> list[Proposal]:
        if self._queue:
            config, rung = self._queue.pop(0)
            self._asked[self._base] = (config, rung, self._configs[config]["inner"])
            return [self._proposal(config, rung)]
        top = max(r for r in range(len(self._fid)) if self._bracket[r] or r == 0)
        members = self._bracket[top]
        if top == 0 and len(members) < self._size:
            fresh = self._new(min(n, self._size - len(members)))
            if fresh or not members:
                return fresh
            # the inner strategy has nothing more for now (a generation waiting for its
            # results, or done): the bracket is what it gave
        if any(self._loss(c, top) is None for c in members):
            return []  # wait for the rung
        best = [c for c in self._top(members, top) if math.isfinite(self._loss(c, top))]
        if top == len(self._fid) - 1 or not best:
            if self.options.tell == "last":
                self._tell_last(self._bracket[0])
            self._bracket = [[] for _ in self._fid]  # the next bracket
            return self._new(min(n, self._size))
        self._bracket[top + 1] = list(best)
        self._queue = [(c, top + 1) for c in best]
        return self._ask_sync(n)

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        inner = []
        for cand, res in told:
            config, rung, inner_id = self._asked.pop(cand.id)
            if config is not None:
                self._configs[config]["loss"][rung] = (
                    self.problem.scalar_loss(res.values) if res.ok else math.inf)
                if self.options.tell == "last":  # told at the bracket's end
                    self._configs[config]["result"][rung] = res
            # rung 0 (unless held back for the bracket's end), or a probe of the inner one
            if config is None or (rung == 0 and self.options.tell == "first"):
                inner.append(_for_inner(res, inner_id))
        if inner:
            self.inner.tell(inner)

    def _tell_last(self, configs: list[int]) -> None:
        """``tell: last``: the inner strategy hears each of a finished bracket's
        configurations at the highest rung it reached."""
        told = []
        for c in configs:
            results = self._configs[c]["result"]
            told.append(_for_inner(results[max(results)], self._configs[c]["inner"]))
        if told:
            self.inner.tell(told)

    @property
    def done(self) -> bool:
        return self.inner.done and not self._asked and self._promotion() is None \
            and not self._queue


def _for_inner(res: Result, inner_id: int) -> Result:
    """A result as the inner strategy's, under the id it proposed the configuration with."""
    return Result(candidate_id=inner_id, values=dict(res.values), status=res.status,
                  reason=res.reason, payload=res.payload, correct=res.correct,
                  items=res.items, cost=res.cost)
