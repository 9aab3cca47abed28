"""Optuna's TPE and NSGA-II samplers as mergesearch strategies.

Each strategy drives an in-memory ``optuna.Study`` through ``study.ask`` / ``study.tell``: one
distribution per dimension, named as the dimension (``FloatDistribution`` for real,
``IntDistribution`` for int and binary, ``CategoricalDistribution`` for categorical: every
variable type), one direction per objective,
failed candidates told as ``TrialState.FAIL``.  All the maths is Optuna's; faithful to
Optuna's samplers with the defaults given below.  Our choices: the problem's init point is
enqueued as the first trial (``include_init``), and Optuna's logging and experimental warnings
are silenced only while our calls run, not for the user's whole process.

Replay (the base class's state) is deterministic: each sampler draws from its own seeded
``RandomState``, the study lives in memory, and replay repeats the same ask/tell calls in the
same order.  Replay re-runs the sampler for every trial, which costs TPE about as much time as
the original search's sampling (not its evaluations).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState
from pydantic import Field

from mergesearch.strategies.base import Dimension, Strategy, StrategyOptions, register
from mergesearch.trial import Candidate, Result


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna at WARNING at most and without ExperimentalWarnings, for the duration of the
    block (not thread-safe, like ``warnings.catch_warnings``)."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def distribution(d: Dimension) -> BaseDistribution:
    """Optuna's distribution for a dimension (also how storage records its params)."""
    if d.kind == "categorical":
        return CategoricalDistribution(d.choices)
    if d.discrete:
        return IntDistribution(int(d.low), int(d.high))
    return FloatDistribution(d.low, d.high)


def genome_value(d: Dimension, value: Any) -> float:
    """An Optuna param value back in genome units (a categorical's choice -> its index)."""
    return float(d.choices.index(value)) if d.kind == "categorical" else float(value)


class OptunaOptions(StrategyOptions):
    include_init: bool = True
    """Enqueue the problem's init point as the first trial."""


class _OptunaStrategy(Strategy):
    """Shared adapter: a study in memory, one trial per candidate."""

    rng_libraries = ("optuna", "numpy")
    multi_objective = True
    options: OptunaOptions
    sampler_class: ClassVar[type[optuna.samplers.BaseSampler]]
    """The Optuna sampler; every option but ``include_init`` is one of its keywords."""

    def _sampler(self) -> optuna.samplers.BaseSampler:
        kwargs = self.options.model_dump(exclude=set(OptunaOptions.model_fields))
        return self.sampler_class(**kwargs, seed=self.seed)

    def _setup(self) -> None:
        p = self.problem
        self._distributions = {d.name: distribution(d) for d in p.dims}
        with _quiet_optuna():
            self._study = optuna.create_study(
                directions=[o.direction for o in p.objectives], sampler=self._sampler())
            if self.options.include_init:
                self._study.enqueue_trial({d.name: d.label(d.init) for d in p.dims})
        self._trials: dict[int, optuna.Trial] = {}

    @property
    def study(self) -> optuna.Study:
        """The in-memory study (read it, do not change it)."""
        return self._study

    def _ask(self, n: int) -> list[tuple[Sequence[float], float]]:
        out: list[tuple[Sequence[float], float]] = []
        with _quiet_optuna():
            for k in range(n):
                trial = self._study.ask(self._distributions)
                self._after_ask(trial)
                self._trials[self._next_id + k] = trial  # the id the base class will give it
                out.append(([genome_value(d, trial.params[d.name]) for d in self.problem.dims],
                            1.0))
        return out

    def _after_ask(self, trial: optuna.Trial) -> None:
        """Hook for sampler-specific bookkeeping of a new trial."""

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        with _quiet_optuna():
            for cand, result in told:
                trial = self._trials.pop(cand.id)
                if result.ok:
                    self._study.tell(trial, [result.values[o.name]
                                             for o in self.problem.objectives])
                else:
                    self._study.tell(trial, state=TrialState.FAIL)


class TPEOptions(OptunaOptions):
    n_startup_trials: int = Field(10, ge=0)
    """Random trials before the Parzen estimators take over."""
    multivariate: bool = True
    """Model the dimensions jointly (Falkner et al. 2018) rather than one by one."""
    constant_liar: bool = True
    """Treat pending trials as bad so a batch (or a busy cluster) spreads out (Optuna default)."""


@register
class TPE(_OptunaStrategy):
    """Tree-structured Parzen Estimator (Bergstra et al. 2011; MOTPE, Ozaki et al. 2020)."""

    name = "tpe"
    description = "Tree-structured Parzen Estimator (Optuna TPESampler), one or more objectives"
    Options = TPEOptions
    options: TPEOptions
    sampler_class = optuna.samplers.TPESampler


class NSGA2Options(OptunaOptions):
    population_size: int = Field(20, ge=2)
    """Individuals per generation."""
    mutation_prob: float | None = Field(None, ge=0, le=1)
    """Per-parameter mutation probability; None = Optuna's ``1 / n_dims``."""
    crossover_prob: float = Field(0.9, ge=0, le=1)
    """Probability that a child comes from crossover (uniform) rather than a copy."""


@register
class NSGA2(_OptunaStrategy):
    """NSGA-II (Deb et al. 2002): non-dominated sorting and crowding distance.

    Optuna's variant is steady-state friendly: a new trial joins the newest generation that
    has fewer than ``population_size`` *finished* members, so when many candidates are asked
    before any is told (a busy cluster) early generations hold more than ``population_size``.
    """

    name = "nsga2"
    description = "NSGA-II genetic algorithm (Optuna NSGAIISampler), Pareto front of objectives"
    Options = NSGA2Options
    options: NSGA2Options
    sampler_class = optuna.samplers.NSGAIISampler

    def _after_ask(self, trial: optuna.Trial) -> None:
        # Optuna gives a trial its generation only when the sampler samples it, so the
        # enqueued init point (all parameters fixed) would belong to no population and never
        # become a parent.  Assigning it a generation here fixes that.
        if trial.number == 0 and self.options.include_init:
            frozen = self._study.get_trials(deepcopy=False)[0]
            self._study.sampler.get_trial_generation(self._study, frozen)
