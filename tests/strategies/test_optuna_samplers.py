"""Optuna adapters: the study they keep, options reaching the samplers, quietness."""

from __future__ import annotations

import logging
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from mergesearch.strategies import NSGA2, TPE
from mergesearch.trial import Result

from .test_conformance import MIXED, ZDT, drive, mixed, zdt1


@pytest.mark.parametrize("cls", [TPE, NSGA2])
def test_study_mirrors_the_search(cls) -> None:
    s = cls(MIXED, seed=0)
    history = drive(s, mixed, 12, batches=(3,), fail=lambda i: i == 4)
    study = s.study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = study.get_trials()
    assert len(trials) == 12
    for (cand, res), trial in zip(history, trials, strict=True):
        assert [trial.params[d.name] for d in MIXED.dims] == cand.genome
        if res.ok:
            assert trial.values == [res.values["acc"], res.values["size"]]
        else:
            assert trial.state == TrialState.FAIL


def test_options_reach_the_samplers() -> None:
    tpe = TPE(MIXED, {"n_startup_trials": 3, "multivariate": False, "constant_liar": False},
              seed=5).study.sampler
    assert (tpe._n_startup_trials, tpe._multivariate, tpe._constant_liar) == (3, False, False)
    nsga = NSGA2(ZDT, {"population_size": 8, "crossover_prob": 0.5}, seed=5).study.sampler
    assert nsga._population_size == 8


def test_nsga2_population_size_sets_the_generations() -> None:
    """Asked one at a time, generations hold ``population_size`` trials, the init point
    (an enqueued trial Optuna does not sample) included."""
    s = NSGA2(ZDT, {"population_size": 8}, seed=0)
    drive(s, zdt1, 24, batches=(1,))
    gens = [t.system_attrs.get("NSGAIISampler:generation") for t in s.study.get_trials()]
    assert gens == [0] * 8 + [1] * 8 + [2] * 8


@pytest.mark.parametrize("cls", [TPE, NSGA2])
def test_quiet_and_restores_the_users_logging(cls, capfd) -> None:
    optuna.logging.set_verbosity(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = cls(MIXED, seed=0)
            drive(s, mixed, 15, batches=(5,))
            s.tell([Result.failed(c.id, "x") for c in s.ask(2)])
        assert optuna.logging.get_verbosity() == logging.DEBUG
    finally:
        optuna.logging.set_verbosity(logging.INFO)
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    out, err = capfd.readouterr()
    assert "Trial" not in out + err
