"""The asha wrapper: successive halving promotes exactly the best 1/eta; ASHA promotes
from the top; state replays; through the controller the front is full-fidelity only and
the budget counts items; a SIGKILLed run resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mergesearch.strategies.multi_fidelity  # noqa: F401  (registers asha)
from mergesearch.strategies import Dimension, Objective, Problem, StrategyError, create_strategy
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[2]
LINE = Problem(tuple(Dimension(f"x{i}", 0.0, 1.0, 0.5) for i in range(2)),
               (Objective("loss", "minimize"),))
PATH = "mergesearch.strategies.multi_fidelity:SuccessiveHalving"


def loss(genome) -> float:
    return float(np.sum(np.asarray(genome) ** 2))


def test_one_rung_is_the_inner_strategy_itself() -> None:
    """With the full fidelity as its only rung, asha proposes what its inner cmaes does."""
    def run(name, options):
        s, out = create_strategy(name, LINE, options, seed=4), []
        for _ in range(20):
            cand = s.ask(1)[0]
            s.tell([Result(cand.id, {"loss": loss(np.asarray(cand.genome) - 0.3)})])
            out.append((cand.genome, cand.fidelity))
        return out

    plain = run("cmaes", {"popsize": 4})
    assert run("asha", {"strategy": "cmaes", "options": {"popsize": 4},
                        "fidelities": [1.0]}) == plain


def test_synchronous_halving_promotes_exactly_the_best_third() -> None:
    s = create_strategy("asha", LINE, {"asynchronous": False, "eta": 3,
                                       "fidelities": [1 / 9, 1 / 3, 1.0]}, seed=0)
    rung0 = s.ask(20)
    assert len(rung0) == 9 and {c.fidelity for c in rung0} == {1 / 9}
    s.tell([Result(c.id, {"loss": loss(c.genome)}) for c in rung0[:8]])
    assert s.ask(5) == []  # the rung waits for its last result
    s.tell([Result(rung0[8].id, {"loss": loss(rung0[8].genome)})])
    rung1 = s.ask(20)
    best3 = sorted(rung0, key=lambda c: loss(c.genome))[:3]
    assert [c.genome for c in rung1] == [c.genome for c in best3]
    assert {c.fidelity for c in rung1} == {1 / 3}
    assert [c.meta["asha"]["rung"] for c in rung1] == [1, 1, 1]
    # rung 1 scores differ from rung 0's: the ranking at rung 1 decides
    rank1 = {id(c): v for c, v in zip(rung1, (0.3, 0.1, 0.2), strict=True)}
    s.tell([Result(c.id, {"loss": rank1[id(c)]}) for c in rung1])
    top = s.ask(20)
    assert top[0].genome == rung1[1].genome and top[0].fidelity == 1.0
    assert len(top) == 1 or top[1].fidelity == 1 / 9  # then a new bracket
    # the inner strategy heard rung 0 only: 9 results
    assert sum(len(e[1]) for e in s.inner.state_dict()["log"] if e[0] == "tell") == 9


def test_asha_promotes_a_top_config_as_soon_as_a_rung_has_eta_results() -> None:
    s = create_strategy("asha", LINE, {"eta": 2, "fidelities": [0.25, 0.5, 1.0]}, seed=1)
    first = s.ask(2)
    assert all(c.fidelity == 0.25 for c in first)
    s.tell([Result(c.id, {"loss": loss(c.genome)}) for c in first])
    nxt = s.ask(1)[0]
    best = min(first, key=lambda c: loss(c.genome))
    assert nxt.genome == best.genome and nxt.fidelity == 0.5
    s.tell([Result(nxt.id, {"loss": 0.0})])
    fresh = s.ask(1)[0]  # rung 1 has 1 result: floor(1/2) = 0 to promote; rung 0 is used up
    assert fresh.fidelity == 0.25 and fresh.genome not in [c.genome for c in first]


def test_failed_configs_are_never_promoted() -> None:
    s = create_strategy("asha", LINE, {"eta": 2, "fidelities": [0.5, 1.0]}, seed=0)
    cands = s.ask(4)
    s.tell([Result.failed(c.id, "boom") for c in cands])
    assert all(c.fidelity == 0.5 for c in s.ask(3))


def test_inner_cmaes_state_round_trip_mid_rung() -> None:
    opts = {"strategy": "cmaes", "options": {"popsize": 4}, "eta": 2,
            "fidelities": [0.5, 1.0]}
    s = create_strategy("asha", LINE, opts, seed=3)
    for _ in range(5):
        cands = s.ask(3)
        s.tell([Result(c.id, {"loss": loss(c.genome)}) for c in cands[:-1]])
    state = s.state_dict()
    other = create_strategy("asha", LINE, opts, seed=99)
    other.load_state_dict(state)
    assert [c.genome for c in other.pending] == [c.genome for c in s.pending]
    assert [(c.genome, c.fidelity) for c in other.ask(4)] == \
        [(c.genome, c.fidelity) for c in s.ask(4)]
    assert not other.multi_objective  # as its inner cmaes


def _inner_tells(s) -> list[list]:
    """The results the inner strategy was told, batch by batch: [(inner id, loss)]."""
    return [[(r["id"], r["values"]["loss"]) for r in e[1]]
            for e in s.inner.state_dict()["log"] if e[0] == "tell"]


def test_tell_last_tells_the_inner_strategy_each_configs_highest_rung_at_the_bracket_end():
    opts = {"strategy": "cmaes", "options": {"popsize": 4}, "asynchronous": False,
            "eta": 2, "fidelities": [0.5, 1.0], "bracket": 4, "tell": "last"}
    s = create_strategy("asha", LINE, opts, seed=2)
    rung0 = s.ask(10)
    assert len(rung0) == 4 and {c.fidelity for c in rung0} == {0.5}
    s.tell([Result(c.id, {"loss": loss(c.genome)}) for c in rung0])
    rung1 = s.ask(10)
    assert _inner_tells(s) == []  # held back while the bracket runs
    best2 = sorted(rung0, key=lambda c: loss(c.genome))[:2]
    assert [c.genome for c in rung1] == [c.genome for c in best2]
    s.tell([Result(c.id, {"loss": 7.0 + i}) for i, c in enumerate(rung1)])
    nxt = s.ask(10)  # the bracket ended: the inner cmaes heard all four, then sampled anew
    assert len(nxt) == 4 and {c.fidelity for c in nxt} == {0.5}
    assert s.inner.generation == 1
    [told] = _inner_tells(s)
    genome_of = {cfg["inner"]: cfg["genome"] for cfg in s._configs}
    heard = {tuple(genome_of[inner_id]): value for inner_id, value in told}
    want = {tuple(c.genome): loss(c.genome) for c in rung0}
    want |= {tuple(c.genome): 7.0 + i for i, c in enumerate(rung1)}  # the full results
    assert heard == pytest.approx(want)


def test_a_bracket_the_inner_strategy_cannot_fill_goes_on_with_what_it_gave():
    """cmaes hands out a generation of 4; with brackets of 3 and ``tell: last`` the second
    bracket holds the generation's last member, not a wait that never ends."""
    opts = {"strategy": "cmaes", "options": {"popsize": 4}, "asynchronous": False,
            "eta": 2, "fidelities": [0.5, 1.0], "bracket": 3, "tell": "last"}
    s = create_strategy("asha", LINE, opts, seed=0)
    fidelities = []
    for _ in range(40):
        cands = s.ask(3)
        assert cands, "asked with nothing pending and got nothing"
        fidelities += [c.fidelity for c in cands]
        s.tell([Result(c.id, {"loss": loss(c.genome)}) for c in cands])
    assert s.inner.generation >= 5 and 1.0 in fidelities
    # brackets of 3, then the generation's last one: each told when its bracket ended
    assert [len(batch) for batch in _inner_tells(s)][:6] == [3, 1, 3, 1, 3, 1]


def test_tell_last_state_round_trip_mid_bracket() -> None:
    opts = {"strategy": "cmaes", "options": {"popsize": 4}, "asynchronous": False,
            "eta": 2, "fidelities": [0.5, 1.0], "bracket": 4, "tell": "last"}
    s = create_strategy("asha", LINE, opts, seed=5)
    for _ in range(7):
        cands = s.ask(2)
        s.tell([Result(c.id, {"loss": loss(c.genome)}) for c in cands[:-1]])
    other = create_strategy("asha", LINE, opts, seed=5)
    other.load_state_dict(s.state_dict())
    assert [c.genome for c in other.pending] == [c.genome for c in s.pending]
    for strat in (s, other):
        strat.tell([Result(c.id, {"loss": loss(c.genome)}) for c in strat.pending])
    assert [(c.genome, c.fidelity) for c in other.ask(4)] == \
        [(c.genome, c.fidelity) for c in s.ask(4)]
    assert _inner_tells(other) == _inner_tells(s)


@pytest.mark.parametrize("options, match", [
    ({"fidelities": [0.5, 0.9]}, "the last fidelity must be 1"),
    ({"fidelities": [0.5, 0.3, 1.0]}, "fidelities must increase"),
    ({"eta": 1}, "eta"),
    ({"strategy": "nope"}, "options.strategy: unknown strategy 'nope'"),
    ({"strategy": "cmaes", "options": {"popsize": "x"}}, "options.options: strategy 'cmaes'"),
    ({"bracket": 4}, "bracket is for asynchronous: false only"),
    ({"tell": "last"}, "tell: last is for asynchronous: false only"),
    ({"tell": "best", "asynchronous": False}, "tell"),
])
def test_bad_options_are_refused(options, match) -> None:
    with pytest.raises(StrategyError, match=match):
        create_strategy("asha", LINE, options)


# -- through the controller ----------------------------------------------------------------


def _experiment(tmp_path: Path, options: dict | None = None, **changes) -> Path:
    from test_run_cli import write_experiment

    strategy = {"name": PATH, "options": {"strategy": "random", "eta": 2,
                                          "fidelities": [0.25, 1.0], **(options or {})}}
    return write_experiment(tmp_path, strategy=strategy, **changes)


@pytest.mark.slow
def test_the_front_and_best_read_full_fidelity_trials_and_cost_counts_items(zoo, tmp_path):
    from mergesearch import controller
    from mergesearch.experiment import Experiment
    from mergesearch.storage import TrialStore

    exp = Experiment.load(_experiment(tmp_path, budget={"cost": 16 * 4 * 6}))
    summary = controller.run(exp, progress=False)
    trials = TrialStore.open(summary.storage, summary.study).trials()
    fids = [t.fidelity for t in trials if t.state == "ok"]
    assert 0.25 in fids and 1.0 in fids
    # cost: 4 items per task at fidelity 1/4, 16 at 1 (limit 16, 4 tasks)
    assert summary.cost == sum(4 * (4 if f == 0.25 else 16) for f in fids)
    assert summary.cost >= 16 * 4 * 6 and len(fids) > 6  # more trials than 6 full ones
    assert summary.front and all(t.fidelity == 1.0 for t in summary.front)
    assert all(t.fidelity == 1.0 for t in TrialStore.open(summary.storage,
                                                          summary.study).pareto_front())


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"asynchronous": False, "bracket": 4, "tell": "last"}],
                         ids=["asha", "sync-tell-last"])
def test_sigkill_mid_search_then_resume_continues_the_same_search(zoo, tmp_path, options):
    from helpers import completed_count, kill_mid_run

    from mergesearch.cli import main
    from mergesearch.storage import TrialStore

    exp = _experiment(tmp_path, options, budget={"evaluations": 14})
    db = tmp_path / "run" / "study.db"
    kill_mid_run(exp, db, 7)
    assert 7 <= completed_count(db) < 14
    assert main(["run", str(exp), "-q", "--resume"]) == 0  # resumed in this process
    ok = [t for t in TrialStore.open(f"sqlite:///{db}", "toy").trials() if t.state == "ok"]
    assert sorted(t.candidate_id for t in ok) == list(range(14))
    other = tmp_path / "whole"
    other.mkdir()
    again = _experiment(other, options, budget={"evaluations": 14})
    assert main(["run", str(again), "-q"]) == 0
    whole = TrialStore.open(f"sqlite:///{other / 'run' / 'study.db'}", "toy").trials()
    assert {t.candidate_id: (t.params, t.fidelity) for t in ok} == \
        {t.candidate_id: (t.params, t.fidelity) for t in whole if t.state == "ok"}
