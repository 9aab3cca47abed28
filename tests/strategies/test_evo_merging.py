"""Evo-Merging's two CMA-ES stages: stage 1 moves only alpha (beta held at 1/N), stage 2
only beta (alpha fixed at stage 1's best by the penalised loss); the split, the step in
the variables' units, resume mid-stage-2, the experiment files, and a killed
``mergesearch run`` resumed in stage 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import kill_mid_run

from mergesearch.strategies import Dimension, Objective, Problem
from mergesearch.strategies.evo_merging import EvoMerging
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("a", "b", "c", "d")
TARGET = np.array([0.6, 0.2, 0.9, 0.4, 0.8, -0.9, 0.3, 0.1, 1.2])  # alphas, betas, lambda


def evo_problem(with_lambda: bool = True) -> Problem:
    dims = [Dimension(f"density[{s}]", 0.0, 1.0, 1.0) for s in SOURCES]
    dims += [Dimension(f"weight[{s}]", -1.5, 1.5, 0.7) for s in SOURCES]  # init is not 1/N
    if with_lambda:
        dims.append(Dimension("lambda", 0.0, 2.0, 1.0))
    return Problem(tuple(dims), (Objective("ce", "maximize"),))


def ce(x: np.ndarray) -> dict[str, float]:
    """A 'log-probability' (maximised): minus a quadratic loss around TARGET."""
    return {"ce": -float(np.sum((x - TARGET[: len(x)]) ** 2))}


def drive(s: EvoMerging, budget: int, batch: int = 7, fail=lambda i: False):
    history = []
    while len(history) < budget:
        cands = s.ask(min(batch, budget - len(history)))
        if not cands:
            assert not s.pending
            break
        for c in cands:
            r = Result.failed(c.id, "x") if fail(c.id) else Result(c.id, ce(np.array(c.genome)))
            history.append((c, r))
        s.tell(r for _, r in history[-len(cands):])
    return history


OPTIONS = {"popsize": 10, "evaluations": 60}  # stage 1: 20, stage 2: 40


def test_stage_one_moves_alpha_only_and_stage_two_beta_with_alpha_fixed():
    p = evo_problem()
    s = EvoMerging(p, OPTIONS, seed=3)
    assert s.stages == [("alpha", 20), ("beta", 40)] and s.stage == "alpha"
    history = drive(s, 100, fail=lambda i: i in (4, 33))
    assert len(history) == 60 and s.done and s.ask(3) == []
    g = np.array([c.genome for c, _ in history])
    stages = [c.meta["stage"] for c, _ in history]
    assert stages == ["alpha"] * 20 + ["beta"] * 40
    first, second = g[:20], g[20:]
    # stage 1: every beta at 1/N = 0.25 (not the space's init 0.7), lambda at its init
    assert np.all(first[:, 4:8] == 0.25) and np.all(first[:, 8] == 1.0)
    assert len({tuple(row) for row in first[:, :4]}) == 20
    # stage 1's best by the penalised loss: -ce + 0.05 * mean(alpha), failures excluded
    ok = [i for i in range(20) if history[i][1].ok]
    penalised = [-history[i][1].values["ce"] + 0.05 * first[i, :4].mean() for i in ok]
    best = first[ok[int(np.argmin(penalised))]]
    assert s.alpha_best == list(best)
    # stage 2: alpha fixed at that best; beta and lambda searched
    assert np.all(second[:, :4] == best[:4])
    assert len({tuple(row) for row in second[:, 4:]}) == 40
    # ... from beta = 1/N with the paper's absolute step 0.05 (sigma 0.05 / 3 in the cube)
    gen = second[:10, 4:8]
    assert abs(gen.mean() - 0.25) < 0.05 and 0.02 < gen.std() < 0.1
    assert 0.02 < second[:10, 8].std() < 0.1  # lambda: the same step in its own units


def test_the_penalty_moves_stage_one_to_sparser_alphas():
    """With a flat objective only the L1 term ranks stage 1: mean alpha must drop."""
    p = evo_problem(with_lambda=False)
    s = EvoMerging(p, {"popsize": 10, "alpha_evaluations": 100, "beta_evaluations": 10,
                       "l1": 1.0}, seed=0)
    history = []
    while len(history) < 100:
        cands = s.ask(10)
        s.tell(Result(c.id, {"ce": 0.0}) for c in cands)
        history += cands
    alphas = np.array([c.genome[:4] for c in history])
    assert alphas[-10:].mean() < alphas[:10].mean() - 0.05
    assert s.stage == "beta"


def test_split_options_and_problems_without_one_kind():
    p = evo_problem()
    assert EvoMerging(p).stages == [("alpha", 400), ("beta", 800)]  # the paper's
    assert EvoMerging(p, {"evaluations": 90}).stages == [("alpha", 30), ("beta", 60)]
    assert EvoMerging(p, {"alpha_evaluations": 5, "evaluations": 50}).stages == \
        [("alpha", 5), ("beta", 45)]
    assert EvoMerging(p, {"alpha": "weight", "beta": "density"}).stages[0] == ("alpha", 400)
    only_beta = Problem(evo_problem().dims[4:8], evo_problem().objectives)
    s = EvoMerging(only_beta, {"evaluations": 30, "popsize": 6})
    assert s.stages == [("beta", 30)]
    history = drive(s, 40)
    assert len(history) == 30 and s.done
    assert all(c.genome != [0.25] * 4 for c, _ in history)  # searched around 1/N
    generic = Problem((Dimension("x", -1, 1, 0.0), Dimension("y", -1, 1, 0.0)),
                      (Objective("loss", "minimize"),))
    s = EvoMerging(generic, {"evaluations": 12})
    assert s.stages == [("all", 12)]
    assert s.ask(20)[0].meta == {"stage": "all"}


def test_resume_mid_stage_two_from_the_state():
    p = evo_problem()
    s = EvoMerging(p, OPTIONS, seed=11)
    drive(s, 33, batch=4, fail=lambda i: i % 9 == 5)
    asked = s.ask(3)
    s.tell([Result(asked[0].id, ce(np.array(asked[0].genome)))])  # two left pending
    assert s.stage == "beta" and len(s.pending) == 2
    state = json.loads(json.dumps(s.state_dict()))
    t = EvoMerging(p, seed=999)  # options and seed come from the state
    t.load_state_dict(state)
    assert (t.stage, t.alpha_best, t.fixed, t.pending) == (s.stage, s.alpha_best, s.fixed,
                                                           s.pending)
    for c in s.pending:
        s.tell([Result(c.id, ce(np.array(c.genome)))])
        t.tell([Result(c.id, ce(np.array(c.genome)))])
    a, b = drive(s, 100), drive(t, 100)
    assert [c for c, _ in a] == [c for c, _ in b] and s.done and t.done
    assert s.state_dict() == t.state_dict()


# -- experiment files -----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["experiments/zoo/evo_merging.yaml",
                                  "experiments/hard/evo_merging.yaml",
                                  "experiments/cluster/evo_merging_lora.yaml"])
def test_experiment_files_validate(path):
    from mergesearch.experiment import Experiment
    from mergesearch.spaces.parameters import SpaceConfig

    exp = Experiment.load(ROOT / path)
    assert exp.strategy.name == "evo_merging"
    options = EvoMerging.parse_options(exp.strategy.options)
    if exp.budget.evaluations is not None:  # both stages fit the budget
        assert options.evaluations == exp.budget.evaluations
    space = exp.find(exp.space) if isinstance(exp.space, str) else exp.space
    config = SpaceConfig.load(space)
    assert set(config.parameters) == {options.alpha, options.beta}
    assert config.parameters[options.beta].bounds == (-1.5, 1.5)
    assert config.parameters[options.alpha].bounds == (0.0, 1.0)
    assert [o.metric for o in exp.evaluator.objectives] == ["answer_logprob"]


# -- a killed run resumes in stage 2 ----------------------------------------------------------

def _experiment(tmp_path: Path, name: str) -> Path:
    data = yaml.safe_load((ROOT / "experiments/zoo/evo_merging.yaml").read_text())
    data |= {"name": name, "output": str(tmp_path / name),
             "storage": f"sqlite:///{tmp_path / (name + '.db')}",
             "budget": {"evaluations": 24}}
    data["space"] = str(ROOT / data["space"])
    data["evaluator"] |= {"suite": str(ROOT / "evaluators/zoo"), "limit": 8}
    # the import path registers the strategy whether or not the package lists it yet
    data["strategy"] = {"name": "mergesearch.strategies.evo_merging:EvoMerging",
                        "options": {"popsize": 4, "evaluations": 24}}  # 8 + 16
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
def test_killed_in_stage_two_it_resumes_there(zoo, tmp_path):
    from mergesearch.cli import main
    from mergesearch.experiment import Experiment
    from mergesearch.storage import TrialStore

    whole = _experiment(tmp_path, "whole")
    assert main(["run", str(whole), "-q"]) == 0
    path = _experiment(tmp_path, "killed")
    exp = Experiment.load(path)
    db = Path(exp.storage_url.removeprefix("sqlite:///"))
    kill_mid_run(path, db, 8 + 3)  # all of stage 1 and three trials of stage 2
    before = TrialStore.open(exp.storage_url, "killed").trials()
    assert 11 <= len(before) < 24
    assert main(["run", str(path), "--resume", "-q"]) == 0
    after = TrialStore.open(exp.storage_url, "killed").trials()
    reference = TrialStore.open(Experiment.load(whole).storage_url, "whole").trials()
    assert sorted(t.candidate_id for t in after) == list(range(24))
    by_id = {t.candidate_id: t for t in after}
    for t in reference:  # the same candidates as the run nobody killed
        assert by_id[t.candidate_id].params == t.params, t.candidate_id
        assert by_id[t.candidate_id].meta == t.meta == \
            {"stage": "alpha" if t.candidate_id < 8 else "beta"}
