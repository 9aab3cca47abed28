"""A recipe-defined model used as a source: rebuilt in memory from its recipe."""

from __future__ import annotations

import pytest
import torch
from helpers import state

from mergesearch.models.recipe_model import RecipeModel, recipe_ref
from mergesearch.models.resident import merge
from mergesearch.recipe import Recipe


def test_a_recipe_defined_source_merges_like_the_model_it_stands_for(tiny):
    inner = {"method": "task_arithmetic", "base": tiny.base,
             "models": [{"model": tiny.sources[0], "parameters": {"weight": 0.7}},
                        {"model": tiny.sources[1], "parameters": {"weight": 0.4}}]}
    ref = recipe_ref(inner)
    outer = Recipe.from_dict({"method": "linear", "models": [
        {"model": ref, "parameters": {"weight": 0.25}},
        {"model": tiny.sources[2], "parameters": {"weight": 0.75}}]})
    merged = merge(outer).state_dict()
    base, a, b, c = (state(p) for p in (tiny.base, *tiny.sources))
    for name in base:  # independently: the inner merge by hand, then the outer one
        inner_t = base[name] + 0.7 * (a[name] - base[name]) + 0.4 * (b[name] - base[name])
        expected = 0.25 * inner_t + 0.75 * c[name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_the_reference_is_the_recipe_and_bad_ones_are_clear(tiny):
    from mergesearch.models.checkpoint import ModelLoadError

    inner = {"method": "linear", "models": [{"model": tiny.sources[0],
                                              "parameters": {"weight": 1.0}}]}
    model = RecipeModel(recipe_ref(inner))
    assert model.recipe.to_dict()["models"][0]["model"] == tiny.sources[0]
    assert set(model.names) == set(state(tiny.sources[0]))
    with pytest.raises(ModelLoadError, match="not a recipe"):
        RecipeModel("recipe:{not json")
