"""Score one recipe or one merged checkpoint with an experiment's evaluator (``mergesearch
eval``), as a trial of that experiment would be scored.

A checkpoint folder is scored as the recipe ``linear`` of that one model at weight 1 (an
exact copy of its tensors), so it goes through the same worker, merge engine and
evaluator as a trial; the experiment's base is the recipe's base (``linear`` ignores it),
so weight objectives compare the checkpoint with that base.  Recipe objectives describe a
recipe, not weights: for a checkpoint they are read from the recipe it was exported with
(``mergesearch_recipe.json``) when it has one, and are otherwise not available.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesearch.errors import MergesearchError

CHECKPOINT_RECIPE = "mergesearch_recipe.json"  # what mergesearch export --checkpoint writes


class RescoreError(MergesearchError, ValueError):
    """The input is neither a model folder nor a recipe file, or it could not be scored."""


@dataclass
class Rescored:
    kind: str  # "recipe" or "checkpoint"
    values: dict[str, float]
    scores: dict[str, Any]
    recipe: dict[str, Any]  # the recipe that was scored
    unavailable: dict[str, str] = field(default_factory=dict)  # objective -> why


def input_recipe(path: str | Path, base: str | None, dtype: str = "float32"):
    """``(recipe, kind, exported_recipe)`` for a recipe file or a model folder."""
    from mergesearch.mergekit_config import load_config
    from mergesearch.recipe import Recipe

    p = Path(path).expanduser()
    if p.is_file():
        return load_config(p), "recipe", None
    if p.is_dir() and (p / "config.json").is_file():
        recipe = Recipe(method="linear", base=base, dtype=dtype,
                        models=[{"model": str(p.resolve()), "parameters": {"weight": 1.0}}])
        exported = p / CHECKPOINT_RECIPE
        return recipe, "checkpoint", load_config(exported) if exported.is_file() else None
    raise RescoreError(f"{path}: neither a recipe file nor a model folder (a folder with "
                       "config.json)")


def rescore(path: str | Path, exp) -> Rescored:
    """Score the recipe file or checkpoint folder ``path`` with ``exp`` (an
    :class:`~mergesearch.experiment.Experiment`), on the worker a trial would use."""
    from mergesearch.controller import BoundExperiment
    from mergesearch.objectives import recipe_values

    p = Path(path).expanduser()
    if not (p.is_file() or (p / "config.json").is_file()):  # before any model is loaded
        input_recipe(p, None)
    bound = BoundExperiment(exp, progress=False)
    recipe, kind, exported = input_recipe(path, bound.base)
    result = bound.evaluate(recipe)
    if result.status != "ok":
        raise RescoreError(f"{path}: scoring failed: {result.reason}")
    values = dict(result.values)
    unavailable = {}
    if kind == "checkpoint":
        recipe_objs = [o for o in exp.evaluator.objectives if o.source == "recipe"]
        for o in recipe_objs:
            values.pop(o.name, None)
        if exported is not None:
            values |= recipe_values(exported, recipe_objs)
        else:
            unavailable |= {o.name: f"a recipe objective; {path} has no {CHECKPOINT_RECIPE}"
                            for o in recipe_objs}
    return Rescored(kind=kind, values=values, scores=dict(result.scores or {}),
                    recipe=recipe.to_dict(), unavailable=unavailable)
