"""MAP, Bayesian MAP and nested MAP: the surrogate maths, the strategies' rounds, replay in a
fresh process and a SIGKILLed search resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pymoo.indicators.igd import IGD

import mergesearch.strategies.map  # noqa: F401  (registers map, bayesian_map, nested_map)
from mergesearch.strategies import Dimension, Objective, Problem, StrategyError, create_strategy
from mergesearch.strategies import map_surrogate as ms
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[2]
MAPS = ("map", "bayesian_map", "nested_map")


def sigmoid(t: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-t))


# -- the surrogate ---------------------------------------------------------------------

@pytest.mark.parametrize("link", ["sigmoid", "softplus", "identity"])
def test_fit_recovers_a_known_quadratic_from_noiseless_samples(link: str) -> None:
    rng = np.random.default_rng(0)
    n = 3
    w = rng.normal(size=ms.n_coefficients(n))
    z = ms.design(n)
    # the same quadratic written out by hand: constant, linear, squares and cross terms
    t = (w[0] + z @ w[1:4] + w[4] * z[:, 0] ** 2 + w[5] * z[:, 0] * z[:, 1]
         + w[6] * z[:, 0] * z[:, 2] + w[7] * z[:, 1] ** 2 + w[8] * z[:, 1] * z[:, 2]
         + w[9] * z[:, 2] ** 2)
    y = {"sigmoid": sigmoid(t), "softplus": np.log1p(np.exp(t)), "identity": t}[link]
    fitted = ms.fit(z, y, link, ridge=0.0)
    assert fitted.link == link
    np.testing.assert_allclose(fitted.w, w, atol=1e-6)
    fresh = rng.random((50, n))  # and it predicts away from the samples
    np.testing.assert_allclose(fitted(fresh), ms.Quadratic(w, link)(fresh), atol=1e-7)


def test_auto_link_follows_the_values() -> None:
    assert ms.choose_link(np.array([0.0, 0.4, 1.0])) == "sigmoid"
    assert ms.choose_link(np.array([0.0, 3.0])) == "softplus"
    assert ms.choose_link(np.array([-1.0, 0.5])) == "identity"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8])
def test_design_has_n_plus_1_n_plus_2_distinct_points_inside_the_box(n: int) -> None:
    z = ms.design(n)
    assert z.shape == ((n + 1) * (n + 2), n)
    assert len(np.unique(z, axis=0)) == len(z)
    assert z.min() >= 0.0 and z.max() <= 1.0
    np.testing.assert_array_equal(z[:n], np.eye(n))  # the one-hot points first
    rest = z[n:]
    if n > 1:  # held out: one-hot, sum-to-one and all-equal points
        assert not np.any(np.isclose(rest.sum(axis=1), 1.0))
        assert not np.any(np.isclose(rest.max(axis=1), rest.min(axis=1)))
    # every coefficient of the quadratic is identifiable from the design
    assert np.linalg.matrix_rank(ms.features(z)) == ms.n_coefficients(n)


def test_the_strategy_design_lies_in_the_bounds_and_unit_box() -> None:
    problem = Problem((Dimension("a", -0.5, 1.5, 0.5), Dimension("b", 0.2, 1.0, 0.5),
                       Dimension("c", -300.0, -100.0, -200.0)),
                      (Objective("f", "maximize"), Objective("g", "minimize")))
    s = create_strategy("map", problem)
    cands = s.ask(100)
    assert len(cands) == 20 and all(c.meta["phase"] == "design" for c in cands)
    g = np.array([c.genome for c in cands])
    assert g[:, 0].min() >= 0.0 and g[:, 0].max() <= 1.0  # [0, 1] inside the bounds
    assert g[:, 1].min() >= 0.2 and g[:, 1].max() <= 1.0  # [0, 1] cut by the bounds
    assert g[:, 2].min() >= -300.0 and g[:, 2].max() <= -100.0  # the bounds themselves
    assert len({tuple(x) for x in g}) == 20
    assert s.ask(3) == []  # a round is a barrier: its fit needs every design point


# -- a toy whose metrics ARE quadratics through a sigmoid ------------------------------

W2 = [np.array([0.5, 4.0, -1.0, -3.0, 0.5, -1.0]), np.array([0.2, -1.5, 3.5, -1.0, 0.5, -2.5])]


def toy_values(x: np.ndarray, ws=W2) -> dict[str, float]:
    return {f"m{i}": float(ms.Quadratic(w, "sigmoid")(x)[0]) for i, w in enumerate(ws)}


def toy_problem(n: int = 2, m: int = 2) -> Problem:
    return Problem(tuple(Dimension(f"c{i}", 0.0, 1.0, 0.5) for i in range(n)),
                   tuple(Objective(f"m{i}") for i in range(m)))


def run_rounds(s, fn, rounds: int) -> list:
    history = []
    for _ in range(rounds):
        cands = s.ask(1000)
        s.tell([Result(c.id, fn(np.array(c.genome))) for c in cands])
        history += cands
    return history


def grid_values(n: int, points: int, ws=W2) -> tuple[np.ndarray, np.ndarray]:
    """A dense grid of ``[0, 1]^n`` and the toy's values there (one column per metric)."""
    axes = np.meshgrid(*[np.linspace(0, 1, points)] * n, indexing="ij")
    grid = np.stack([a.ravel() for a in axes], axis=1)
    return grid, np.column_stack([ms.Quadratic(w, "sigmoid")(grid) for w in ws])


def true_front(n: int, points: int = 201) -> np.ndarray:
    """The non-dominated losses of a dense grid of real evaluations."""
    F = -grid_values(n, points)[1]
    order = np.lexsort(F.T[::-1])
    F = F[order]
    keep, best = [], np.inf
    for f in F:  # two objectives: sorted by the first, keep strict improvements of the second
        if f[1] < best - 1e-12:
            keep.append(f)
            best = f[1]
    return np.array(keep)


def test_predicted_front_matches_the_true_front_of_a_quadratic_sigmoid_toy() -> None:
    s = create_strategy("map", toy_problem(), {"front_points": 6})
    history = run_rounds(s, toy_values, 2)  # the design, then one front round
    assert [c.meta["phase"] for c in history].count("design") == 12
    (front,) = s.fronts
    predicted = -np.array(front["predicted"])
    igd = IGD(true_front(2))(predicted)
    assert igd < 0.01, igd
    validated = [c for c in history if c.meta["phase"] == "front"]
    assert len(validated) == 6 and sum(c.meta["preferred"] for c in validated) == 1
    for c in validated:  # predicted values stored with the proposal match the actual ones
        actual = toy_values(np.array(c.genome))
        for name, value in c.meta["predicted"].items():
            assert abs(value - actual[name]) < 1e-4


def test_the_preference_point_maximises_the_weighted_sum() -> None:
    p = [0.8, 0.2]
    s = create_strategy("map", toy_problem(), {"preference": p, "select": "preference",
                                               "front_points": 3})
    history = run_rounds(s, toy_values, 2)
    chosen = next(c for c in history if c.meta.get("preferred"))
    best = float(np.max(grid_values(2, 401)[1] @ np.array(p)))
    got = toy_values(np.array(chosen.genome))
    assert p[0] * got["m0"] + p[1] * got["m1"] > best - 1e-3
    scores = [c.meta["preference_score"] for c in history if c.meta["phase"] == "front"]
    assert scores == sorted(scores, reverse=True)  # select: preference, best first


def test_preference_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(StrategyError, match="preference has 3 entries for 2 objectives"):
        create_strategy("map", toy_problem(), {"preference": [1, 1, 1]})


# -- Bayesian MAP ------------------------------------------------------------------------

def test_bayesian_map_adds_points_in_bins_then_validates_fronts() -> None:
    ws = [*W2, np.array([0.0, 1.0, 1.0, -2.0, 0.0, -2.0])]
    s = create_strategy("bayesian_map", toy_problem(2, 3),
                        {"design": 6, "adaptive": 4, "batch": 2, "front_points": 4})
    fn = lambda x: toy_values(x, ws)  # noqa: E731
    history = run_rounds(s, fn, 4)
    phases = [c.meta["phase"] for c in history]
    assert phases == ["design"] * 6 + ["adaptive"] * 4 + ["front"] * 4
    for c in history[6:10]:
        assert 0 <= min(c.genome) and max(c.genome) <= 1  # inside the design box
        assert len(c.meta["bin"]) == 1 and 0 <= c.meta["bin"][0] < 3  # one angle, 3 bins
        assert set(c.meta["predicted"]) == {"m0", "m1", "m2"}
    assert len({tuple(c.genome) for c in history}) == len(history)


def test_bayesian_map_refuses_many_dimensions_by_name() -> None:
    with pytest.raises(StrategyError, match="max_dims 6: use map or nested_map"):
        create_strategy("bayesian_map", toy_problem(7, 2))


def test_the_league_runs_bayesian_map_on_the_hard_zoos_seven_sources(monkeypatch) -> None:
    """benchmarks/strategies.py raises max_dims on the hard zoo only (7 per-source weights):
    with its options there bayesian_map starts on 7 dimensions, with the preset alone not."""
    from helpers import load_script

    league = load_script("benchmarks/strategies.py", "league", monkeypatch)
    hard = league.options_for("bayesian_map", "hard")
    assert hard == league.PRESETS["bayesian_map"] | {"max_dims": 7}
    assert league.options_for("bayesian_map", "zoo") == league.PRESETS["bayesian_map"]
    assert league.options_for("cmaes", "hard") == league.PRESETS["cmaes"]
    s = create_strategy("bayesian_map", toy_problem(7, 1), hard, seed=0)
    assert len(s.ask(1000)) == ms.n_coefficients(7)  # its design: one point per coefficient
    with pytest.raises(StrategyError, match="max_dims 6"):
        create_strategy("bayesian_map", toy_problem(7, 1), league.PRESETS["bayesian_map"])


# -- nested MAP --------------------------------------------------------------------------

@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_nested_map_merges_the_closest_pairs_and_composes_their_weights() -> None:
    """Four 'experts' (one per dimension), objective i best at weight i = 1: experts 0 and
    1 score alike, 2 and 3 alike, so they pair up first; the last merge searches x a + y b
    for the two merged weight vectors a, b."""
    target = np.array([[1.0, 0.2, 0.0, 0.0], [0.2, 1.0, 0.0, 0.0],
                       [0.0, 0.0, 1.0, 0.6], [0.0, 0.0, 0.6, 1.0]])
    speed = np.array([1.0, 1.0, 3.0, 3.0])

    def fn(x: np.ndarray) -> dict[str, float]:
        return {f"m{i}": float(np.exp(-speed[i] * np.sum((x - target[i]) ** 2)))
                for i in range(4)}

    s = create_strategy("nested_map", toy_problem(4, 4), {"front_points": 3})
    history = run_rounds(s, fn, 1 + 2 * 3)  # experts, then 3 merges of design + front
    assert [c.meta["phase"] for c in history[:4]] == ["experts"] * 4
    assert [c.genome for c in history[:4]] == np.eye(4).tolist()
    pairs = {tuple(m["pair"]): m for m in s.merges[:2]}
    assert set(pairs) == {("c0", "c1"), ("c2", "c3")}
    a, b = (np.array(pairs[k]["z"]) for k in (("c0", "c1"), ("c2", "c3")))
    last = [c for c in history if c.meta.get("stage") == 2]
    assert len(last) == 10 + 3
    for c in last:  # each genome is x (a, 0) + y (0, b)
        g = np.array(c.genome)
        if abs(a[0]) > 1e-9:
            np.testing.assert_allclose(g[1] * a[0], g[0] * a[1], atol=1e-9)
        if abs(b[0]) > 1e-9:
            np.testing.assert_allclose(g[3] * b[0], g[2] * b[1], atol=1e-9)
    assert len(s.merges) == 2  # the last pair merges when its front round is told
    after = run_rounds(s, fn, 1)  # one model left: its last 2-D MAP refines
    assert sorted(s.merges[2]["pair"]) == ["(c0+c1)", "(c2+c3)"]
    assert len(after) == 8 and all(c.meta["stage"] == 3 for c in after)
    final = np.array(s.merges[2]["z"])  # the merged model the pair's validation chose
    assert final.shape == (2,) and np.all(np.isfinite(final))


def _expert_fn(block: int):
    """Three experts' task vectors, each objective best at its expert alone (weight 1 on
    its dimensions); ``block`` dimensions per expert (1: per expert, 2: per layer pair)."""
    target = np.array([[1.0, 0.3, 0.0], [0.3, 1.0, 0.0], [0.0, 0.2, 1.0]])

    def fn(x: np.ndarray) -> dict[str, float]:
        w = np.asarray(x, dtype=float).reshape(3, block).mean(axis=1)  # per-expert weight
        return {f"m{i}": float(np.exp(-2.0 * np.sum((w - target[i]) ** 2))) for i in range(3)}

    return fn


def _expert_problem(block: int, bounds=(-0.5, 1.5)) -> Problem:
    names = [f"weight[{e}]" + (f"@L{k}" if block > 1 else "") for e in ("rev", "srt", "dup")
             for k in range(block)]
    return Problem(tuple(Dimension(n, *bounds, 0.5) for n in names),
                   tuple(Objective(f"m{i}") for i in range(3)))


def test_expert_groups_read_the_task_arithmetic_names() -> None:
    names = [d.name for d in _expert_problem(2).dims]
    assert mergesearch.strategies.map.expert_groups(names) == \
        [("rev", [0, 1]), ("srt", [2, 3]), ("dup", [4, 5])]
    given = {"R": ["weight[rev]@*"], "S": ["weight[srt]@L0", "weight[srt]@L1"],
             "D": ["weight[dup]@L?"]}  # brackets literal, * and ? wildcards
    assert mergesearch.strategies.map.expert_groups(names, given) == \
        [("R", [0, 1]), ("S", [2, 3]), ("D", [4, 5])]
    assert mergesearch.strategies.map.expert_groups(["a", "b"]) == [("a", [0]), ("b", [1])]


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_nested_map_on_a_per_layer_space_runs_as_on_its_per_expert_space() -> None:
    """Two layer groups per expert: the experts are scored with weight 1 on all of their
    layers, and every later merge keeps an expert's layers at one weight (merges compose
    per expert), so the search is the per-expert one, genome for genome."""
    runs = {}
    for block, opts in ((1, {}), (2, {}), (2, {"experts": {"rev": ["weight[rev]@*"],
                                                          "srt": ["weight[srt]@*"],
                                                          "dup": ["weight[dup]@*"]}})):
        s = create_strategy("nested_map", _expert_problem(block), {"front_points": 2, **opts},
                            seed=2)
        history = run_rounds(s, _expert_fn(block), 1 + 2 * 2 + 1)  # experts, 2 merges, polish
        runs[(block, bool(opts))] = (history, s)
    flat, _ = runs[(1, False)]
    for key in ((2, False), (2, True)):
        history, s = runs[key]
        assert [c.meta["phase"] for c in history[:3]] == ["experts"] * 3
        assert [c.meta["model"] for c in history[:3]] == ["rev", "srt", "dup"]
        assert [c.genome for c in history[:3]] == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                                                   [0, 0, 0, 0, 1, 1]]
        g = np.array([c.genome for c in history])
        np.testing.assert_array_equal(g[:, 0::2], g[:, 1::2])  # layers of an expert tied
        np.testing.assert_allclose(g[:, 0::2], np.array([c.genome for c in flat]), atol=1e-12)
        assert [c.meta for c in history] == [c.meta for c in flat]
        assert s.merges[0]["pair"] == ["rev", "srt"]  # the two alike experts pair first
        assert len(s.merges) == 2 and s.merges[1]["name"] == "(dup+(rev+srt))"


def test_nested_map_refuses_a_space_it_cannot_group_by_expert() -> None:
    dare = Problem((Dimension("weight[rev]", 0.0, 1.0, 0.5),
                    Dimension("weight[srt]", 0.0, 1.0, 0.5),
                    Dimension("density[rev]", 0.1, 1.0, 0.5),
                    Dimension("density[srt]", 0.1, 1.0, 0.5)), toy_problem().objectives)
    with pytest.raises(StrategyError, match="one weight parameter per expert.*parameters "
                                            "density, weight.*options.experts"):
        create_strategy("nested_map", dare)
    mixed = Problem((Dimension("weight[rev]", 0.0, 1.0, 0.5), Dimension("lam", 0.0, 1.0, 0.5)),
                    toy_problem().objectives)
    with pytest.raises(StrategyError, match="dimensions lam name no expert"):
        create_strategy("nested_map", mixed)
    names = _expert_problem(2)
    with pytest.raises(StrategyError, match="experts leaves out weight\\[dup\\]@L0, "
                                            "weight\\[dup\\]@L1"):
        create_strategy("nested_map", names, {"experts": {"a": ["weight[rev]@*"],
                                                          "b": ["weight[srt]@*"]}})
    with pytest.raises(StrategyError, match="in experts a and b"):
        create_strategy("nested_map", names, {"experts": {"a": ["weight[rev]@*"],
                                                          "b": ["weight[*]@L1"]}})
    with pytest.raises(StrategyError, match="experts.c \\(weight\\[evn\\]\\) names no "
                                            "dimension"):
        create_strategy("nested_map", names, {"experts": {"c": ["weight[evn]"]}})


# -- state -------------------------------------------------------------------------------

#: in a fresh interpreter: replay each state, tell its pending candidates, ask on
_RESUME = """
import json, sys
import numpy as np
from mergesearch.strategies import Dimension, Objective, Problem, create_strategy
from mergesearch.trial import Result
from tests.strategies.test_map import toy_values
data = json.load(sys.stdin)
problem = Problem(tuple(Dimension(*d) for d in data["dims"]),
                  tuple(Objective(*o) for o in data["objectives"]))
out = {}
for name, state in data["states"].items():
    s = create_strategy(name, problem, seed=12345)
    s.load_state_dict(state)
    pending = s.pending
    s.tell([Result(c.id, toy_values(np.array(c.genome))) for c in pending])
    out[name] = [c.genome for c in pending] + [c.genome for c in s.ask(40)]
json.dump(out, sys.stdout)
"""


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_a_state_mid_front_replays_identically_in_a_fresh_process() -> None:
    problem = toy_problem(2, 2)
    small = {"map": {"front_points": 4}, "bayesian_map": {"design": 6, "adaptive": 2},
             "nested_map": {}}
    states, expected = {}, {}
    for name in MAPS:
        s = create_strategy(name, problem, small[name], seed=5)
        run_rounds(s, toy_values, 3)
        s.ask(2)  # two of the next round pending
        states[name] = json.loads(json.dumps(s.state_dict()))
        pending = s.pending
        s.tell([Result(c.id, toy_values(np.array(c.genome))) for c in pending])
        expected[name] = [c.genome for c in pending] + [c.genome for c in s.ask(40)]
    data = {"states": states, "dims": [[d.name, d.low, d.high, d.init] for d in problem.dims],
            "objectives": [[o.name, o.direction, o.weight] for o in problem.objectives]}
    env = {**os.environ, "PYTHONHASHSEED": "4321", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _RESUME], input=json.dumps(data), env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == expected


# -- end to end: SIGKILL mid-search, resume ----------------------------------------------

KILLED = {  # options small enough for a short zoo search, budget, kill after
    "map": ({"design": 10, "front_points": 3}, 16, 12),
    "bayesian_map": ({"design": 6, "adaptive": 4, "batch": 2, "front_points": 3}, 14, 9),
    "nested_map": ({"front_points": 2}, 16, 9),  # 4 experts, 10 design, 2 front
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MAPS)
def test_sigkill_mid_search_then_resume_continues_the_same_search(zoo, tmp_path, name):
    from helpers import completed_count, kill_mid_run, zoo_experiment

    from mergesearch.cli import main
    from mergesearch.storage import TrialStore

    options, budget, after = KILLED[name]
    cls = {"map": "Map", "bayesian_map": "BayesianMap", "nested_map": "NestedMap"}[name]
    strategy = {"name": f"mergesearch.strategies.map:{cls}", "options": options}

    def write(folder: Path) -> Path:
        data = zoo_experiment(folder).model_dump(mode="json")
        data |= {"strategy": strategy, "budget": {"evaluations": budget}}
        path = folder / "exp.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    path = write(tmp_path)
    db = tmp_path / "run" / "study.db"
    kill_mid_run(path, db, after)
    assert after <= completed_count(db) < budget
    assert main(["run", str(path), "--resume", "-q"]) == 0
    ok = [t for t in TrialStore.open(f"sqlite:///{db}", "t").trials() if t.state == "ok"]
    assert sorted(t.candidate_id for t in ok) == list(range(budget))
    fronts = [t for t in ok if t.meta.get("phase") == "front"]
    assert fronts and all(set(t.meta["predicted"]) <= {"rev", "mean"} for t in fronts)
    # the same search run without a kill proposes the same candidates, with the same notes
    other = tmp_path / "whole"
    other.mkdir()
    assert main(["run", str(write(other)), "-q"]) == 0
    whole = TrialStore.open(f"sqlite:///{other / 'run' / 'study.db'}", "t").trials()
    assert {t.candidate_id: (t.params, t.meta) for t in ok} == \
        {t.candidate_id: (t.params, t.meta) for t in whole if t.state == "ok"}


@pytest.mark.parametrize("name", MAPS)
def test_one_objective_never_spends_the_budget_on_copies_of_one_merge(name: str) -> None:
    """With one objective the surrogate 'front' is a GA's collapsed final population:
    every proposal after the design stays min_distance (max-norm) from all earlier ones,
    the rounds filling up with random points, and the search still climbs the peak."""
    peak = np.array([0.7, 0.3, 0.55])

    def fn(x: np.ndarray) -> dict[str, float]:
        return {"m0": float(np.exp(-4.0 * np.sum((np.asarray(x) - peak) ** 2)))}

    problem = Problem(tuple(Dimension(f"c{i}", 0.0, 1.0, 0.5) for i in range(3)),
                      (Objective("m0"),))
    opts = {"bayesian_map": {"design": 10, "adaptive": 4}}.get(name, {})
    s = create_strategy(name, problem, {"front_points": 4, "pop_size": 24, "generations": 20,
                                        **opts}, seed=1)
    history = []
    while len(history) < 60:
        cands = s.ask(1000)
        s.tell([Result(c.id, fn(np.array(c.genome))) for c in cands])
        history += cands
    g = np.array([c.genome for c in history])
    gap = min(float(np.min(np.abs(g[:i] - g[i]).max(axis=1))) for i in range(1, len(g)))
    assert gap > 0.02 - 1e-9, gap
    late = [c for c in history if c.meta["phase"] in ("front", "explore", "adaptive")]
    assert len(late) >= 20
    best = max(fn(np.array(c.genome))["m0"] for c in history)
    assert best > 0.97, best  # the peak is 1 at (0.7, 0.3, 0.55)


def test_front_box_design_keeps_the_front_where_the_surrogates_were_fitted() -> None:
    problem = Problem(tuple(Dimension(f"c{i}", -0.5, 1.5, 0.5) for i in range(2)),
                      toy_problem().objectives)
    for box, inside in (("design", True), ("bounds", False)):
        s = create_strategy("map", problem, {"front_box": box, "front_points": 12})
        run_rounds(s, toy_values, 2)
        u = np.array(s.fronts[0]["u"])
        assert (u.min() >= 0.0 and u.max() <= 1.0) == inside, box
