"""A recipe-defined model: a source model that is itself a merge, rebuilt in memory.

A later stage of an experiment may merge with the model an earlier stage chose
(Sakana's PS + DFS: the parameter-space result joins the pool of the data-flow
search).  Nothing is exported: the model reference *is* the recipe,
``recipe:{...JSON...}``, so every trial's recipe stays self-contained and
reproducible.  Opening such a reference merges the recipe once (on the CPU, in
the recipe's dtype) and serves its tensors with the read interface of
:class:`~mergesearch.models.checkpoint.Checkpoint`.
"""

from __future__ import annotations

import json
from typing import Any

from mergesearch.models.checkpoint import ModelLoadError
from mergesearch.models.generic import TensorDict

PREFIX = "recipe:"


def is_recipe_ref(ref: str) -> bool:
    return ref.startswith(PREFIX)


def recipe_ref(recipe: dict[str, Any]) -> str:
    """The model reference that stands for ``recipe`` (stable: keys sorted, compact)."""
    return PREFIX + json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def ref_recipe(ref: str) -> dict[str, Any]:
    try:
        return json.loads(ref.removeprefix(PREFIX))
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"model reference {ref[:60]!r}...: not a recipe ({err})") from None


class RecipeModel(TensorDict):
    """The tensors of a merged recipe, merged once when opened."""

    path = None  # no folder: tokenizers and configs come from the recipe's own models

    def __init__(self, ref: str):
        from mergesearch.models.resident import merge
        from mergesearch.recipe import Recipe, RecipeError

        self.ref = ref
        try:
            self.recipe = Recipe.from_dict(ref_recipe(ref))
        except RecipeError as err:
            raise ModelLoadError(f"recipe-defined model: {err}") from None
        model = merge(self.recipe)
        self.config = model.config
        state = model.state_dict()
        if getattr(self.config, "tie_word_embeddings", False):  # stored once, as checkpoints do
            state.pop("lm_head.weight", None)
        self._tensors = {k: v.detach().contiguous() for k, v in state.items()}

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def __repr__(self) -> str:
        return f"RecipeModel({self.recipe.method} of {len(self.recipe.models)} model(s))"
