"""The pymoo strategy: algorithms by name, options checked, generations, typed variables,
failures, termination, and the core contract checks for a subset of algorithms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pymoo.indicators.hv import HV

from mergesearch.strategies import Dimension, Objective, Problem, StrategyError, create_strategy
from mergesearch.strategies.pymoo_strategy import ALGORITHMS, DEFAULT_POP_SIZE, Pymoo
from mergesearch.trial import Result

from .test_conformance import (
    MIXED,
    SEEDS,
    SPHERE,
    TYPED,
    ZDT,
    ZDT_REF,
    best_loss,
    drive,
    front,
    losses,
    mixed,
    result,
    scripted,
    sphere,
    typed,
    zdt1,
)

ROOT = Path(__file__).resolve().parents[2]
SUBSET = ["ga", "de", "nsga2", "nsga3", "moead", "smsemoa", "cmaes"]
SINGLE = [a for a in SUBSET if not ALGORITHMS[a].multi]
MULTI = [a for a in SUBSET if ALGORITHMS[a].multi]


def make(algorithm: str, problem: Problem = MIXED, seed: int = 0, **options) -> Pymoo:
    return Pymoo(problem, {"algorithm": algorithm, **options}, seed=seed)


# -- the core contract, per algorithm --------------------------------------------------------

@pytest.mark.parametrize("algorithm", SUBSET)
def test_same_seed_same_candidates_and_global_state_untouched(algorithm: str) -> None:
    np.random.seed(1)
    before = np.random.get_state()[1].copy()
    a = scripted(make(algorithm, seed=7))
    assert np.array_equal(np.random.get_state()[1], before)  # pymoo's (and pycma's) own state
    np.random.seed(2)
    b = scripted(make(algorithm, seed=7))
    c = scripted(make(algorithm, seed=8))
    assert a == b
    assert a != c


@pytest.mark.parametrize("algorithm", SUBSET)
def test_state_round_trip_with_pending(algorithm: str) -> None:
    s = make(algorithm, seed=21)
    drive(s, mixed, 30, batches=(3, 2), fail=lambda i: i % 5 == 1)
    asked = s.ask(3)
    assert asked
    s.tell([result(asked[0], mixed)])
    state = json.loads(json.dumps(s.state_dict()))
    t = Pymoo(MIXED, seed=999)  # default options and another seed: both come from the state
    t.load_state_dict(state)
    assert t.options == s.options and t.pending == s.pending
    assert t.state_dict() == state
    for c in s.pending:
        r = result(c, mixed)
        s.tell([r])
        t.tell([r])
    for n in (2, 4, 1, 3, 5, 8, 8):
        a, b = s.ask(n), t.ask(n)
        assert a == b
        s.tell(result(c, mixed) for c in a)
        t.tell(result(c, mixed) for c in b)
    assert s.state_dict() == t.state_dict()


_RESUME = """
import json, sys
from mergesearch.strategies.pymoo_strategy import Pymoo
from tests.strategies.test_conformance import MIXED
out = []
for state in json.load(sys.stdin):
    s = Pymoo(MIXED, seed=12345)
    s.load_state_dict(state)
    out.append([c.genome for c in s.pending + s.ask(4)])
json.dump(out, sys.stdout)
"""


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_resume_in_a_fresh_process() -> None:
    states, expected = [], []
    for algorithm in SUBSET:
        s = make(algorithm, seed=5)
        drive(s, mixed, 25, batches=(4, 3), fail=lambda i: i % 6 == 2)
        s.ask(2)
        states.append(s.state_dict())
        expected.append([c.genome for c in s.pending + s.ask(4)])
    env = {**os.environ, "PYTHONHASHSEED": "4321", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _RESUME], input=json.dumps(states), env=env,
                          cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(done.stdout) == expected


@pytest.mark.parametrize("algorithm", SINGLE)
def test_beats_random_search_on_a_sphere(algorithm: str) -> None:
    def best(strategy) -> float:
        return best_loss(drive(strategy, sphere, 300, batches=(4,)), SPHERE)

    mine = np.median([best(make(algorithm, SPHERE, seed)) for seed in SEEDS])
    random = np.median([best(create_strategy("random", SPHERE, seed=seed)) for seed in SEEDS])
    assert mine < 0.5 * random


@pytest.mark.parametrize("algorithm", MULTI)
def test_hypervolume_beats_random_search(algorithm: str) -> None:
    hv = HV(ref_point=ZDT_REF)

    def volume(strategy) -> float:
        return float(hv(front(losses(drive(strategy, zdt1, 200, batches=(10,)), ZDT))))

    for seed in SEEDS:
        assert volume(make(algorithm, ZDT, seed)) > \
            volume(create_strategy("random", ZDT, seed=seed)) + 0.3


# -- algorithms and options -------------------------------------------------------------------

def test_default_is_nsga2_reporting_a_front() -> None:
    s = Pymoo(ZDT)
    assert s.options.algorithm == "nsga2" and s.multi_objective
    assert type(s.algorithm).__name__ == "NSGA2"
    assert len(s.ask(100)) == DEFAULT_POP_SIZE


def test_algorithm_names_are_forgiving_and_unknown_ones_listed() -> None:
    assert make("NSGA-II".replace("II", "2"), ZDT).options.algorithm == "nsga2"
    with pytest.raises(StrategyError, match=r"unknown pymoo algorithm 'nope'.*nsga2"):
        make("nope")


def test_unknown_and_managed_keywords_are_refused_by_name() -> None:
    with pytest.raises(StrategyError, match=r"options\.popsize: not a keyword of pymoo's NSGA2"):
        make("nsga2", options={"popsize": 10})
    with pytest.raises(StrategyError, match=r"options\.seed: set by mergesearch"):
        make("ga", options={"seed": 3})
    with pytest.raises(StrategyError, match="options.pop_size"):  # one per direction
        make("moead", ZDT, options={"pop_size": 10})
    # pymoo's CMAES passes further keywords to pycma: those are known
    assert make("cmaes", SPHERE, options={"CMA_diagonal": True}).ask(1)
    with pytest.raises(StrategyError, match="options.no_such_pycma_option"):
        make("cmaes", SPHERE, options={"no_such_pycma_option": 1})


def test_pass_through_options_reach_pymoo() -> None:
    s = make("ga", SPHERE, options={"pop_size": 7, "n_offsprings": 3,
                                   "crossover": {"class": "pymoo.operators.crossover.sbx.SBX",
                                                 "eta": 3}})
    assert (s.algorithm.pop_size, s.algorithm.n_offsprings) == (7, 3)
    assert s.algorithm.mating.crossover.eta.value == 3
    first = s.ask(100)
    assert len(first) == 7
    s.tell(result(c, sphere) for c in first)
    assert len(s.ask(100)) <= 3
    de = make("de", SPHERE, options={"variant": "DE/rand/1/bin", "CR": 0.9, "F": 0.6})
    assert (de.algorithm.mating.CR.value, de.algorithm.mating.F.value) == (0.9, 0.6)
    with pytest.raises(StrategyError, match="a pymoo class"):
        make("ga", SPHERE, options={"crossover": {"class": "os.system"}})


def test_reference_directions_default_and_given() -> None:
    three = Problem(ZDT.dims, (*ZDT.objectives, Objective("f3", "minimize")))
    assert len(make("nsga3", ZDT).ask(100)) == 20  # Das-Dennis, 19 partitions
    assert len(make("nsga3", three).algorithm.ref_dirs) == 15  # 4 partitions: 15 <= 20 < 21
    s = make("nsga3", ZDT, options={"ref_dirs": {"method": "das-dennis", "n_partitions": 12}})
    assert len(s.algorithm.ref_dirs) == 13 and len(s.ask(100)) == 13
    s = make("moead", ZDT, options={"ref_dirs": [[0, 1], [0.5, 0.5], [1, 0]]})
    assert np.allclose(s.algorithm.ref_dirs, [[0, 1], [0.5, 0.5], [1, 0]])
    with pytest.raises(StrategyError, match="rows of 2 values"):
        make("moead", ZDT, options={"ref_dirs": [[1, 0, 0]]})
    with pytest.raises(StrategyError, match="two or more objectives"):
        make("nsga3", SPHERE)


def test_algorithms_that_need_more_say_what() -> None:
    with pytest.raises(StrategyError, match="needs option.*ref_points"):
        make("rnsga2", ZDT)
    s = make("rnsga2", ZDT, options={"ref_points": [[0.2, 0.4]]})
    assert len(drive(s, zdt1, 40, batches=(10,))) == 40
    with pytest.raises(StrategyError, match=r"rvea.*termination: \[n_gen"):
        make("rvea", ZDT)
    s = make("rvea", ZDT, termination=["n_gen", 3])
    history = drive(s, zdt1, 500, batches=(10,))
    assert s.done and len(history) == 3 * 20


def test_agemoea_needs_numba() -> None:
    try:
        import numba  # noqa: F401
    except ImportError:
        with pytest.raises(StrategyError, match="numba"):
            make("agemoea", ZDT)
    else:
        assert len(drive(make("agemoea", ZDT), zdt1, 40, batches=(10,))) == 40


def test_single_objective_algorithms_see_the_weighted_sum() -> None:
    s = make("ga", MIXED, options={"pop_size": 6})
    assert not s.multi_objective and Pymoo.multi_objective
    gen = s.ask(100)
    s.tell(result(c, mixed) for c in gen)
    assert np.allclose(s._pymoo_problem.told[:, 0],
                       [MIXED.scalar_loss(mixed(np.asarray(c.genome))) for c in gen])
    m = make("nsga2", MIXED, options={"pop_size": 6})
    gen = m.ask(100)
    m.tell(result(c, mixed) for c in gen)
    assert np.allclose(m._pymoo_problem.told,
                       [MIXED.losses(mixed(np.asarray(c.genome))) for c in gen])


# -- generations, failures, termination -------------------------------------------------------

def test_one_generation_at_a_time() -> None:
    s = make("nsga2", ZDT, options={"pop_size": 8})
    gen = s.ask(5) + s.ask(5)
    assert [c.id for c in gen] == list(range(8))
    assert s.ask(1) == []
    s.tell(result(c, zdt1) for c in gen[:-1])
    assert s.ask(3) == [] and s.generation == 1
    s.tell([result(gen[-1], zdt1)])
    assert s.generation == 2
    assert [c.id for c in s.ask(100)] == list(range(8, 16))


def test_failed_members_rank_below_every_success() -> None:
    s = make("nsga2", ZDT, options={"pop_size": 8})
    gen = s.ask(100)
    s.tell(Result.failed(c.id, "oom") if c.id in (2, 5) else result(c, zdt1) for c in gen)
    F = s._pymoo_problem.told
    ok = np.delete(F, [2, 5], axis=0)
    assert np.all(F[[2, 5]] > ok.max(axis=0))
    # a generation of failures only: still told, still searching
    for _ in range(3):
        s.tell(Result.failed(c.id, "oom") for c in s.ask(100))
    assert not s.done and s.ask(1)


def test_termination_sets_done() -> None:
    s = make("ga", SPHERE, termination=["n_gen", 3], options={"pop_size": 5})
    history = drive(s, sphere, 1000, batches=(4,))
    assert s.done and s.ask(3) == []
    assert len(history) == 15
    with pytest.raises(StrategyError, match="termination"):
        make("ga", SPHERE, termination=["time", "00:01:00"])
    # pymoo's CMA-ES stops by itself when pycma converges
    c = make("cmaes", SPHERE, options={"tolfun": 1e-2, "tolx": 1e-2})
    assert len(drive(c, sphere, 5000, batches=(6,))) < 5000 and c.done


@pytest.mark.parametrize("algorithm", SUBSET)
def test_include_init_proposes_the_start_point_first(algorithm: str) -> None:
    problem = MIXED if algorithm not in ("nsga3", "moead") else ZDT
    first = make(algorithm, problem).ask(3)[0]
    assert first.id == 0 and first.genome == list(problem.x0)
    off = make(algorithm, problem, include_init=False).ask(3)
    assert all(c.genome != list(problem.x0) for c in off)


def test_cmaes_starts_its_mean_at_the_start_point() -> None:
    s = make("cmaes", SPHERE, options={"pop_size": 6, "sigma": 0.05})
    (x0,) = s.ask(100)  # pymoo evaluates x0 first
    assert x0.genome == list(SPHERE.x0)
    s.tell([result(x0, sphere)])
    gen = np.array([c.genome for c in s.ask(100)])
    assert len(gen) == 6
    span = SPHERE.high - SPHERE.low
    assert np.all(np.abs(gen - SPHERE.x0) < 0.3 * span)


# -- typed variables --------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", [a for a, spec in ALGORITHMS.items() if spec.mixed])
def test_mixed_algorithms_search_every_kind(algorithm: str) -> None:
    problem = TYPED
    s = make(algorithm, problem, seed=3)
    history = drive(s, typed, 120, batches=(5,))
    assert history[0][0].genome == list(problem.x0)
    seen: dict[str, set] = {d.name: set() for d in problem.dims}
    for cand, _ in history:
        for g, d in zip(cand.genome, problem.dims, strict=True):
            assert d.contains(g)
            seen[d.name].add(d.label(g))
    assert seen["src"] == {"a", "b", "c"} and seen["on"] == {0, 1} and len(seen["k"]) >= 4
    # the weighted-sum optimum (2.5: loss + size is flat in k) is found
    assert best_loss(history, problem) < 2.6


@pytest.mark.parametrize("algorithm", [a for a, spec in ALGORITHMS.items()
                                       if not spec.mixed and not spec.requires])
def test_real_only_algorithms_refuse_typed_problems_naming_who_can(algorithm: str) -> None:
    with pytest.raises(StrategyError, match=r"searches real variables only.*algorithm ga, "
                                            r"nsga2.*random"):
        make(algorithm, TYPED)


def test_mixed_problems_refuse_real_operators() -> None:
    with pytest.raises(StrategyError, match="crossover apply to real-only problems"):
        make("ga", TYPED, options={"crossover": {"class": "pymoo.operators.crossover.sbx.SBX"}})


def test_integer_dimensions_stay_whole() -> None:
    problem = Problem((Dimension.integer("k", 0, 9, 4), Dimension("w", 0.0, 1.0, 0.5)),
                      (Objective("a", "minimize"), Objective("b", "minimize")))
    s = make("nsga2", problem, seed=1)
    history = drive(s, lambda x: {"a": float(x[0]) + x[1], "b": float(9 - x[0]) + x[1]}, 80)
    ks = {c.genome[0] for c, _ in history}
    assert all(k.is_integer() for k in ks) and len(ks) >= 6


# -- through the CLI: killed, then resumed ---------------------------------------------------

@pytest.mark.slow
def test_sigkill_mid_search_then_resume_continues_the_same_search(zoo, tmp_path):
    from helpers import completed_count, kill_mid_run
    from test_run_cli import write_experiment

    from mergesearch.cli import main
    from mergesearch.storage import TrialStore

    strategy = {"name": "mergesearch.strategies.pymoo_strategy:Pymoo",  # registered or not
                "options": {"algorithm": "nsga2", "options": {"pop_size": 6}}}
    exp = write_experiment(tmp_path, strategy=strategy, budget={"evaluations": 14})
    db = tmp_path / "run" / "study.db"
    kill_mid_run(exp, db, 8)  # into the second generation
    assert 8 <= completed_count(db) < 14
    assert main(["run", str(exp), "-q", "--resume"]) == 0  # resumed in this process
    ok = [t for t in TrialStore.open(f"sqlite:///{db}", "toy").trials() if t.state == "ok"]
    assert sorted(t.candidate_id for t in ok) == list(range(14))

    # the same experiment run without a kill proposes the same candidates
    other = tmp_path / "whole"
    other.mkdir()
    again = write_experiment(other, strategy=strategy, budget={"evaluations": 14})
    assert main(["run", str(again), "-q"]) == 0
    whole = TrialStore.open(f"sqlite:///{other / 'run' / 'study.db'}", "toy").trials()
    assert {t.candidate_id: t.params for t in ok} == \
        {t.candidate_id: t.params for t in whole if t.state == "ok"}
