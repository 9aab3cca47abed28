"""Conformance suite: every registered strategy obeys the same ask/tell contract.

Parametrised over :func:`mergesearch.strategies.strategies`, so a new strategy is covered as
soon as it registers.  Objectives are tiny closed-form functions (a shifted sphere, a
ZDT1-like pair), seeds are fixed, so every assertion is deterministic.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from pymoo.indicators.hv import HV

from mergesearch.strategies import (
    Dimension,
    Objective,
    Problem,
    Strategy,
    StrategyError,
    StrategyOptions,
    create_strategy,
    strategies,
)
from mergesearch.trial import Candidate, Result

NAMES = list(strategies())
SINGLE = [n for n, cls in strategies().items() if not cls.multi_objective]
MULTI = [n for n, cls in strategies().items() if cls.multi_objective]

#: Strategies that fit a model at every ask (GPs, forests, quadratic surrogates with
#: NSGA-III on them): seconds per ask, ~10-40 minutes for this suite each, so it runs on
#: its own (`pytest -m expensive`, last result in benchmarks/RESULTS.md), not in the
#: default run; their own test files keep quick checks and a SIGKILL resume.
HEAVY = {"bmm", "map", "bayesian_map", "nested_map", "merge_moea", "mm_mo"}
EXPENSIVE = (pytest.mark.slow, pytest.mark.expensive)


def params(names: Iterable[str]) -> list:
    return [pytest.param(n, marks=EXPENSIVE) if n in HEAVY else n for n in names]

Objective_fn = Callable[[np.ndarray], dict[str, float]]

# -- problems -----------------------------------------------------------------------------

#: A 5-d sphere whose optimum is inside the bounds and away from the init point (0).
SPHERE_OPT = np.array([1.2, -0.8, 0.5, 1.5, -1.1])
SPHERE = Problem(tuple(Dimension(f"x{i}", -2.0, 3.0, 0.0) for i in range(5)),
                 (Objective("loss", "minimize"),))


def sphere(x: np.ndarray) -> dict[str, float]:
    return {"loss": float(np.sum((x - SPHERE_OPT) ** 2))}


#: Mixed scales, an init point on a bound, two objectives of opposite directions.
MIXED = Problem((Dimension("w", 0.0, 2.0, 0.0), Dimension("d", 0.1, 1.0, 0.5),
                 Dimension("s", -300.0, -100.0, -200.0), Dimension("t", -1e-3, 1e-3, 1e-3)),
                (Objective("acc", "maximize"), Objective("size", "minimize", weight=0.5)))


def mixed(x: np.ndarray) -> dict[str, float]:
    u = (x - MIXED.low) / (MIXED.high - MIXED.low)
    return {"acc": float(1 - np.sum((u - 0.3) ** 2)), "size": float(np.sum(u))}


#: ZDT1 (Zitzler, Deb & Thiele 2000) on [0, 1]^5, both objectives minimised.
ZDT = Problem(tuple(Dimension(f"x{i}", 0.0, 1.0, 0.5) for i in range(5)),
              (Objective("f1", "minimize"), Objective("f2", "minimize")))
ZDT_REF = np.array([1.1, 6.0])


def zdt1(x: np.ndarray) -> dict[str, float]:
    g = 1 + 9 * float(np.mean(x[1:]))
    return {"f1": float(x[0]), "f2": g * (1 - math.sqrt(x[0] / g))}


#: Two minimised objectives whose weighted sum (weights 3 and 1) has its optimum at
#: (3a + b) / 4 = (0.75, -0.5), far from either objective's own optimum.
WA, WB = np.array([1.5, -1.0]), np.array([-1.5, 1.0])
WEIGHTED_OPT = (3 * WA + WB) / 4
WEIGHTED = Problem((Dimension("a", -2.0, 2.0, -1.0), Dimension("b", -2.0, 2.0, 1.5)),
                   (Objective("near_a", "maximize", weight=3.0),
                    Objective("far_b", "minimize", weight=1.0)))


def weighted(x: np.ndarray) -> dict[str, float]:
    return {"near_a": -float(np.sum((x - WA) ** 2)), "far_b": float(np.sum((x - WB) ** 2))}


# -- driving a strategy -------------------------------------------------------------------

def result(cand: Candidate, fn: Objective_fn, failed: bool = False) -> Result:
    if failed:
        return Result.failed(cand.id, "synthetic failure")
    return Result(cand.id, fn(np.asarray(cand.genome)))


def drive(s: Strategy, fn: Objective_fn, budget: int, batches: Iterable[int] = (4,),
          fail: Callable[[int], bool] = lambda i: False,
          reverse: bool = False) -> list[tuple[Candidate, Result]]:
    """Ask in the given batch sizes (cycled), tell everything back, until ``budget``."""
    sizes = list(batches)
    history: list[tuple[Candidate, Result]] = []
    k = 0
    while len(history) < budget:
        cands = s.ask(min(sizes[k % len(sizes)], budget - len(history)))
        k += 1
        if not cands:
            assert not s.pending, f"{s.name} proposes nothing while nothing is pending"
            break
        told = [(c, result(c, fn, fail(c.id))) for c in cands]
        s.tell(r for _, r in (reversed(told) if reverse else told))
        history += told
    return history


def genomes(history: list[tuple[Candidate, Result]]) -> list[list[float]]:
    return [c.genome for c, _ in history]


def best_loss(history: list[tuple[Candidate, Result]], problem: Problem) -> float:
    return min(problem.scalar_loss(r.values) for _, r in history if r.ok)


def front(points: np.ndarray) -> np.ndarray:
    """The mutually non-dominated rows of ``points`` (minimisation), duplicates once."""
    points = np.unique(points, axis=0)
    keep = [not np.any(np.all(points <= p, axis=1) & np.any(points < p, axis=1))
            for p in points]
    return points[keep]


def losses(history: list[tuple[Candidate, Result]], problem: Problem) -> np.ndarray:
    return np.array([problem.losses(r.values) for _, r in history if r.ok])


@pytest.fixture(params=params(NAMES))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


# -- declaration --------------------------------------------------------------------------

def test_declaration(name: str) -> None:
    cls = strategies()[name]
    assert cls.name == name
    assert cls.description.strip() and "\n" not in cls.description
    assert isinstance(cls.multi_objective, bool)
    assert issubclass(cls.Options, StrategyOptions)
    assert cls.Options.model_config.get("extra") == "forbid"
    assert cls.__doc__ and sys.modules[cls.__module__].__doc__


# -- ask ----------------------------------------------------------------------------------

def test_ask_contract(name: str) -> None:
    s = create_strategy(name, MIXED, seed=3)
    seen: list[int] = []
    for n in (1, 3, 2, 7, 1, 5, 4, 4, 6):
        cands = s.ask(n)
        assert len(cands) <= n
        for c in cands:
            assert len(c.genome) == MIXED.n_dims
            assert all(isinstance(g, float) for g in c.genome)
            assert all(d.low <= g <= d.high for g, d in zip(c.genome, MIXED.dims, strict=True))
            assert 0 < c.fidelity <= 1
        ids = [c.id for c in cands]
        assert ids == sorted(ids) and not set(ids) & set(seen)
        assert all(i > max(seen, default=-1) for i in ids)
        seen += ids
        s.tell(result(c, mixed) for c in cands)
    assert len(seen) >= 20


@pytest.mark.parametrize("n", [0, -1])
def test_ask_needs_positive_n(name: str, n: int) -> None:
    with pytest.raises(StrategyError, match="n >= 1"):
        create_strategy(name, SPHERE).ask(n)


# -- tell ---------------------------------------------------------------------------------

def test_tell_rejects_misuse(name: str) -> None:
    s = create_strategy(name, MIXED, seed=1)
    cands = s.ask(3)
    assert len(cands) >= 2
    first, second = cands[0], cands[1]
    good = result(first, mixed)
    cases = {
        "unknown id": [Result(10_000, good.values)],
        "same id twice in one call": [good, good],
        "missing objective": [Result(first.id, {"acc": 0.5})],
        "NaN value": [Result(first.id, {"acc": math.nan, "size": 1.0})],
        "infinite value": [Result(first.id, {"acc": 0.5, "size": math.inf})],
    }
    for case, results in cases.items():
        with pytest.raises(StrategyError, match=r"candidate|lacks|non-finite"):
            s.tell(results)
        assert [c.id for c in s.pending] == [c.id for c in cands], case
    s.tell([good])
    with pytest.raises(StrategyError, match="not awaiting"):
        s.tell([good])
    s.tell([result(second, mixed)])
    s.tell(result(c, mixed) for c in cands[2:])
    assert not s.pending


def test_tell_any_order_and_grouping(name: str) -> None:
    s = create_strategy(name, SPHERE, seed=2)
    for _ in range(6):
        cands = s.ask(6)
        assert cands
        for c in reversed(cands):  # one by one, newest first
            s.tell([result(c, sphere)])
    cands = s.ask(5)
    s.tell(result(c, sphere) for c in cands[1::2])
    s.tell(result(c, sphere) for c in cands[0::2])
    assert s.ask(3)


def test_failed_results_are_accepted(name: str) -> None:
    s = create_strategy(name, SPHERE, seed=4)
    # The first 24 candidates all fail, then every third one.
    history = drive(s, sphere, 60, batches=(4, 3), fail=lambda i: i < 24 or i % 3 == 0)
    assert len(history) == 60
    assert sum(not r.ok for _, r in history) > 24
    assert not s.done and s.ask(2)


def test_results_report_only_known_values(name: str) -> None:
    """Extra values (per-task metrics) and a failed result's values do not confuse it."""
    s = create_strategy(name, SPHERE, seed=5)
    for _ in range(5):
        cands = s.ask(4)
        s.tell([Result(c.id, {**sphere(np.asarray(c.genome)), "extra": 1.0}) for c in cands[:-1]]
               + [Result(cands[-1].id, {"loss": 1.0}, status="failed", reason="x")])
    assert s.ask(1)


# -- determinism and state ----------------------------------------------------------------

def scripted(s: Strategy, budget: int = 40) -> list[list[float]]:
    """A fixed, awkward ask/tell script: mixed batch sizes, reversed tells, some failures."""
    return genomes(drive(s, mixed, budget, batches=(1, 3, 2, 5), fail=lambda i: i % 7 == 3,
                         reverse=True))


def test_same_seed_same_candidates(name: str) -> None:
    np.random.seed(1)
    a = scripted(create_strategy(name, MIXED, seed=7))
    np.random.seed(2)  # the global numpy generator must not matter
    b = scripted(create_strategy(name, MIXED, seed=7))
    c = scripted(create_strategy(name, MIXED, seed=8))
    assert a == b
    assert a != c


def test_leaves_global_random_state_alone(name: str) -> None:
    np.random.seed(11)
    before = np.random.get_state()[1].copy()
    scripted(create_strategy(name, MIXED, seed=7), budget=20)
    assert np.array_equal(np.random.get_state()[1], before)


def test_state_round_trip_with_pending(name: str) -> None:
    cls = strategies()[name]
    s = cls(MIXED, seed=21)
    drive(s, mixed, 20, batches=(3, 2), fail=lambda i: i % 5 == 1)
    asked = s.ask(3)
    assert asked
    s.tell([result(asked[0], mixed)])  # one told, the rest pending

    state = json.loads(json.dumps(s.state_dict()))
    t = cls(MIXED, seed=999)  # the seed must come from the state
    t.load_state_dict(state)
    assert t.pending == s.pending
    assert t.state_dict() == state

    for c in s.pending:
        r = result(c, mixed)
        s.tell([r])
        t.tell([r])
    for n in (2, 4, 1, 3, 5):
        a, b = s.ask(n), t.ask(n)
        assert a == b
        s.tell(result(c, mixed) for c in a)
        t.tell(result(c, mixed) for c in b)
    assert s.state_dict() == t.state_dict()


def test_state_of_another_strategy_is_refused(name: str) -> None:
    s = create_strategy(name, SPHERE)
    others = [n for n in NAMES if n != name]
    foreign = (create_strategy(others[0], SPHERE).state_dict() if others
               else {**s.state_dict(), "strategy": "someone-else"})
    with pytest.raises(StrategyError, match="belongs to strategy"):
        s.load_state_dict(foreign)
    with pytest.raises(StrategyError, match="version"):
        s.load_state_dict({**s.state_dict(), "version": 999})


# -- options ------------------------------------------------------------------------------

def test_bad_options_name_the_key(name: str) -> None:
    with pytest.raises(StrategyError, match="no_such_option"):
        create_strategy(name, SPHERE, {"no_such_option": 1})
    for key in strategies()[name].Options.model_fields:
        # A nested value no scalar option accepts; a field that does accept it is skipped.
        try:
            create_strategy(name, SPHERE, {key: {"not": ["a", "valid", "value"]}})
        except StrategyError as err:
            assert key in str(err) and name in str(err)


def test_default_options_round_trip(name: str) -> None:
    cls = strategies()[name]
    dumped = cls(SPHERE).options.model_dump(mode="json")
    assert cls(SPHERE, dumped).options == cls(SPHERE).options
    json.dumps(dumped)


# -- optimisation -------------------------------------------------------------------------

@pytest.mark.parametrize("name", params(SINGLE))
def test_single_objective_uses_the_weighted_sum(name: str) -> None:
    s = create_strategy(name, WEIGHTED, seed=0)
    history = drive(s, weighted, 200, batches=(6,))
    late = np.array(genomes(history)[-20:])
    assert np.linalg.norm(late.mean(axis=0) - WEIGHTED_OPT) < 0.2
    best = min(history, key=lambda h: WEIGHTED.scalar_loss(h[1].values))[0].genome
    assert np.linalg.norm(np.asarray(best) - WEIGHTED_OPT) < 0.1


@pytest.mark.parametrize("name", params(MULTI))
def test_multi_objective_spreads_a_front(name: str) -> None:
    history = drive(create_strategy(name, ZDT, seed=0), zdt1, 300, batches=(10,))
    assert len(front(losses(history, ZDT))) >= 5


def sphere_run(name: str, seed: int, budget: int = 80) -> list[tuple[Candidate, Result]]:
    return drive(create_strategy(name, SPHERE, seed=seed), sphere, budget, batches=(4,))


SEEDS = (0, 1, 2)


def test_improves_on_its_first_candidates(name: str) -> None:
    """Median over seeds: best after 80 evaluations well below the best of the first 8."""
    runs = [sphere_run(name, seed) for seed in SEEDS]
    first = np.median([best_loss(h[:8], SPHERE) for h in runs])
    final = np.median([best_loss(h, SPHERE) for h in runs])
    assert final < 0.8 * first


@pytest.mark.parametrize("name", sorted({"cmaes", "tpe"} & set(NAMES)))
def test_beats_random_search(name: str) -> None:
    mine = np.median([best_loss(sphere_run(name, seed), SPHERE) for seed in SEEDS])
    random = np.median([best_loss(sphere_run("random", seed), SPHERE) for seed in SEEDS])
    assert mine < 0.5 * random


@pytest.mark.parametrize("name", sorted({"nsga2"} & set(NAMES)))
def test_hypervolume_beats_random_search(name: str) -> None:
    hv = HV(ref_point=ZDT_REF)

    def volume(strategy: str, seed: int) -> float:
        history = drive(create_strategy(strategy, ZDT, seed=seed), zdt1, 200, batches=(10,))
        return float(hv(front(losses(history, ZDT))))

    for seed in SEEDS:
        assert volume(name, seed) > volume("random", seed) + 0.3


@pytest.mark.parametrize(
    "name", params(n for n, cls in strategies().items()
                   if "include_init" in cls.Options.model_fields))
def test_include_init_proposes_the_start_point_first(name: str) -> None:
    for seed in (0, 1):
        first = create_strategy(name, MIXED, seed=seed).ask(3)[0]
        assert first.id == 0 and first.genome == list(MIXED.x0)
    off = create_strategy(name, MIXED, {"include_init": False}).ask(3)
    assert all(c.genome != list(MIXED.x0) for c in off)


_RESUME = """
import json, sys
from mergesearch.strategies import Dimension, Objective, Problem, create_strategy
data = json.load(sys.stdin)
problem = Problem(tuple(Dimension(*d) for d in data["dims"]),
                  tuple(Objective(*o) for o in data["objectives"]))
out = {}
for name, state in data["states"].items():
    s = create_strategy(name, problem, seed=12345)
    s.load_state_dict(state)
    out[name] = [c.genome for c in s.pending + s.ask(4)]
json.dump(out, sys.stdout)
"""


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
@pytest.mark.parametrize("group", ["light", pytest.param("heavy", marks=EXPENSIVE)])
def test_resume_in_a_fresh_process(group: str) -> None:
    """A state replays identically in another interpreter (other hash seed: a resumed run)."""
    states, expected = {}, {}
    for name in NAMES:
        if (name in HEAVY) != (group == "heavy"):
            continue
        s = create_strategy(name, MIXED, seed=5)
        drive(s, mixed, 25, batches=(4, 3), fail=lambda i: i % 6 == 2)
        s.ask(2)
        states[name] = s.state_dict()
        expected[name] = [c.genome for c in s.pending + s.ask(4)]
    data = {"states": states,
            "dims": [[d.name, d.low, d.high, d.init] for d in MIXED.dims],
            "objectives": [[o.name, o.direction, o.weight] for o in MIXED.objectives]}
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": "4321", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", _RESUME], input=json.dumps(data), env=env,
                          cwd=root, capture_output=True, text=True, check=True, timeout=600)
    assert json.loads(done.stdout) == expected


# -- second-round contracts: typed variables, proposals, what a strategy is told -----------

#: One dimension of every kind, with a loss that prefers a corner of each.
TYPED = Problem((Dimension("w", 0.0, 1.0, 0.5), Dimension.integer("k", 1, 6, 3),
                 Dimension.categorical("src", ["a", "b", "c"], "a"),
                 Dimension.binary("on", 0)),
                (Objective("loss", "minimize"), Objective("size", "minimize")))


def typed(x: np.ndarray) -> dict[str, float]:
    return {"loss": float((x[0] - 0.2) ** 2 + abs(x[1] - 5) + (x[2] != 2) + (1 - x[3])),
            "size": float(x[1])}


def test_every_variable_type_is_searched_or_refused_by_name(name: str) -> None:
    cls = strategies()[name]
    if not {"int", "categorical", "binary"} <= cls.kinds:
        with pytest.raises(StrategyError, match=r"searches [a-z, ]+ variables only.*use .*random"):
            cls(TYPED, seed=0)
        if "binary" in cls.kinds:  # the kinds it does take are searched, both values seen
            mixed = Problem((TYPED.dims[0], TYPED.dims[3]), TYPED.objectives)
            history = drive(cls(mixed, seed=4), lambda x: typed(np.array([x[0], 5, 2, x[1]])),
                            40, batches=(3, 5))
            assert {c.genome[1] for c, _ in history} == {0.0, 1.0}
        return
    s = cls(TYPED, seed=4)
    history = drive(s, typed, 60, batches=(3, 5))
    seen = {d.name: set() for d in TYPED.dims}
    for cand, _ in history:
        for g, d in zip(cand.genome, TYPED.dims, strict=True):
            assert d.contains(g), (d.name, g)
            seen[d.name].add(d.label(g))
    assert seen["src"] == {"a", "b", "c"} and seen["on"] == {0, 1}
    assert len(seen["k"]) >= 4 and all(isinstance(v, int) for v in seen["k"])


def test_typed_state_round_trips(name: str) -> None:
    cls = strategies()[name]
    if "categorical" not in cls.kinds:
        pytest.skip(f"{name} searches {', '.join(sorted(cls.kinds))} variables only")
    s = cls(TYPED, seed=5)
    drive(s, typed, 12, batches=(4,))
    s.ask(2)
    t = cls(TYPED, seed=0)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.pending == s.pending
    for c in s.pending:
        s.tell([result(c, typed)])
        t.tell([result(c, typed)])
    assert s.ask(4) == t.ask(4)


def test_what_a_strategy_is_told_is_what_its_log_keeps(name: str) -> None:
    """Told live or replayed, a strategy hears the same: values, status, payloads, and
    per-item correctness only if it declares ``uses_items``."""
    s = create_strategy(name, MIXED, seed=8)
    heard: list[Result] = []
    original = s._tell
    s._tell = lambda told: (heard.extend(r for _, r in told), original(told))[-1]
    cands = s.ask(3)
    s.tell(Result(c.id, mixed(np.asarray(c.genome)), scores={"t": {"m": 1.0}},
                  correct={"t": [True, False]}, items={"t": [4, 9]}, timings={"merge": 1.0})
           for c in cands)
    state = json.loads(json.dumps(s.state_dict()))
    t = create_strategy(name, MIXED, seed=8)
    replay: list[Result] = []
    original_t = t._tell
    t._tell = lambda told: (replay.extend(r for _, r in told), original_t(told))[-1]
    t.load_state_dict(state)
    assert heard == replay and len(heard) == 3
    for r in heard:
        assert r.scores == {} and r.timings == {}
        assert (r.correct, r.items) == (({"t": [True, False]}, {"t": [4, 9]})
                                        if s.uses_items else ({}, {}))


def test_proposals_outside_the_contract_are_refused_at_ask() -> None:
    class Bad(Strategy):
        name = "bad-for-test"
        description = "test only"
        multi_objective = True

        def _setup(self):
            self.next = None

        def _ask(self, n):
            return [self.next]

        def _tell(self, told):
            pass

    from mergesearch.strategies import Proposal

    s = Bad(TYPED)
    cases = {
        "outside": Proposal(genome=[1.5, 1, 0, 0]),
        "not a int value": Proposal(genome=[0.5, 2.5, 0, 0]),
        "not a categorical value": Proposal(genome=[0.5, 2, 0.5, 0]),
        "neither a genome nor a recipe": Proposal(),
        "both a genome and a recipe": Proposal(genome=[0.5, 2, 0, 0], recipe={"method": "x"}),
        "invalid recipe": Proposal(recipe={"method": "no-such-method", "models": []}),
        "fidelity": Proposal(genome=[0.5, 2, 0, 0], fidelity=0.0),
        "not plain JSON": Proposal(genome=[0.5, 2, 0, 0], meta={"x": object()}),
    }
    for message, proposal in cases.items():
        s.next = proposal
        with pytest.raises(StrategyError, match=message):
            s.ask(1)
    assert s.state_dict()["log"] == [] and s.pending == []  # nothing was asked
    s.next = Proposal(genome=[0.5, 2, 1, 1], kind="delta_stats", meta={"why": "probe"})
    (cand,) = s.ask(1)
    assert (cand.kind, cand.is_probe, cand.meta) == ("delta_stats", True, {"why": "probe"})
