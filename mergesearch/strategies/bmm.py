"""BMM's outer loop: Gaussian-process Bayesian optimisation of the inner merge's
hyperparameters (Bayesian Model Merging, 2026).

BMM merges each linear module in closed form (the ``bmm`` merge method,
:mod:`mergesearch.merging.bmm`: ridge regression toward an anchor merge) and tunes
that merge's hyperparameters, per group of modules, by Bayesian optimisation on a
small validation set.  Here the hyperparameters are whatever the search space makes
vary, typically ``lambda`` (ridge strength) and ``scale`` (the merged change's scale)
per layer group and module kind (``search_spaces/bmm*.yaml``); this strategy is the
BO over them and works on any space.

Library: Optuna's ``GPSampler`` (Matern-5/2 ARD kernel, hyperparameters by marginal
likelihood with priors, log expected improvement; qLogEI greedily over candidates
still running), driven like the other Optuna
samplers (:mod:`mergesearch.strategies.optuna_samplers`: an in-memory study, ask /
tell, the init point enqueued first).  Why not BoTorch: the paper names neither
library nor acquisition; Optuna's sampler is already a core dependency (BoTorch is
the optional ``bo`` extra), handles every variable kind, and its batch acquisition
over running trials fits our asynchronous workers.  Replay re-fits the GP for every
trial (deterministic on one machine: seeded sampler, float64 CPU maths).

One objective, as in the paper: several are scalarised with their weights
(:meth:`~mergesearch.strategies.base.Problem.scalar_loss`, minimised).
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState
from pydantic import Field

from mergesearch.strategies.base import register
from mergesearch.strategies.optuna_samplers import (
    OptunaOptions,
    _OptunaStrategy,
    _quiet_optuna,
    distribution,
)
from mergesearch.trial import Candidate, Result


class BMMOptions(OptunaOptions):
    n_startup_trials: int = Field(8, ge=1)
    """Random (Sobol-free, independent) trials before the GP takes over (the init point
    counts as one)."""
    deterministic_objective: bool = False
    """Fix the GP's noise near zero; off by default, since scores on item subsets are
    step functions of the hyperparameters, which a noise term smooths."""


@register
class BMM(_OptunaStrategy):
    """Gaussian-process BO (Optuna GPSampler) over the inner merge's hyperparameters."""

    name = "bmm"
    description = ("BMM outer loop: Gaussian-process Bayesian optimisation (Optuna "
                   "GPSampler, log EI) of per-module merge hyperparameters")
    Options = BMMOptions
    options: BMMOptions
    multi_objective = False
    rng_libraries = ("optuna", "numpy", "torch", "scipy")
    sampler_class = optuna.samplers.GPSampler

    def _setup(self) -> None:
        p = self.problem
        self._distributions = {d.name: distribution(d) for d in p.dims}
        with _quiet_optuna():
            self._study = optuna.create_study(direction="minimize", sampler=self._sampler())
            if self.options.include_init:
                self._study.enqueue_trial({d.name: d.label(d.init) for d in p.dims})
        self._trials: dict[int, optuna.Trial] = {}

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        with _quiet_optuna():
            for cand, result in told:
                trial = self._trials.pop(cand.id)
                if result.ok:
                    self._study.tell(trial, self.problem.scalar_loss(result.values))
                else:
                    self._study.tell(trial, state=TrialState.FAIL)

    def _sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.GPSampler(
            seed=self.seed, n_startup_trials=self.options.n_startup_trials,
            deterministic_objective=self.options.deterministic_objective,
            independent_sampler=optuna.samplers.RandomSampler(seed=self.seed),
            warn_independent_sampling=False)
