"""M2N2 with ``representation: lineage`` (from scratch): every child, merged by the engine,
equals the split-point SLERP of its parents' merged weights plus its own seeded noise term,
however many generations back its lineage goes, with a recipe of a few entries; a cold
cache rebuilds members bitwise; an unknown member fails clearly; and a search killed
mid-run comes back with the very trials and archive of an uninterrupted one (its members
rebuilt from the lineage in the new process)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import kill_mid_run

import mergesearch.merging.regions as regions
import mergesearch.strategies.m2n2 as m2n2
from mergesearch.models.resident import _seed, merge
from mergesearch.recipe import Recipe
from mergesearch.strategies import Dimension, Objective, Problem
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[2]
LOADER = "mergesearch.zoo.digits:load"
NAMES = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
MODELS = [f"scratch:{k}" for k in range(3)]


def flat(recipe: dict) -> np.ndarray:
    state = merge(Recipe.from_dict(recipe), loader=LOADER).state_dict()
    return np.concatenate([state[n].double().numpy().ravel() for n in NAMES])


def noise_flat(k: int) -> np.ndarray:
    from mergesearch.zoo.digits import load

    state = load("scratch:0")[1]
    return np.concatenate([regions.noise(k, _seed(0, n), state[n].numel()).double().numpy()
                           for n in NAMES])


def probe_payload(cand) -> dict:
    from mergesearch.zoo.digits import load

    layout = [[n, list(load("scratch:0")[1][n].shape), int(n.split(".")[1])] for n in NAMES]
    x = np.stack([np.concatenate([load(m)[1][n].double().numpy().ravel() for n in NAMES])
                  for m in MODELS])
    cuts = m2n2.units(layout, cand.meta["granularity"], cand.meta["block"])
    iu = np.triu_indices(len(x))
    return {"tensors": layout, "models": MODELS, "granularity": cand.meta["granularity"],
            "block": cand.meta["block"],
            "gram": [(x[:, a:b] @ x[:, a:b].T)[iu].tolist() for a, b in zip(cuts, cuts[1:],
                                                                           strict=False)]}


def strategy(seed: int = 0) -> m2n2.M2N2:
    def decode(x):
        return Recipe.from_dict({"method": "linear", "models": [
            {"model": m, "parameters": {"weight": 1.0}} for m in MODELS]})

    problem = Problem((Dimension("x", 0.0, 1.0, 0.5),), (Objective("acc", "maximize"),),
                      decode=decode)
    return m2n2.M2N2(problem, {"archive": 4, "granularity": "flattened", "block": 64,
                               "mutation_std": 0.01, "representation": "lineage"}, seed=seed)


def test_lineage_children_are_their_parents_slerp_plus_their_own_noise():
    s = strategy()
    rng = np.random.default_rng(0)
    weights, generation, last = {}, {}, None
    for _ in range(30):
        for c in s.ask(1):
            if c.is_probe:
                s.tell([Result(c.id, payload=probe_payload(c))])
                continue
            recipe = c.recipe.to_dict()
            got = flat(recipe)
            generation[c.id] = 0
            if c.meta["role"] == "child":
                generation[c.id] = 1 + max(generation[p] for p in c.meta["parents"])
                a, b = (weights[p] for p in c.meta["parents"])
                omega = c.meta["omega"]
                true = math.acos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
                assert abs(omega - true) < 0.02 * true  # tracked inner products
                t = np.where(np.arange(len(a)) < c.meta["split"], c.meta["w"], 1 - c.meta["w"])
                want = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / math.sin(omega)
                want += 0.01 * noise_flat(c.id + 1)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
                # a few entries besides the anchors, whatever the generation
                assert len(recipe["models"]) - len(MODELS) <= 5
                last = c
            weights[c.id] = got
            s.tell([Result(c.id, {"acc": 0.5}, correct={"t": list(rng.random(12) < 0.5)},
                           items={"t": list(range(12))})])
    assert last is not None and last.id > 20
    # lineages several generations deep: children of children of children
    assert max(generation.values()) >= 3
    # a cold cache: the last child rebuilt from the published lineage, bitwise
    before = flat(last.recipe.to_dict())
    regions._members.clear()
    regions._members_cached = 0
    assert np.array_equal(flat(last.recipe.to_dict()), before)


def test_an_unknown_member_fails_clearly():
    recipe = {"method": "regions", "models": [
        {"model": "scratch:0", "parameters": {"weight": 0.0}},
        {"model": "scratch:0", "parameters": {"weight": 1.0, "member": 12345.0}}],
        "parameters": {"normalize": False, "anchors": 1.0, "offset": 0.0}}
    with pytest.raises(regions.LineageError, match="neither cached nor published"):
        merge(Recipe.from_dict(recipe), loader=LOADER)


def test_the_scratch_experiment_is_exact():
    from mergesearch.experiment import Experiment

    exp = Experiment.load(ROOT / "experiments/digits/m2n2_scratch.yaml")
    options = m2n2.M2N2.parse_options(exp.strategy.options)
    assert options.representation == "lineage" and options.granularity == "rows"


# -- killed mid-run ---------------------------------------------------------------------

def _scratch_yaml(tmp_path: Path, name: str) -> Path:
    data = yaml.safe_load((ROOT / "experiments/digits/m2n2_scratch.yaml").read_text())
    data["models"]["sources"] = {f"s{k}": f"scratch:{k}" for k in range(4)}
    data.update(name="t", output=str(tmp_path / name), budget={"evaluations": 45})
    data["strategy"]["name"] = "mergesearch.strategies.m2n2:M2N2"
    data["strategy"]["options"]["archive"] = 4
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _rebuilt(path: Path):
    from mergesearch.controller import BoundExperiment
    from mergesearch.experiment import Experiment
    from mergesearch.storage import TrialStore

    exp = Experiment.load(path)
    store = TrialStore.open(exp.storage_url, "t")
    s = BoundExperiment(exp, progress=False).strategy
    s.load_state_dict(store.load_state())
    return s, store.trials()


@pytest.mark.slow
def test_killed_mid_run_a_lineage_search_comes_back_exactly(tmp_path):
    from mergesearch.cli import main

    killed = _scratch_yaml(tmp_path, "killed")
    kill_mid_run(killed, tmp_path / "killed" / "study.db", 25)
    # this process has never seen the killed run's members: the resumed strategy
    # publishes their lineage and the worker rebuilds the archive from it
    regions._members.clear()
    regions._members_cached = 0
    regions.LINEAGE.clear()
    assert main(["run", str(killed), "--resume", "-q"]) == 0
    # the uninterrupted run merges everything afresh: nothing it reads was rebuilt
    regions._members.clear()
    regions._members_cached = 0
    regions.LINEAGE.clear()
    whole = _scratch_yaml(tmp_path, "whole")
    assert main(["run", str(whole), "-q"]) == 0
    a, trials_a = _rebuilt(killed)
    b, trials_b = _rebuilt(whole)

    def rows(trials):
        return sorted((t.candidate_id, json.dumps(t.recipe, sort_keys=True),
                       t.values["accuracy"], json.dumps(t.correct)) for t in trials)

    assert len(trials_a) == 45 and rows(trials_a) == rows(trials_b)
    assert [m.id for m in a.archive] == [m.id for m in b.archive]
    assert a.history == b.history
    assert sum(t.recipe["method"] == "regions" for t in trials_a) > 30


def test_without_mutation_lineage_and_terms_children_are_the_same_search():
    """Both representations are exact without mutation: the same seed picks the same
    parents, split and w, takes the same angle, and makes the same weights."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_m2n2_terms_tests",
                                                  Path(__file__).with_name("test_m2n2.py"))
    terms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(terms)
    LAYOUT, N, gram_payload, recipe_problem, rebuild = (
        terms.LAYOUT, terms.N, terms.gram_payload, terms.recipe_problem, terms.rebuild)

    vectors = np.random.default_rng(4).standard_normal((3, N)) + 0.3
    names = ["a", "b", "c"]
    runs = {}
    for representation in ("terms", "lineage"):
        s = m2n2.M2N2(recipe_problem(), {"archive": 4, "granularity": "rows", "prune": 0.0,
                                         "representation": representation}, seed=7)
        rng = np.random.default_rng(0)
        by_key, seen = {}, []
        for _ in range(40):
            for c in s.ask(1):
                if c.is_probe:
                    s.tell([Result(c.id, payload=gram_payload(vectors, "rows"))])
                    continue
                recipe = c.recipe.to_dict()
                if representation == "terms":
                    x = rebuild(recipe, vectors)
                else:
                    x = np.zeros(N)
                    for e in recipe["models"]:
                        p = e["parameters"]
                        if not p.get("weight"):
                            continue
                        lo, hi = int(p.get("start", 0)), int(min(p.get("end", N), N))
                        src = (by_key[int(p["member"])] if p.get("member")
                               else vectors[names.index(e["model"])])
                        x[lo:hi] += p["weight"] * src[lo:hi]
                    by_key[int(recipe.get("parameters", {}).get("key", 0))] = x
                meta = {k: c.meta.get(k) for k in ("parents", "w", "split")}
                seen.append((c.id, meta, c.meta.get("omega"), x))
                s.tell([Result(c.id, {"acc": 0.5}, correct={"t": list(rng.random(12) < 0.5)},
                               items={"t": list(range(12))})])
        runs[representation] = seen
    assert LAYOUT and len(runs["terms"]) == len(runs["lineage"]) > 30
    for (ia, ma, oa, xa), (ib, mb, ob, xb) in zip(runs["terms"], runs["lineage"], strict=True):
        assert ia == ib and ma == mb
        if oa is not None:
            assert abs(oa - ob) < 1e-9
        np.testing.assert_allclose(xa, xb, rtol=1e-9, atol=1e-9)
