"""MM-MO: its pieces (top-k ranking, DE/rand/1/bin repair, Fisher screening) checked against
independent computations, the missing-extra message, the native state (resume without
refitting the history, the same next proposals, the user's torch RNG untouched), the
hypervolume against random search on a toy problem, and a SIGKILL mid-run then resume."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import mergesearch.strategies.mm_mo as mm_mo  # registers mm_mo
from mergesearch.errors import MissingExtra
from mergesearch.strategies import Dimension, Objective, Problem, StrategyError, create_strategy
from mergesearch.strategies.mm_mo import MMMO, de_repair, fisher_screen, rank_top
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[2]

#: cheap settings: every model round fits and optimises in about a second
CHEAP = {"initial": 4, "batch_size": 3, "pool": 3, "num_restarts": 1, "raw_samples": 16,
         "mc_samples": 16}

TOY = Problem((Dimension("a", 0.0, 1.0, 0.5), Dimension("b", -1.0, 1.0, 0.0),
               Dimension("c", 0.0, 2.0, 1.0)),
              (Objective("acc", "maximize"), Objective("size", "minimize")))


def toy(x: np.ndarray) -> dict[str, float]:
    """A trade-off: accuracy peaks at (0.3, 0.2, ...), size grows with a and c."""
    return {"acc": float(1 - (x[0] - 0.3) ** 2 - (x[1] - 0.2) ** 2),
            "size": float(x[0] + 0.5 * x[2])}


def run(s, fn, budget: int, batch: int) -> list:
    history = []
    while len(history) < budget:
        cands = s.ask(min(batch, budget - len(history)))
        s.tell(Result(c.id, fn(np.asarray(c.genome))) for c in cands)
        history += cands
    return history


# -- the pieces ------------------------------------------------------------------------------


def test_rank_top_takes_the_front_first_then_the_normalised_sum() -> None:
    losses = np.array([[0.0, 10.0],   # front
                       [1.0, 1.0],    # front
                       [10.0, 0.0],   # front
                       [1.5, 1.5],    # dominated by row 1, small normalised sum
                       [9.0, 9.0]])   # dominated
    top = rank_top(losses, 4)
    assert set(top[:3]) == {0, 1, 2} and top[3] == 3
    assert top[0] == 1  # on the front, the lowest normalised sum (0.2 against 1.0, 1.0)
    single = np.array([[3.0], [1.0], [2.0], [0.5], [4.0], [1.5]])
    assert list(rank_top(single, 5)) == list(np.argsort(single[:, 0])[:5])


def test_de_repair_stays_in_bounds_and_uses_only_the_parents() -> None:
    rng = np.random.default_rng(0)
    parents = rng.random((5, 6))
    proposals = rng.random((200, 6))
    f, cr = 0.5, 0.5
    out, chosen = de_repair(proposals, parents, np.random.default_rng(1), f, cr)
    assert out.shape == proposals.shape and np.all((out >= 0) & (out <= 1))
    from_donor = 0
    for x, y, r in zip(proposals, out, chosen, strict=True):
        assert len(set(r)) == 3 and set(r) <= set(range(5))  # three distinct parents
        donor = np.clip(parents[r[0]] + f * (parents[r[1]] - parents[r[2]]), 0, 1)
        took = np.isclose(y, donor)
        assert np.all(took | (y == x))  # every coordinate: the target's or the donor's
        assert took.any()  # at least one from the donor
        from_donor += int(took.sum())
    assert 0.4 < from_donor / out.size < 0.7  # CR 0.5, plus the one forced coordinate
    with pytest.raises(ValueError, match="3 distinct parents"):
        de_repair(proposals, parents[:2], rng)


def test_fisher_screening_keeps_the_most_uncertain() -> None:
    variances = np.array([[0.1, 0.1],    # info 20
                          [1.0, 1.0],    # info 2
                          [4.0, 0.01],   # info 100.25: one objective well known
                          [0.5, 2.0],    # info 2.5
                          [10.0, 10.0]])  # info 0.2
    assert list(fisher_screen(variances, 3)) == [4, 1, 3]


def test_the_strategy_screens_and_repairs_as_described(monkeypatch) -> None:
    """In a live round: the batch is the pool's lowest-information points, and each repaired
    candidate's parents are among the 5 best evaluated so far."""
    problem = Problem(TOY.dims, (Objective("acc", "maximize"),))
    seen = {}
    posterior = mm_mo._posterior

    def spy(model, points):
        mean, var = posterior(model, points)
        seen["points"], seen["var"] = points.copy(), var.copy()
        return mean, var

    monkeypatch.setattr(mm_mo, "_posterior", spy)
    s = MMMO(problem, CHEAP | {"initial": 8}, seed=3)
    first = run(s, lambda x: {"acc": toy(x)["acc"]}, 8, 4)
    values = {c.id: toy(np.asarray(c.genome))["acc"] for c in first}
    batch = s.ask(3)
    assert all(c.meta["phase"] == "model" for c in batch)
    pool, var = seen["points"], seen["var"]
    assert len(pool) == 6  # 3 proposals, 3 repairs
    info = (1 / var).sum(axis=1)
    expect = pool[np.argsort(info)[:3]]
    low, span = problem.low, problem.high - problem.low
    got = np.array([(np.asarray(c.genome) - low) / span for c in batch])
    assert np.allclose(np.sort(got, axis=0), np.sort(expect, axis=0))
    best5 = set(sorted(values, key=values.get, reverse=True)[:5])
    for c in batch:
        if c.meta["source"] == "de_repair":
            assert len(c.meta["parents"]) == 3 and set(c.meta["parents"]) <= best5
        assert set(c.meta["predicted"]) == {"acc"} and c.meta["std"]["acc"] >= 0


def test_options_are_checked() -> None:
    with pytest.raises(StrategyError, match="batch_size"):
        MMMO(TOY, {"pool": 2, "batch_size": 5})
    with pytest.raises(StrategyError, match="top"):
        MMMO(TOY, {"top": 2})


def test_without_botorch_it_says_which_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "botorch", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"mm_mo.*botorch.*pip install 'mergesearch\[bo\]'"):
        MMMO(TOY)


def test_real_dimensions_only() -> None:
    typed = Problem((Dimension("w", 0.0, 1.0, 0.5), Dimension.integer("k", 1, 4)),
                    TOY.objectives)
    with pytest.raises(StrategyError, match="real variables only"):
        MMMO(typed)


# -- the native state ------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_is_native_fast_and_proposes_the_same(monkeypatch) -> None:
    import torch

    torch.manual_seed(123)
    user_rng = torch.get_rng_state()
    s = MMMO(TOY, CHEAP, seed=5)
    run(s, toy, 7, 3)  # the random start and one model round, told
    pending = s.ask(2)  # two of the next round's batch in flight, one queued
    assert torch.equal(torch.get_rng_state(), user_rng)  # the user's torch RNG untouched
    state = json.loads(json.dumps(s.state_dict()))
    assert "log" not in state and len(state["native"]["told"]) == 7
    assert state["native"]["queue"] and state["native"]["hypers"]

    fits = []
    original = mm_mo._fit
    monkeypatch.setattr(mm_mo, "_fit", lambda *a: fits.append(1) or original(*a))
    t = MMMO(TOY, seed=0)
    t.load_state_dict(state)
    assert fits == []  # nothing of the history is refitted
    assert t.pending == s.pending == pending and t.state_dict() == state
    for c in pending:
        r = Result(c.id, toy(np.asarray(c.genome)))
        s.tell([r])
        t.tell([r])
    for n in (3, 1, 3):
        a, b = s.ask(n), t.ask(n)
        assert a == b and a
        s.tell(Result(c.id, toy(np.asarray(c.genome))) for c in a)
        t.tell(Result(c.id, toy(np.asarray(c.genome))) for c in b)
    assert len(fits) >= 2 and s.state_dict() == t.state_dict()


def test_the_state_refuses_a_replay_log() -> None:
    s = MMMO(TOY)
    state = s.state_dict()
    del state["native"]
    with pytest.raises(StrategyError, match="native"):
        s.load_state_dict(state)


# -- search quality --------------------------------------------------------------------------


def zdt1(x: np.ndarray) -> dict[str, float]:
    g = 1 + 9 * float(np.mean(x[1:]))
    return {"f1": float(x[0]), "f2": g * (1 - math.sqrt(x[0] / g))}


@pytest.mark.slow
def test_hypervolume_beats_random_at_the_papers_budget() -> None:
    """ZDT1 on [0, 1]^4, 10 random + 4 batches of 5: MM-MO's front dominates more than
    random search's, on every seed."""
    from pymoo.indicators.hv import HV

    problem = Problem(tuple(Dimension(f"x{i}", 0.0, 1.0, 0.5) for i in range(4)),
                      (Objective("f1", "minimize"), Objective("f2", "minimize")))
    hv = HV(ref_point=np.array([1.1, 6.0]))

    def volume(name: str, seed: int) -> float:
        s = create_strategy(name, problem, seed=seed)
        cands = run(s, zdt1, 30, 5)
        return float(hv(np.array([[zdt1(np.asarray(c.genome))[k] for k in ("f1", "f2")]
                                  for c in cands])))

    gains = [volume("mm_mo", seed) - volume("random", seed) for seed in (0, 1, 2)]
    assert min(gains) > 0.3, gains


# -- through the CLI: killed, then resumed ---------------------------------------------------


def _experiment(folder: Path) -> Path:
    data = yaml.safe_load((ROOT / "experiments" / "zoo" / "mm_mo.yaml").read_text())
    data["strategy"] = {"name": "mergesearch.strategies.mm_mo:MMMO", "options": CHEAP}
    data["evaluator"]["limit"] = 16
    data["budget"] = {"evaluations": 13}
    data["output"] = str(folder / "run")
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_continues_the_same_search(zoo, tmp_path) -> None:
    from helpers import completed_count, kill_mid_run

    from mergesearch.cli import main
    from mergesearch.storage import TrialStore

    exp = _experiment(tmp_path)
    db = tmp_path / "run" / "study.db"
    kill_mid_run(exp, db, 8)  # into the second model round
    assert 8 <= completed_count(db) < 13
    assert main(["run", str(exp), "-q", "--resume"]) == 0  # resumed in this process
    name = yaml.safe_load(exp.read_text())["name"]
    ok = [t for t in TrialStore.open(f"sqlite:///{db}", name).trials() if t.state == "ok"]
    assert sorted(t.candidate_id for t in ok) == list(range(13))

    other = tmp_path / "whole"
    other.mkdir()
    again = _experiment(other)
    assert main(["run", str(again), "-q"]) == 0
    whole = TrialStore.open(f"sqlite:///{other / 'run' / 'study.db'}", name).trials()
    assert {t.candidate_id: t.params for t in ok} == \
        {t.candidate_id: t.params for t in whole if t.state == "ok"}
    assert {t.candidate_id: t.values for t in ok} == \
        {t.candidate_id: t.values for t in whole if t.state == "ok"}
