"""Evo-Merging (black-box merging, 2025): CMA-ES first over the kept fractions (alpha), then
over the signed scales (beta), each with an L1 penalty on its own variables.

The space gives each source an alpha (``density``, in [0, 1]) and a beta (``weight``, in
[-1.5, 1.5]); the merge rule is ``evo_lora`` (:mod:`mergesearch.merging.evo`), or any
method with those two per-source parameters (``breadcrumbs`` with ``gamma: 0`` is the same
rule on task vectors).  Dimensions are told apart by the parameter name their name starts
with (``density[rot]``, ``weight[pos]@L0-1``), set by the options ``alpha`` and ``beta``.

Faithful to the paper:

- two CMA-ES stages, popsize 20, step 0.05: stage 1 searches alpha from the space's start
  (1 in ``search_spaces/evo_merging.yaml``) with every beta held at 1/N (N sources);
  stage 2 searches beta from 1/N with alpha fixed at stage 1's best candidate;
- the loss is the scalarised objective (LM cross entropy: minus the evaluator's
  ``answer_logprob``) plus ``l1 * mean |x|`` over the current stage's variables;
- 400 + 800 evaluations by default (``evaluations: 1200``, split ``alpha_share: 1/3``).

Our choices:

- pycma runs in the unit cube (through :class:`~mergesearch.strategies.cmaes.CMAES`, one
  instance per stage), so the paper's absolute step ``sigma0`` (in the variables' own
  units) becomes ``sigma0 / (high - low)`` per dimension: 0.05 for alpha in [0, 1],
  0.0167 for beta in [-1.5, 1.5] (pycma's ``CMA_stds`` when one stage mixes ranges).
- The strategy is not told the controller's budget: ``evaluations`` (both stages) and
  ``alpha_share`` split it, or ``alpha_evaluations`` / ``beta_evaluations`` set a stage
  outright; after both stages it is done.  Set ``evaluations`` to the budget when the
  budget is smaller than 1200, or stage 2 never starts.  A stage also ends early when
  pycma's convergence tests fire.  Stage 1 ends at its count even inside a generation.
- "Stage 1's best" is the candidate with the lowest penalised loss (what stage 1
  minimised); with no successful candidate, alpha stays at the start point.
- Dimensions that are neither alpha nor beta (``lambda``) are held at their start in
  stage 1 and searched, unpenalised, in stage 2.  Without beta dimensions stage 2 is
  skipped; without alpha dimensions stage 1 is.  A problem with neither (a generic
  problem) is one plain CMA-ES stage over every dimension (step ``generic_sigma0`` of
  each range, pycma's default popsize unless ``generic_popsize``), no penalty, for
  ``evaluations``: what the cmaes strategy does.
- Failed candidates rank last within their generation (CMAES's penalty).  Each candidate's
  metadata says its stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from mergesearch.strategies.base import (
    Dimension,
    Objective,
    Problem,
    Proposal,
    Strategy,
    StrategyOptions,
    register,
)
from mergesearch.strategies.cmaes import CMAES, CMAESOptions
from mergesearch.trial import Candidate, Result

_PARAM = re.compile(r"^([^\[@/]+)")  # a dimension's parameter name: before [source] @L /m
_SOURCE = re.compile(r"\[([^\]]+)\]")


class EvoMergingOptions(StrategyOptions):
    alpha: str = "density"
    """Parameter name of the alpha (kept fraction) dimensions."""
    beta: str = "weight"
    """Parameter name of the beta (signed scale) dimensions."""
    popsize: int = Field(20, ge=2)
    """Candidates per CMA-ES generation, both stages."""
    sigma0: float = Field(0.05, gt=0)
    """Initial step in the variables' own units (the paper's absolute 0.05)."""
    evaluations: int = Field(1200, ge=1)
    """Evaluations of both stages together (400 + 800 in the paper)."""
    alpha_share: float = Field(1 / 3, gt=0, lt=1)
    """Share of ``evaluations`` for stage 1 (alpha)."""
    alpha_evaluations: int | None = Field(None, ge=1)
    """Stage 1's evaluations outright (overrides the share)."""
    beta_evaluations: int | None = Field(None, ge=1)
    """Stage 2's evaluations outright (default: ``evaluations`` minus stage 1's)."""
    beta_start: float | None = None
    """Where beta starts and is held in stage 1; None = 1/N for N sources."""
    l1: float = Field(0.05, ge=0)
    """Weight of ``mean |x|`` of the stage's variables added to the loss."""
    generic_sigma0: float = Field(0.2, gt=0, le=1)
    """Step as a fraction of each range on a problem without alpha or beta dimensions."""
    generic_popsize: int | None = Field(None, ge=2)
    """Popsize on such a problem; None = pycma's default ``4 + floor(3 ln n)``."""
    cma_options: dict[str, Any] = Field(default_factory=dict)
    """Further pycma options for both stages (see the cmaes strategy)."""

    @field_validator("cma_options")
    @classmethod
    def _known_pycma_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        return CMAESOptions._known_pycma_options(value)


@dataclass(frozen=True)
class _Stage:
    name: str  # "alpha", "beta" or "all"
    dims: tuple[int, ...]  # genome indices searched
    penalised: tuple[int, ...]  # genome indices whose mean |x| is penalised
    limit: int  # evaluations


@register
class EvoMerging(Strategy):
    """Two CMA-ES stages: alpha (beta at 1/N), then beta (alpha at stage 1's best)."""

    name = "evo_merging"
    description = ("Evo-Merging: CMA-ES over kept fractions, then over signed scales, "
                   "L1-penalised (single objective)")
    multi_objective = False
    kinds = frozenset({"real"})
    rng_libraries = ("cma", "numpy")
    Options = EvoMergingOptions
    options: EvoMergingOptions

    # -- building -------------------------------------------------------------------------

    def _setup(self) -> None:
        p, o = self.problem, self.options
        params = [_param(d.name) for d in p.dims]
        alpha = tuple(i for i, name in enumerate(params) if name == o.alpha)
        beta = tuple(i for i, name in enumerate(params) if name == o.beta)
        other = tuple(i for i in range(p.n_dims) if i not in alpha and i not in beta)
        self._start = p.x0.copy()
        if beta:
            n = len({s for i in beta for s in _SOURCE.findall(p.dims[i].name)}) or len(beta)
            value = 1.0 / n if o.beta_start is None else o.beta_start
            for i in beta:
                self._start[i] = min(max(value, p.dims[i].low), p.dims[i].high)
        self._stages = self._plan(alpha, beta, other)
        self._stage = 0
        self._best: tuple[float, np.ndarray] | None = None  # stage's best (loss, genome)
        self._fixed = self._start.copy()  # values of the dims the stage does not search
        self._asked = 0  # candidates asked in the stage
        self._inner_of: dict[int, int] = {}  # our candidate id -> the stage CMAES's id
        self._inner: CMAES | None = None
        self._alpha_best: list[float] | None = None
        self._begin()

    def _plan(self, alpha: tuple[int, ...], beta: tuple[int, ...],
              other: tuple[int, ...]) -> list[_Stage]:
        o = self.options
        if not alpha and not beta:
            return [_Stage("all", tuple(range(self.problem.n_dims)), (), o.evaluations)]
        if alpha and (beta or other):
            first = o.alpha_evaluations or max(1, round(o.alpha_share * o.evaluations))
            second = o.beta_evaluations or max(1, o.evaluations - first)
            return [_Stage("alpha", alpha, alpha, first),
                    _Stage("beta", tuple(sorted(beta + other)), beta, second)]
        if alpha:
            return [_Stage("alpha", alpha, alpha, o.alpha_evaluations or o.evaluations)]
        return [_Stage("beta", tuple(sorted(beta + other)), beta,
                       o.beta_evaluations or o.evaluations)]

    def _begin(self) -> None:
        """Start the current stage: a fresh CMA-ES over its dimensions, in the unit cube."""
        self._asked, self._best, self._inner_of = 0, None, {}
        if self.done:
            self._inner = None
            return
        stage = self._stages[self._stage]
        p = self.problem
        dims = tuple(Dimension(p.dims[i].name, p.dims[i].low, p.dims[i].high,
                               float(self._fixed[i])) for i in stage.dims)
        spans = np.array([d.high - d.low for d in dims])
        if stage.name == "all":
            unit = np.full(len(dims), self.options.generic_sigma0)
            popsize = self.options.generic_popsize
        else:
            unit = np.minimum(self.options.sigma0 / spans, 1.0)
            popsize = self.options.popsize
        sigma = float(unit.max())
        cma_options = dict(self.options.cma_options)
        if not np.allclose(unit, sigma):
            cma_options["CMA_stds"] = (unit / sigma).tolist()
        seed = int(np.random.SeedSequence([self.seed % 2**63, self._stage])
                   .generate_state(1)[0])
        self._inner = CMAES(Problem(dims, (Objective("loss", "minimize"),)),
                            {"sigma0": sigma, "popsize": popsize,
                             "cma_options": cma_options}, seed=seed)

    # -- reading ----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._stage >= len(self._stages)

    @property
    def stage(self) -> str | None:
        """The current stage: ``alpha``, ``beta``, ``all`` (a generic problem), None when done."""
        return None if self.done else self._stages[self._stage].name

    @property
    def stages(self) -> list[tuple[str, int]]:
        """Each stage's name and evaluations, in order."""
        return [(s.name, s.limit) for s in self._stages]

    @property
    def alpha_best(self) -> list[float] | None:
        """The genome stage 1 chose (alpha at its best, the rest as held), once it ended."""
        return self._alpha_best

    @property
    def fixed(self) -> list[float]:
        """The genome values the current stage holds (its own dimensions: their start)."""
        return [float(v) for v in self._fixed]

    # -- ask / tell -------------------------------------------------------------------------

    def _ask(self, n: int) -> list[Proposal]:
        self._advance()
        if self.done:
            return []
        stage = self._stages[self._stage]
        n = min(n, stage.limit - self._asked)
        if n <= 0:
            return []
        out = []
        for k, inner in enumerate(self._inner.ask(n)):
            genome = self._fixed.copy()
            genome[list(stage.dims)] = inner.genome
            self._inner_of[self._next_id + k] = inner.id
            out.append(Proposal(genome=self.problem.clip(genome), meta={"stage": stage.name}))
        self._asked += len(out)
        return out

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        stage = self._stages[self._stage] if not self.done else None
        results = []
        for cand, result in told:
            inner_id = self._inner_of.pop(cand.id, None)
            if inner_id is None:  # asked in an earlier stage (cannot happen: stages wait)
                continue
            if not result.ok:
                results.append(Result.failed(inner_id, result.reason or "failed"))
                continue
            x = np.asarray(cand.genome, dtype=float)
            loss = self.problem.scalar_loss(result.values)
            if stage.penalised:
                loss += self.options.l1 * float(np.mean(np.abs(x[list(stage.penalised)])))
            results.append(Result(inner_id, {"loss": loss}))
            if self._best is None or loss < self._best[0]:
                self._best = (loss, x)
        if results:
            self._inner.tell(results)
        self._advance()

    def _advance(self) -> None:
        """Move to the next stage once this one has spent its evaluations (or pycma
        converged) and every candidate it asked for is told."""
        while not self.done and not self._inner_of:
            stage = self._stages[self._stage]
            if self._asked < stage.limit and not self._inner.done:
                return
            if self._best is not None:
                chosen = self._best[1]
                self._fixed[list(stage.dims)] = chosen[list(stage.dims)]
            if stage.name == "alpha":
                self._alpha_best = [float(v) for v in self._fixed]
            self._stage += 1
            self._begin()


def _param(name: str) -> str:
    found = _PARAM.match(name)
    return found.group(1) if found else name

