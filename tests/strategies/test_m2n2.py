"""M2N2: resource competition and attraction by hand, children that equal a split-point
global-angle SLERP of their parents' weights (rebuilt from the recipes alone), the
region probe against numpy, the shipped experiment files, and a search killed mid-run
that comes back with the same archive and per-item scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import kill_mid_run

import mergesearch.strategies.m2n2 as m2n2
from mergesearch.recipe import Recipe
from mergesearch.strategies import Dimension, Objective, Problem
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[2]
STRATEGY = "mergesearch.strategies.m2n2:M2N2"
LAYOUT = [["t0", [4, 5], 0], ["t1", [6], 0], ["t2", [3, 4], 1], ["t3", [7], None]]
N = 20 + 6 + 12 + 7
MODELS = ["a", "b", "c"]


def recipe_problem(models=MODELS) -> Problem:
    def decode(x):
        return Recipe.from_dict({"method": "linear", "models": [
            {"model": m, "parameters": {"weight": 1.0}} for m in models]})
    return Problem((Dimension("x", 0.0, 1.0, 0.5),), (Objective("acc", "maximize"),),
                   decode=decode)


def gram_payload(vectors: np.ndarray, granularity: str, block: int = 1) -> dict:
    """The probe's answer for ``vectors`` [S, N], computed directly with numpy."""
    cuts = m2n2.units(LAYOUT, granularity, block)
    iu = np.triu_indices(len(vectors))
    grams = [(vectors[:, a:b] @ vectors[:, a:b].T)[iu] for a, b in zip(cuts, cuts[1:],
                                                                         strict=False)]
    return {"tensors": LAYOUT, "models": MODELS, "granularity": granularity,
            "block": block, "gram": [g.tolist() for g in grams]}


def rebuild(recipe: dict, vectors: np.ndarray) -> np.ndarray:
    """A recipe's weights, flattened, from the source vectors (no noise terms)."""
    if recipe["method"] == "linear":
        (entry,) = recipe["models"]
        return vectors[MODELS.index(entry["model"])].copy()
    out = np.zeros(vectors.shape[1])
    for entry in recipe["models"]:
        p = entry["parameters"]
        assert "noise_term" not in p
        lo, hi = int(p.get("start", 0)), int(min(p.get("end", N), N))
        out[lo:hi] += p["weight"] * vectors[MODELS.index(entry["model"])][lo:hi]
    return out


def slerp(a: np.ndarray, b: np.ndarray, w: float, split: int) -> np.ndarray:
    omega = math.acos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))
    t = np.where(np.arange(len(a)) < split, w, 1 - w)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / math.sin(omega)


@pytest.mark.parametrize("granularity, block", [("flattened", 1), ("flattened", 4),
                                                ("rows", 1), ("tensors", 1),
                                                ("layers", 1)])
def test_children_are_split_point_slerps_of_their_parents(granularity, block):
    """Every child, rebuilt from its recipe, equals the SLERP (one angle over all weights,
    t = w before the split and 1 - w after) of its parents rebuilt from theirs, over
    several generations (children of children)."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((3, N)) + 0.5
    s = m2n2.M2N2(recipe_problem(), {"granularity": granularity, "block": block,
                                     "archive": 4, "prune": 0.0}, seed=3)
    first = s.ask(4)
    assert first[0].kind == m2n2.PROBE and [c.meta["role"] for c in first[1:]] == \
        ["initial"] * 3
    assert s.ask(2) == []  # nothing to cross before the probe and the scores
    s.tell([Result(first[0].id, payload=gram_payload(vectors, granularity, block))])
    weights = {}
    for c in first[1:]:
        weights[c.id] = rebuild(c.recipe.to_dict(), vectors)
        s.tell([Result(c.id, {"acc": 0.5}, correct={"t": list(rng.random(12) < 0.5)},
                       items={"t": list(range(12))})])
    splits = set()
    for _ in range(25):
        (c,) = s.ask(1)
        pa, pb = c.meta["parents"]
        got = rebuild(c.recipe.to_dict(), vectors)
        want = slerp(weights[pa], weights[pb], c.meta["w"], c.meta["split"])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        assert c.meta["split"] in set(m2n2.units(LAYOUT, granularity, block).tolist())
        splits.add(c.meta["split"])
        weights[c.id] = got
        s.tell([Result(c.id, {"acc": 0.5}, correct={"t": list(rng.random(12) < 0.5)},
                       items={"t": list(range(12))})])
    assert len(splits) > 1 or granularity == "layers"


def test_no_split_interpolates_everywhere_with_w():
    vectors = np.random.default_rng(2).standard_normal((3, N))
    s = m2n2.M2N2(recipe_problem(), {"split": False, "prune": 0.0}, seed=0)
    first = s.ask(4)
    s.tell([Result(first[0].id, payload=gram_payload(vectors, "flattened"))])
    s.tell([Result(c.id, {"acc": 0.5}, correct={"t": [True, False]}, items={"t": [0, 1]})
            for c in first[1:]])
    (c,) = s.ask(1)
    pa, pb = (vectors[p - 1] for p in c.meta["parents"])  # initial members 1, 2, 3
    want = slerp(pa, pb, c.meta["w"], N)
    np.testing.assert_allclose(rebuild(c.recipe.to_dict(), vectors), want, rtol=1e-9)


def test_mutation_adds_a_seeded_noise_term_to_every_child():
    vectors = np.random.default_rng(2).standard_normal((3, N))
    s = m2n2.M2N2(recipe_problem(), {"mutation_std": 0.01}, seed=0)
    first = s.ask(4)
    s.tell([Result(first[0].id, payload=gram_payload(vectors, "rows"))])
    s.tell([Result(c.id, {"acc": 0.5}, correct={"t": [True, False]}, items={"t": [0, 1]})
            for c in first[1:]])
    (c,) = s.ask(1)
    noise = [e["parameters"] for e in c.recipe.to_dict()["models"]
             if "noise_term" in e["parameters"]]
    assert noise == [{"weight": 0.01, "start": 0.0, "end": float(N),
                      "noise_term": float(c.id + 1)}]


def test_resource_competition_and_attraction_by_hand():
    s = m2n2.M2N2(recipe_problem(), {"archive": 3}, seed=0)
    scores = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=float)
    f, shared = s._fitness(scores)
    z = np.array([2, 2, 1, 1.0])  # z = 0 counts as 1
    np.testing.assert_allclose(f, [(1 / 2 + 1 / 2), 1 / 2, 1 / 2 + 1])
    np.testing.assert_allclose(shared, scores / z)
    # the attraction of A = member 1 to each B: what B gets right that A does not
    g = np.maximum(0.0, shared - shared[1]).sum(axis=1)
    np.testing.assert_allclose(g, [0.5, 0.0, 1.5])
    # a child joins and the lowest fitness, the child counted, leaves
    s.archive = [m2n2.Member(i, scores=row.astype(bool)) for i, row in enumerate(scores)]
    s._join(m2n2.Member(9, scores=np.array([1, 1, 1, 0], dtype=bool)))
    # z = [3, 3, 2, 0]: f = [2/3, 1/3, 1/3 + 1/2, 2/3 + 1/2]; member 1 leaves
    assert [m.id for m in s.archive] == [0, 2, 9]


def test_parent_b_follows_attraction_not_fitness():
    """A member that alone gets the items the others miss is B nearly always."""
    s = m2n2.M2N2(recipe_problem(), {"archive": 4}, seed=0)
    rows = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
    s.archive = [m2n2.Member(i, scores=np.array(r, dtype=bool)) for i, r in enumerate(rows)]
    pairs = [s._parents() for _ in range(400)]
    with_b = [b for a, b in pairs if a != 3]
    assert np.mean(np.array(with_b) == 3) > 0.95
    s.options = s.options.model_copy(update={"attraction": False})
    pairs = [s._parents() for _ in range(400)]
    assert np.mean(np.array([b for a, b in pairs if a != 3]) == 3) < 0.6


def test_the_region_probe_matches_numpy_on_the_digits_models():
    from mergesearch.models.resident import ResidentMerger
    from mergesearch.trial import Candidate
    from mergesearch.zoo.digits import load

    class Worker:
        merger = ResidentMerger(device="cpu", loader="mergesearch.zoo.digits:load")

    recipe = Recipe.from_dict({"method": "linear", "models": [
        {"model": "scratch:0", "parameters": {"weight": 1.0}},
        {"model": "scratch:1", "parameters": {"weight": 1.0}}]})
    cand = Candidate(0, None, kind=m2n2.PROBE, recipe=recipe,
                     meta={"granularity": "rows", "block": 1})
    payload = m2n2.region_gram(Worker(), None, cand)
    names = [t[0] for t in payload["tensors"]]
    assert names == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    flat = [np.concatenate([load(f"scratch:{k}")[1][n].double().numpy().ravel()
                            for n in names]) for k in (0, 1)]
    cuts = m2n2.units(payload["tensors"], "rows")
    assert len(cuts) - 1 == 256 + 1 + 10 + 1
    for u in (0, 255, 256, 257, 266, 267):
        a, b = cuts[u], cuts[u + 1]
        x, y = flat[0][a:b], flat[1][a:b]
        np.testing.assert_allclose(payload["gram"][u], [x @ x, x @ y, y @ y], rtol=1e-10)
    json.dumps(payload)


def test_generic_problems_run_on_genomes():
    problem = Problem(tuple(Dimension(f"x{i}", -1.0, 1.0, 0.0) for i in range(3)),
                      (Objective("loss", "minimize"),))
    s = m2n2.M2N2(problem, seed=0)
    first = s.ask(20)
    assert first[0].genome == [0.0, 0.0, 0.0] and len(first) == 20
    s.tell(Result(c.id, {"loss": float(np.sum(np.square(c.genome)))}) for c in first)
    child = s.ask(1)[0]
    assert child.meta["role"] == "child" and len(child.meta["parents"]) == 2


# -- the shipped experiments --------------------------------------------------------------

EXPERIMENTS = ["experiments/digits/m2n2_scratch.yaml", "experiments/digits/m2n2_pretrained.yaml",
               "experiments/zoo/m2n2.yaml", "experiments/hard/m2n2.yaml",
               "experiments/m2n2_llm/wizardmath_agentevol.yaml"]


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_the_shipped_experiments_validate(path):
    from mergesearch.experiment import Experiment

    exp = Experiment.load(ROOT / path)  # hub ids are not fetched
    assert exp.strategy.name == "m2n2"
    options = m2n2.M2N2.parse_options(exp.strategy.options)
    assert options.archive == 20 and options.alpha == 1.0
    assert (options.mutation_std == 0.01) == ("scratch" in path)


def test_the_llm_experiment_is_wizardmath_and_a_llama2_agent():
    from mergesearch.experiment import Experiment

    exp = Experiment.load(ROOT / "experiments/m2n2_llm/wizardmath_agentevol.yaml")
    sources = set(exp.models.sources.values())
    assert "WizardLMTeam/WizardMath-7B-V1.0" in sources and len(sources) == 2
    assert [o.metric for o in exp.evaluator.objectives] == ["exact_match,last_number"]
    assert m2n2.M2N2.parse_options(exp.strategy.options).granularity == "tensors"


# -- a search killed mid-run ---------------------------------------------------------------

def _digits_yaml(tmp_path: Path, name: str) -> Path:
    data = yaml.safe_load((ROOT / "experiments/digits/m2n2_pretrained.yaml").read_text())
    data.update(name="t", output=str(tmp_path / name), budget={"evaluations": 40})
    data["strategy"] = {"name": STRATEGY, "options": {"archive": 6, "granularity": "rows"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _rebuilt(path: Path):
    from mergesearch.controller import BoundExperiment
    from mergesearch.experiment import Experiment
    from mergesearch.storage import TrialStore

    exp = Experiment.load(path)
    store = TrialStore.open(exp.storage_url, "t")
    strategy = BoundExperiment(exp, progress=False).strategy
    strategy.load_state_dict(store.load_state())
    return strategy, store.trials(), store.probes()


@pytest.mark.slow
def test_killed_mid_run_the_archive_and_its_item_scores_come_back_exactly(tmp_path):
    from mergesearch.cli import main

    killed = _digits_yaml(tmp_path, "killed")
    kill_mid_run(killed, tmp_path / "killed" / "study.db", 15)
    assert main(["run", str(killed), "--resume", "-q"]) == 0
    whole = _digits_yaml(tmp_path, "whole")
    assert main(["run", str(whole), "-q"]) == 0
    a, trials_a, probes_a = _rebuilt(killed)
    b, trials_b, probes_b = _rebuilt(whole)
    assert len(probes_a) == len(probes_b) == 1 and probes_a[0].payload == probes_b[0].payload
    assert sorted((t.candidate_id, json.dumps(t.recipe, sort_keys=True), t.values["accuracy"])
                  for t in trials_a) == \
        sorted((t.candidate_id, json.dumps(t.recipe, sort_keys=True), t.values["accuracy"])
               for t in trials_b)
    assert [m.id for m in a.archive] == [m.id for m in b.archive] and len(a.archive) == 6
    assert a.history == b.history
    stored = {t.candidate_id: t for t in trials_a}
    for ma, mb in zip(a.archive, b.archive, strict=True):
        assert np.array_equal(ma.scores, mb.scores)
        assert np.array_equal(ma.scores, np.asarray(stored[ma.id].correct["digits"]))
        assert a.recipe_of(ma) == b.recipe_of(mb)
        if a.recipe_of(ma) is not None:  # a child: its recipe is the stored one
            assert Recipe.from_dict(a.recipe_of(ma)) == Recipe.from_dict(stored[ma.id].recipe)


@pytest.mark.slow
def test_digits_from_the_pretrained_halves_through_mergesearch_run(tmp_path):
    """The reduced-budget benchmark (benchmarks/m2n2_digits.py): 300 passes of M2N2 from the
    two pretrained halves beat both halves and their uniform merge on the test images."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from m2n2_digits import cli_run, summarise

    from mergesearch.zoo.digits import build_digits

    manifest = json.loads((build_digits() / "manifest.json").read_text())["test_accuracy"]
    url = cli_run(ROOT / "experiments/digits/m2n2_pretrained.yaml", tmp_path / "run", 0, 300)
    got = summarise(url, [100, 300])
    assert got["n"] == 300 and got["curve"][300] >= got["curve"][100]
    assert got["test"] > max(manifest["low"], manifest["high"]) + 0.15
    assert got["test"] > manifest["uniform_merge"], (got, manifest)
    assert got["per_s"] > 0 and got["entries"] is not None


@pytest.mark.slow
def test_from_scratch_in_the_lean_engine_improves_on_the_untrained_models(tmp_path):
    """benchmarks/m2n2_digits.py's scratch leg with ``--engine lean``: the CLI experiment's
    strategy and options on the twenty untrained MLPs; after 300 passes the best child
    beats every initial member (the first 20 passes), and ``--max-seconds`` stops a run
    early at the passes it reached."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from m2n2_digits import main

    out = tmp_path / "lean.json"
    assert main(["--legs", "scratch", "--engine", "lean", "--seeds", "0", "--budget", "300",
                 "--budgets", "20,300", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["scratch"]
    assert row["engine"] == "lean" and row["n"] == 300
    assert row["curve"]["300"] > row["curve"]["20"] + 0.05, row
    assert 0.0 < row["test"] <= 1.0 and row["best_train"] == row["curve"]["300"]
    assert main(["--legs", "scratch", "--engine", "lean", "--seeds", "0", "--budget",
                 "1000000", "--max-seconds", "1", "--budgets", "20", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["scratch"]
    assert 0 < row["n"] < 1_000_000 and row["wall_s"] < 60
