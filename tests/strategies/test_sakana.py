"""Sakana's PS and DFS strategies: the paper's settings, the real-valued indicators of the
data-flow search, DFS on the hard zoo's hand-over pair, and PS + DFS killed mid-stage."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import kill_mid_run, zoo_experiment

from mergesearch.strategies import Dimension, Objective, Problem, StrategyError, create_strategy
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[2]


def told(cands, loss=lambda g: float(np.sum(g))):
    return [Result(candidate_id=c.id, values={"loss": loss(np.array(c.genome))}) for c in cands]


def real_problem(n: int) -> Problem:
    return Problem(tuple(Dimension(f"x{i}", 0.0, 1.0, 0.5) for i in range(n)),
                   (Objective("loss", "minimize"),))


def test_ps_has_the_papers_settings_and_scores_its_start_first():
    s = create_strategy("sakana_ps", real_problem(28))
    assert s.options.sigma0 == pytest.approx(1 / 6)
    assert s.popsize == 4 + math.floor(3 * math.log(28)) == 13
    first = s.ask(20)
    assert len(first) == 1 + 13 and first[0].genome == [0.5] * 28  # the start, then gen 1
    spread = np.std([c.genome for c in first[1:]], axis=0).mean()
    assert 0.08 < spread < 0.25  # sigma0 = 1/6 of each range, clipped to the bounds
    s.tell(told(first[1:]))  # the generation is complete without the start point's result
    assert s.generation == 1 and len(s.ask(20)) == 13
    s.tell(told(first[:1]))  # told late: it is no generation's member
    off = create_strategy("sakana_ps", real_problem(4), {"include_init": False}).ask(20)
    assert [0.5] * 4 not in [c.genome for c in off]


def path_problem(on: int = 3, off: int = 10) -> Problem:
    dims = [Dimension.binary(f"path{i}", 1 if i < on else 0) for i in range(on + off)]
    dims += [Dimension(f"scale{i}", 0.5, 2.0, 1.0) for i in range(on + off)]
    return Problem(tuple(dims), (Objective("loss", "minimize"),))


@pytest.mark.parametrize(("off_init", "low", "high"), [(0.0, 0.35, 0.65), (-1.5, 0.0, 0.12)])
def test_dfs_indicators_are_real_and_a_slot_is_on_above_zero(off_init, low, high):
    p = path_problem()
    s = create_strategy("sakana_dfs", p, {"popsize": 40, "off_init": off_init})
    start, *gen = s.ask(40)
    assert start.genome == list(p.x0)  # model A alone
    paths = np.array([c.genome[:13] for c in gen])
    assert set(np.unique(paths)) <= {0.0, 1.0}
    assert paths[:, :3].mean() > 0.9  # A's slots start on (indicator 1)
    assert low <= paths[:, 3:].mean() <= high  # the paper's 0: each off slot is a coin flip
    assert all(p.dims[13].low <= g <= p.dims[13].high for c in gen for g in c.genome[13:])


def test_dfs_options_are_checked():
    with pytest.raises(StrategyError, match="must contain 0"):
        create_strategy("sakana_dfs", path_problem(), {"indicator_bounds": [0.5, 2.0]})
    with pytest.raises(StrategyError, match="an off slot starts off"):
        create_strategy("sakana_dfs", path_problem(), {"off_init": 0.5})
    typed = Problem((Dimension.integer("k", 0, 3),), (Objective("loss", "minimize"),))
    with pytest.raises(StrategyError, match="sakana_dfs searches binary, real variables only"):
        create_strategy("sakana_dfs", typed)


@pytest.mark.slow
def test_dfs_finds_a_path_through_the_hand_over_pair_that_beats_both(hard_zoo, tmp_path):
    """flow_a and flow_b are the two halves of one fine-tune: neither alone is better than
    the base, a path through both can be."""
    from mergesearch.controller import run
    from mergesearch.evaluation.rescore import rescore
    from mergesearch.experiment import Experiment
    from mergesearch.report import choose

    exp = Experiment.load(ROOT / "experiments/hard/sakana_dfs.yaml",
                          ["budget.evaluations=24", f"output={tmp_path / 'run'}"])
    summary = run(exp, progress=False)
    best = choose(summary.front, summary.objectives)
    alone = {n: rescore(hard_zoo.model_path(n), exp).values["mean"]
             for n in ("flow_a", "flow_b")}
    assert best.values["mean"] > max(alone.values()) + 0.01, (best.values, alone)
    models = {h["model"] for h in best.recipe["layer_path"]}
    assert models == {str(hard_zoo.model_path("flow_a")), str(hard_zoo.model_path("flow_b"))}


@pytest.mark.slow
def test_ps_then_dfs_killed_in_each_stage_resumes_where_it_was(zoo, tmp_path):
    from mergesearch.cli import main
    from mergesearch.storage import TrialStore

    base = zoo_experiment(tmp_path).model_dump(mode="json", exclude={"space", "strategy"})
    data = base | {"budget": {"evaluations": 8}, "stages": [
        {"name": "ps", "space": "search_spaces/dare_ties_layer_groups.yaml",
         "strategy": {"name": "sakana_ps", "options": {"popsize": 5}}},
        {"name": "dfs", "space": {"kind": "layer_path", "models": ["ps", "rev"], "repeats": 2},
         "strategy": {"name": "sakana_dfs", "options": {"popsize": 4}},
         "budget": {"evaluations": 12}, "sources_from": {"ps": "ps"}}]}
    path = tmp_path / "ps_dfs.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    db = tmp_path / "run" / "study.db"
    url = f"sqlite:///{db}"
    kill_mid_run(path, db, 3)  # inside PS's first generation (the start point, then 5)
    kill_mid_run(path, db, 8 + 3, "--resume")  # PS resumed and done, then inside DFS
    ps = [(t.number, t.params) for t in TrialStore.open(url, "t.ps").trials()]
    assert len(ps) == 8
    killed = {t.candidate_id: t.params for t in TrialStore.open(url, "t.dfs").trials()}
    assert main(["run", str(path), "--resume", "-q"]) == 0
    assert [(t.number, t.params) for t in TrialStore.open(url, "t.ps").trials()] == ps
    dfs = TrialStore.open(url, "t.dfs").trials()
    assert sorted(t.candidate_id for t in dfs) == list(range(12))
    assert all(killed[t.candidate_id] == t.params for t in dfs if t.candidate_id in killed)
    # both stages propose what one uninterrupted run proposes
    data["output"] = str(tmp_path / "again")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["run", str(path), "-q"]) == 0
    again = f"sqlite:///{tmp_path / 'again' / 'study.db'}"
    for stage, trials in (("ps", None), ("dfs", dfs)):
        trials = trials or TrialStore.open(url, "t.ps").trials()
        whole = TrialStore.open(again, f"t.{stage}").trials()
        assert sorted((t.candidate_id, t.params) for t in whole) == \
            sorted((t.candidate_id, t.params) for t in trials), stage
