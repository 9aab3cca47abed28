"""Objectives from the recipe and from the merged weights, checked against independent
computations: hand counts for recipes, numpy over the saved checkpoints for weights, and a
zoo search whose every recorded trial is recomputed from its recipe."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import state, zoo_experiment

from mergesearch import objectives
from mergesearch.evaluation import ObjectiveConfig
from mergesearch.models.resident import ResidentMerger, merge
from mergesearch.objectives import (
    ObjectiveError,
    WeightObjectives,
    extra_objective_values,
    recipe_values,
)
from mergesearch.recipe import Recipe
from mergesearch.trial import Candidate

WEIGHTS = [ObjectiveConfig(name=m, source="weights", metric=m)
           for m in ("delta_sparsity", "delta_l1", "delta_l2")]


def recipe(method: str, base: str | None, weights: list, **extra) -> Recipe:
    return Recipe.from_dict({
        "method": method, "base": base, **extra,
        "models": [{"model": f"m{i}", "parameters": {"weight": w}} for i, w in enumerate(weights)]})


def num_models(r: Recipe) -> float:
    return recipe_values(r, [ObjectiveConfig(name="n", source="recipe",
                                             metric="num_models")])["n"]


# ------------------------------------------------------------------ recipe metrics

def test_num_models_counts_sources_with_a_nonzero_weight_anywhere() -> None:
    assert num_models(recipe("linear", None, [0.5, 0.0, -0.3])) == 2
    assert num_models(recipe("task_arithmetic", "b", [0.0, 0.0])) == 0
    # a gradient or a filtered setting counts if any of its values is non-zero
    assert num_models(recipe("task_arithmetic", "b", [[0.0, 0.2], [0.0, 0.0]])) == 1
    assert num_models(recipe("task_arithmetic", "b", [
        [{"filter": "mlp", "value": 0.4}, {"value": 0.0}],
        [{"filter": "mlp", "value": 0.0}, {"value": [0.0, 0.0]}]])) == 1
    # the recipe-wide weight is every model's default
    shared = Recipe.from_dict({"method": "task_arithmetic", "base": "b", "parameters":
                               {"weight": 0.0}, "models": [{"model": "m0"}, {"model": "m1",
                                                            "parameters": {"weight": 1.0}}]})
    assert num_models(shared) == 1
    # no per-model weight: every model; a layer path: the distinct models it runs
    assert num_models(Recipe.from_dict({"method": "slerp", "base": "b", "models": [
        {"model": "m0"}], "parameters": {"t": 0.3}})) == 1
    path = Recipe.from_dict({"method": "passthrough", "layer_path": [
        {"model": "a", "layer": 0}, {"model": "b", "layer": 1}, {"model": "a", "layer": 1}]})
    assert num_models(path) == 2


def test_distinct_modules_calls_the_components_module(monkeypatch) -> None:
    obj = ObjectiveConfig.model_construct(name="mods", source="recipe", metric="distinct_modules")
    r = recipe("linear", None, [1.0, 1.0])
    monkeypatch.setattr(objectives, "_count_distinct_modules", lambda: None)
    with pytest.raises(ObjectiveError, match="count_distinct_modules"):
        recipe_values(r, [obj])
    with pytest.raises(ValueError, match="objective 'mods'.*count_distinct_modules"):
        ObjectiveConfig(name="mods", source="recipe", metric="distinct_modules")
    monkeypatch.undo()
    seen = []
    fake = types.ModuleType("mergesearch.spaces.components")
    fake.count_distinct_modules = lambda rec: seen.append(rec) or 7
    if importlib.util.find_spec("mergesearch.spaces") is None:
        monkeypatch.setitem(sys.modules, "mergesearch.spaces",
                            types.ModuleType("mergesearch.spaces"))
    monkeypatch.setitem(sys.modules, "mergesearch.spaces.components", fake)
    assert ObjectiveConfig(name="mods", source="recipe", metric="distinct_modules")
    assert recipe_values(r, [obj]) == {"mods": 7.0} and seen == [r]


# ------------------------------------------------------------------ weight reducers

def numpy_deltas(merged: torch.nn.Module, base_dir: str) -> dict[str, float]:
    """delta sparsity, L1 and L2 over every tensor the base checkpoint has, in numpy."""
    base = state(base_dir)
    have = merged.state_dict()
    zeros = count = 0
    l1 = sq = 0.0
    for name, b in base.items():
        d = have[name].numpy().astype(np.float32) - b.numpy().astype(np.float32)
        zeros, count = zeros + int(np.count_nonzero(d == 0)), count + d.size
        l1, sq = l1 + float(np.abs(d.astype(np.float64)).sum()), sq + float(
            np.square(d.astype(np.float64)).sum())
    return {"delta_sparsity": zeros / count, "delta_l1": l1, "delta_l2": sq ** 0.5}


def worker_for(merger: ResidentMerger, objs: list[ObjectiveConfig]) -> SimpleNamespace:
    return SimpleNamespace(merger=merger, extra_objectives=objs)


@pytest.mark.parametrize("case", ["linear", "dare_ties", "tied_task_arithmetic"])
def test_weight_reducers_match_numpy(tiny, case: str) -> None:
    base, sources = tiny.base, tiny.sources
    if case == "linear":  # dense: almost no entry equals the base's
        r = Recipe.from_dict({"method": "linear", "base": base, "models": [
            {"model": s, "parameters": {"weight": w}}
            for s, w in zip(sources, (1, 2, 1), strict=True)]})
    elif case == "dare_ties":  # most of each task vector dropped: a sparse delta
        r = Recipe.from_dict({"method": "dare_ties", "base": base, "seed": 3, "models": [
            {"model": s, "parameters": {"weight": 0.5, "density": 0.3}} for s in sources]})
    else:  # tied embeddings: the base checkpoint has no lm_head.weight, so it is not counted
        base, sources = tiny.tied_base, tiny.tied_sources
        r = Recipe.from_dict({"method": "task_arithmetic", "base": base, "models": [
            {"model": s, "parameters": {"weight": 0.4}} for s in sources]})
        assert "lm_head.weight" not in state(base)
    merger = ResidentMerger(device="cpu")
    model = merger.apply(r)
    got = extra_objective_values(worker_for(merger, WEIGHTS), Candidate(0, None, recipe=r), model)
    want = numpy_deltas(model, base)
    assert got == pytest.approx(want, rel=1e-5)
    if case == "linear":
        assert got["delta_sparsity"] < 0.01 and got["delta_l1"] > 0
    elif case == "dare_ties":
        assert got["delta_sparsity"] > 0.2
    # the same reducers fed directly, tensor by tensor, as a merge stream would
    reduced = WeightObjectives(WEIGHTS)
    for name, b in state(base).items():
        reduced.update(name, model.state_dict()[name], b)
    assert reduced.values() == pytest.approx(want, rel=1e-5)


def test_weight_objectives_need_a_base_and_matching_shapes(tiny) -> None:
    merger = ResidentMerger(device="cpu")
    r = Recipe.from_dict({"method": "linear", "models": [
        {"model": s, "parameters": {"weight": 1.0}} for s in tiny.sources[:2]]})
    model = merger.apply(r)
    worker = worker_for(merger, WEIGHTS[:1])
    with pytest.raises(ObjectiveError, match="need a recipe with a base model"):
        extra_objective_values(worker, Candidate(0, None, recipe=r), model)
    # recipe objectives alone need no base; evaluator objectives are left to the evaluator
    only = [ObjectiveConfig(name="n", source="recipe", metric="num_models"),
            ObjectiveConfig(name="acc", metric="char_accuracy")]
    assert extra_objective_values(worker_for(merger, only), Candidate(0, None, recipe=r),
                                  model) == {"n": 2.0}
    # a worker without extra_objectives reads them from its spec's evaluator
    spec = SimpleNamespace(evaluator={"suite": "evaluators/zoo", "objectives": [
        o.model_dump(mode="json") for o in only]})
    bare = SimpleNamespace(merger=merger, spec=spec)
    assert extra_objective_values(bare, Candidate(0, None, recipe=r), model) == {"n": 2.0}
    with pytest.raises(ObjectiveError, match=r"shape \[2\], the base \[3\]"):
        WeightObjectives(WEIGHTS).update("x", torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------- a search on the zoo

@pytest.mark.slow
def test_search_on_weight_and_recipe_objectives_records_true_values(zoo, tmp_path,
                                                                    monkeypatch) -> None:
    from mergesearch.controller import run
    from mergesearch.models.checkpoint import resolve_model_dir
    from mergesearch.storage import TrialStore

    space = str(Path(__file__).resolve().parents[1] / "search_spaces/dare_ties_layer_groups.yaml")
    exp = zoo_experiment(
        tmp_path, space=space, strategy={"name": "nsga2"}, budget={"evaluations": 6},
        evaluator__objectives=[
            {"name": "sparsity", "source": "weights", "metric": "delta_sparsity"},
            {"name": "l1", "source": "weights", "metric": "delta_l1", "direction": "minimize"},
            {"name": "models", "source": "recipe", "metric": "num_models",
             "direction": "minimize"},
            {"name": "rev", "metric": "char_accuracy", "tasks": ["zoo_rev"]}])
    summary = run(exp, progress=False)
    assert (summary.ok, summary.failed) == (6, 0)
    store = TrialStore.open(exp.storage_url, "t")
    assert [o.name for o in store.objectives] == ["sparsity", "l1", "models", "rev"]
    trials = [t for t in store.trials() if t.state == "ok"]
    assert len(trials) == 6
    sparsities = set()
    for t in trials:
        r = Recipe.from_dict(t.recipe)
        assert r.method == "dare_ties"
        want = numpy_deltas(merge(r), str(resolve_model_dir(r.base)))
        assert t.values["sparsity"] == pytest.approx(want["delta_sparsity"], rel=1e-6)
        assert t.values["l1"] == pytest.approx(want["delta_l1"], rel=1e-5)
        assert t.values["sparsity"] > 0  # densities below 1 drop entries
        # every source has a weight setting with a non-zero value somewhere
        nonzero = [any(e["value"] != 0 for e in m["parameters"]["weight"])
                   for m in t.recipe["models"]]
        assert t.values["models"] == sum(nonzero)
        assert t.values["rev"] == pytest.approx(t.scores["zoo_rev"]["char_accuracy"])
        sparsities.add(round(t.values["sparsity"], 6))
    assert len(sparsities) > 1  # the objective follows the candidates' densities
