"""merge_moea: the random-forest surrogate, the search on a toy categorical score-vs-storage
problem against random search, the recorded rounds of its state, a SIGKILL resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from pymoo.indicators.hv import HV

import mergesearch.strategies.merge_moea  # noqa: F401  (registers merge_moea)
from mergesearch.strategies import Dimension, Objective, Problem, create_strategy
from mergesearch.strategies.merge_moea import MergeMOEA, Surrogate
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[2]

# A toy MERGE problem, no models: 8 blocks, each "merged" (index 4, the start) or one of
# four experts.  Storage is 8 + the blocks taken from an expert; the score gains from the
# right expert in some blocks and loses from the wrong ones, with one pairwise synergy.
BLOCKS, CHOICES = 8, ("a", "b", "c", "d", "merged")
GAIN = np.array([[0.30, -0.20, -0.10, -0.25, 0.0],
                 [-0.10, 0.25, -0.15, -0.20, 0.0],
                 [-0.20, -0.05, -0.30, 0.20, 0.0],
                 [-0.15, -0.10, -0.20, -0.05, 0.0],
                 [0.10, -0.25, 0.15, -0.10, 0.0],
                 [-0.30, -0.15, -0.10, -0.20, 0.0],
                 [-0.05, 0.12, -0.25, -0.15, 0.0],
                 [-0.20, -0.30, 0.08, -0.10, 0.0]])
TOY = Problem(tuple(Dimension.categorical(f"blk{i}", CHOICES, "merged") for i in range(BLOCKS)),
              (Objective("score", "maximize"), Objective("storage", "minimize")))
TOY_REF = np.array([-0.0, BLOCKS * 2 + 1.0])  # losses: -score, storage


def toy(genome) -> dict[str, float]:
    g = np.asarray(genome, dtype=int)
    score = float(GAIN[np.arange(BLOCKS), g].sum()) + 0.5
    if g[0] == 0 and g[1] == 1:  # a synergy the additive part does not show
        score += 0.2
    return {"score": score, "storage": float(BLOCKS + np.count_nonzero(g != 4))}


def drive(strategy, budget: int, batch: int = 4) -> list[dict[str, float]]:
    values = []
    while len(values) < budget:
        cands = strategy.ask(min(batch, budget - len(values)))
        strategy.tell(Result(c.id, toy(c.genome)) for c in cands)
        values += [toy(c.genome) for c in cands]
    return values


def front(values: list[dict[str, float]]) -> np.ndarray:
    pts = np.unique(np.array([TOY.losses(v) for v in values]), axis=0)
    keep = [not np.any(np.all(pts <= p, axis=1) & np.any(pts < p, axis=1)) for p in pts]
    return pts[keep]


def test_the_forest_predicts_held_out_points_better_than_a_constant() -> None:
    rng = np.random.default_rng(0)
    s = MergeMOEA(TOY, seed=0)
    genomes = rng.integers(0, len(CHOICES), size=(140, BLOCKS)).astype(float)
    losses = np.array([TOY.losses(toy(g)) for g in genomes])
    train, test = slice(0, 100), slice(100, None)
    model = Surrogate.fit(s.encode(genomes[train]), losses[train], seed=1)
    predicted = model.predict_losses(s.encode(genomes[test]))
    constant = losses[train].mean(axis=0)
    for j, (name, share) in enumerate((("score", 0.7), ("storage", 0.5))):
        mse = np.mean((predicted[:, j] - losses[test, j]) ** 2)
        baseline = np.mean((constant[j] - losses[test, j]) ** 2)
        assert mse < share * baseline, (name, mse, baseline)
    # the trees disagree more far from the data than on it
    _, sd_train = model.predict(s.encode(genomes[train]))
    _, sd_test = model.predict(s.encode(genomes[test]))
    assert sd_test.mean() > sd_train.mean()


def storage(genome) -> float:
    return toy(genome)["storage"]


EXACT = Problem(TOY.dims, TOY.objectives, exact={"storage": storage})


def test_a_recipe_objective_is_computed_not_modelled() -> None:
    s = MergeMOEA(EXACT, seed=0)
    rng = np.random.default_rng(1)
    genomes = rng.integers(0, len(CHOICES), size=(60, BLOCKS)).astype(float)
    s._X = [list(g) for g in genomes[:40]]
    s._Y = [TOY.losses(toy(g)) for g in genomes[:40]]
    model = s.fit()
    assert model.forests[0] is not None and model.forests[1] is None  # no storage forest
    mu, sd = s.predict(model, genomes[40:])
    assert np.allclose(mu[:, 1] * model.std[1] + model.mean[1],
                       [storage(g) for g in genomes[40:]])  # exactly, in loss units
    assert np.all(sd[:, 1] == 0) and np.all(sd[:, 0] >= 0) and sd[:, 0].max() > 0
    modelled = MergeMOEA(EXACT, {"exact_objectives": False}, seed=0)
    modelled._X, modelled._Y = s._X, s._Y
    m2 = modelled.fit()
    assert m2.forests[1] is not None
    _, sd2 = modelled.predict(m2, genomes[40:])
    assert sd2[:, 1].max() > 0  # the forest's guess, with its spread


def test_exact_values_must_name_an_objective() -> None:
    from mergesearch.strategies import StrategyError

    with pytest.raises(StrategyError, match="'size', which is not an objective"):
        Problem(TOY.dims, TOY.objectives, exact={"size": storage})


def test_one_hot_encoding_and_scaled_reals() -> None:
    problem = Problem((Dimension.categorical("c", ["x", "y", "z"]), Dimension("r", -1.0, 3.0, 0.0),
                       Dimension.integer("k", 2, 6), Dimension.binary("b")),
                      (Objective("loss", "minimize"),))
    s = MergeMOEA(problem)
    assert s.encode([[2, 1.0, 3, 1]]).tolist() == [[0, 0, 1, 0.5, 0.25, 1]]


def test_starts_at_the_merge_then_spans_the_storage_axis() -> None:
    s = MergeMOEA(TOY, {"initial": 10}, seed=3)
    first = s.ask(10)
    assert first[0].genome == [4.0] * BLOCKS and first[0].meta == {"phase": "initial"}
    changed = [sum(g != 4 for g in c.genome) for c in first[1:]]
    assert min(changed) <= 2 and max(changed) >= 6  # few to many expert blocks
    assert len({tuple(c.genome) for c in first}) == 10


@pytest.mark.slow
def test_hypervolume_beats_random_at_equal_budget() -> None:
    hv = HV(ref_point=TOY_REF)
    mine, modelled, theirs, sizes = [], [], [], []
    for seed in (0, 1, 2):
        values = drive(create_strategy("merge_moea", EXACT, seed=seed), 48)
        mine.append(hv(front(values)))
        sizes.append(len(front(values)))
        modelled.append(hv(front(drive(create_strategy("merge_moea", TOY, seed=seed), 48))))
        theirs.append(hv(front(drive(create_strategy("random", TOY, seed=seed), 48))))
    assert all(m > t for m, t in zip(mine, theirs, strict=True)), (mine, theirs)
    assert np.mean(mine) > np.mean(theirs) + 0.1, (mine, theirs)
    assert min(sizes) >= 3  # a Pareto set trading score against storage
    # storage computed from the genome, not modelled: a larger hypervolume on every seed
    assert all(m > t for m, t in zip(mine, modelled, strict=True)), (mine, modelled)


def test_infill_candidates_hold_the_fronts_one_change_neighbours() -> None:
    s = MergeMOEA(TOY, {"neighbours": 1000}, seed=0)
    merged, one, worse = [4.0] * BLOCKS, [0.0] + [4.0] * 7, [1.0] + [4.0] * 7
    X = np.array([merged, one, worse])
    Y = np.array([TOY.losses(toy(g)) for g in X])  # worse is dominated by merged
    s._seen = {tuple(g) for g in X}
    got = s._neighbours(X, Y)
    expected = set()
    for g in (merged, one):
        for j in range(BLOCKS):
            for v in range(len(CHOICES)):
                if v != g[j]:
                    expected.add(tuple(g[:j] + [float(v)] + g[j + 1:]))
    expected -= s._seen
    assert len(got) == len(set(map(tuple, got))) == len(expected)
    assert set(map(tuple, got)) == expected
    capped = MergeMOEA(TOY, {"neighbours": 5}, seed=0)
    capped._seen = set(s._seen)
    few = capped._neighbours(X, Y)
    assert len(few) == 5 and set(map(tuple, few)) <= expected
    assert MergeMOEA(TOY, {"neighbours": 0})._neighbours(X, Y) == []


def test_a_round_takes_at_most_a_quarter_of_its_batch_from_the_neighbours() -> None:
    s = create_strategy("merge_moea", TOY, {"initial": 6, "batch": 8, "generations": 3,
                                            "pop_size": 8, "neighbours": 256}, seed=1)
    _asked(s, 16)  # two whole rounds: the next ask runs a surrogate round
    local, fresh = set(), set()
    candidates_of, fresh_of = s._candidates, s._fresh

    def only_neighbours(*args):  # every infill candidate is a neighbour of the front
        candidates, start = candidates_of(*args)
        local.update(map(tuple, candidates[start:]))
        return candidates[start:], 0

    def recorded(*args):
        genome = fresh_of(*args)
        fresh.add(tuple(genome))
        return genome

    s._candidates, s._fresh = only_neighbours, recorded
    batch = [tuple(c.genome) for c in s.ask(8)]
    assert len(local) > 8
    picked = [g for g in batch if g not in fresh]
    assert len(picked) == 2 and set(picked) <= local  # 8 // 4; the rest perturbations


def test_never_proposes_a_genome_twice() -> None:
    s = create_strategy("merge_moea", TOY, {"initial": 6, "generations": 5}, seed=2)
    seen = [tuple(c) for c in [x.genome for x in _asked(s, 30)]]
    assert len(set(seen)) == len(seen)


def _asked(s, budget):
    out = []
    while len(out) < budget:
        cands = s.ask(4)
        s.tell(Result(c.id, toy(c.genome)) for c in cands)
        out += cands
    return out


def test_recorded_rounds_replay_as_a_recomputation_would() -> None:
    """The state's recorded rounds only save time: stripping them and replaying the log
    from the seed gives the same pending candidates and the same next proposals."""
    opts = {"initial": 6, "generations": 6, "pop_size": 16}
    s = create_strategy("merge_moea", TOY, opts, seed=4)
    _asked(s, 16)
    s.ask(3)
    state = json.loads(json.dumps(s.state_dict()))
    assert len(state["rounds"]) >= 4 and any(r["phase"] == "surrogate" for r in state["rounds"])
    fast, slow = (create_strategy("merge_moea", TOY, opts, seed=0) for _ in range(2))
    fast.load_state_dict(state)
    slow.load_state_dict({k: v for k, v in state.items() if k != "rounds"})
    assert fast.pending == slow.pending == s.pending
    assert fast.state_dict() == slow.state_dict() == state
    for c in s.pending:
        for t in (s, fast, slow):
            t.tell([Result(c.id, toy(c.genome))])
    assert s.ask(5) == fast.ask(5) == slow.ask(5)


@pytest.mark.slow
def test_sigkill_mid_search_then_resume_continues_the_same_search(zoo, tmp_path) -> None:
    from helpers import completed_count, kill_mid_run

    from mergesearch import controller
    from mergesearch.experiment import Experiment
    from mergesearch.storage import TrialStore

    data = yaml.safe_load((ROOT / "experiments" / "zoo" / "merge_moea.yaml").read_text())
    data["evaluator"]["limit"] = 16
    data["strategy"]["options"] = {"initial": 4, "batch": 2, "generations": 5, "pop_size": 12}
    data["budget"] = {"evaluations": 10}
    data["output"] = str(tmp_path / "run")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    db = tmp_path / "run" / "study.db"
    kill_mid_run(path, db, 7)  # inside the surrogate rounds
    assert 7 <= completed_count(db) < 10
    url = f"sqlite:///{db}"
    killed = {t.candidate_id: t.params for t in TrialStore.open(url, data["name"]).trials()}
    controller.run(Experiment.load(path), resume=True, progress=False)
    trials = TrialStore.open(url, data["name"]).trials()
    ok = [t for t in trials if t.state == "ok"]
    assert sorted(t.candidate_id for t in ok) == list(range(10))
    assert all(killed[t.candidate_id] == t.params for t in ok if t.candidate_id in killed)
    # one uninterrupted run proposes the same candidates
    data["output"] = str(tmp_path / "whole")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    controller.run(Experiment.load(path), progress=False)
    whole = TrialStore.open(f"sqlite:///{tmp_path / 'whole' / 'study.db'}", data["name"])
    assert {t.candidate_id: t.params for t in ok} == \
        {t.candidate_id: t.params for t in whole.trials() if t.state == "ok"}
    assert len(whole.pareto_front()) >= 2
