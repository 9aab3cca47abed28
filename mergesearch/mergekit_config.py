"""Recipes to and from mergekit YAML.

mergekit and mergesearch read parameter settings (scalars, layer gradients,
``{filter, value}`` lists) the same way, so most recipes map one to one.  What
mergekit cannot express raises :class:`NotExpressible` naming the feature:
methods it lacks (``global_slerp``), LiNeS scaling, layer-path input scales,
``vocab: base``.  Two differences remain that YAML cannot show: mergesearch's
DARE/DELLA ``rescale`` divides survivors by their keep probability where
mergekit matches the L1 norm (equal in expectation), and random masks come
from the recipe ``seed`` here and from the global RNG in mergekit.
:func:`load_config` reads either kind of file, told apart by content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from mergesearch.configs import format_validation_error, read_yaml_mapping
from mergesearch.merging import get_method
from mergesearch.recipe import Hop, Recipe, RecipeError, SourceModel

# mergekit parameters with no effect on the result (memory/speed switches).
_IGNORED_PARAMS = {"int8_mask"}
_MERGEKIT_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype",
                  "tokenizer_source", "out_dtype", "name"}


class NotExpressible(RecipeError):
    """A recipe (or mergekit config) uses something the other side cannot express."""


# --------------------------------------------------------------- to mergekit
def to_mergekit(recipe: Recipe) -> dict[str, Any]:
    """The mergekit 0.1.5 configuration equivalent to ``recipe``."""
    method = get_method(recipe.method)
    problems = []
    if not method.mergekit:
        problems.append(f"method {recipe.method!r} does not exist in mergekit")
    if recipe.lines is not None:
        problems.append("LiNeS scaling ('lines')")
    if recipe.vocab != "strict":
        problems.append("'vocab: base' (mergekit re-maps vocabularies through tokenizers)")
    if any(hop.scale != 1.0 for hop in recipe.layer_path or ()):
        problems.append("layer-path input scales other than 1 (mergekit's passthrough 'scale' "
                        "multiplies weights, not layer inputs)")
    if problems:
        raise NotExpressible("cannot express in mergekit: " + "; ".join(problems))

    config: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.layer_path:
        config["slices"] = [
            {"sources": [{"model": model, "layer_range": [start, stop]}]}
            for model, start, stop in _runs(recipe.layer_path)
        ]
    else:
        if recipe.base is not None:
            config["base_model"] = recipe.base
        models = [_dump_model(s) for s in recipe.models]
        if recipe.method == "slerp":  # mergekit lists both endpoints
            models.insert(0, {"model": recipe.base})
        config["models"] = models
    if recipe.parameters:
        config["parameters"] = _dump(recipe.parameters)
    config["dtype"] = recipe.dtype
    return config


def to_mergekit_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_mergekit(recipe), sort_keys=False)


def _dump(parameters: dict) -> dict:
    return {k: _plain(v) for k, v in parameters.items()}


def _plain(setting: Any) -> Any:
    if isinstance(setting, list):
        return [_plain(x) for x in setting]
    if hasattr(setting, "model_dump"):
        return setting.model_dump(exclude_none=True)
    return setting


def _dump_model(source: SourceModel) -> dict[str, Any]:
    out: dict[str, Any] = {"model": source.model}
    if source.parameters:
        out["parameters"] = _dump(source.parameters)
    return out


def _runs(path: list[Hop]) -> list[tuple[str, int, int]]:
    """Consecutive hops through consecutive layers of one model, as [start, stop) runs."""
    runs: list[list] = []
    for hop in path:
        if runs and runs[-1][0] == hop.model and runs[-1][2] == hop.layer:
            runs[-1][2] += 1
        else:
            runs.append([hop.model, hop.layer, hop.layer + 1])
    return [tuple(r) for r in runs]


# ------------------------------------------------------------- from mergekit
class _MkStrict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _MkModel(_MkStrict):
    """One entry of mergekit's ``models:`` list."""

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class _MkSource(_MkModel):
    """One source of a slice: a model's layers ``[start, stop)``."""

    layer_range: tuple[StrictInt, StrictInt]

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, stop = value
        if start < 0 or stop <= start:
            raise ValueError(f"{list(value)} is not a layer range: give [start, stop] with "
                             "0 <= start < stop")
        return value


class _MkSlice(_MkStrict):
    sources: list[_MkSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class _MkConfig(BaseModel):
    """The shape of a mergekit configuration (values are checked by the recipe)."""

    model_config = ConfigDict(extra="allow")  # unknown keys: NotExpressible, named below

    merge_method: str
    base_model: str | None = None
    models: list[_MkModel] | None = None
    slices: list[_MkSlice] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None


def from_mergekit(config: dict[str, Any]) -> Recipe:
    """A recipe equivalent to a mergekit configuration."""
    unknown = set(config) - _MERGEKIT_KEYS
    if unknown:
        raise NotExpressible(
            f"mergekit keys not supported by mergesearch: {', '.join(sorted(unknown))}"
        )
    if not config.get("merge_method"):
        raise RecipeError("mergekit config has no 'merge_method'")
    try:
        mk = _MkConfig.model_validate(
            {k: v for k, v in config.items() if v is not None})
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, "mergekit")) from None
    name = mk.merge_method
    try:
        method = get_method(name)
    except KeyError as err:
        raise NotExpressible(f"mergekit method {name!r} is not available: {err.args[0]}") from None
    if not method.mergekit:
        raise NotExpressible(f"{name!r} is not a mergekit method")
    base = mk.base_model
    data: dict[str, Any] = {"method": name, "parameters": _kept(mk.parameters)}
    if mk.dtype or mk.out_dtype:
        data["dtype"] = mk.out_dtype or mk.dtype
    if base is not None:
        data["base"] = base

    if name == "passthrough":
        data["layer_path"] = _path_from_slices(mk.slices or [])
    else:
        entries = mk.models if mk.models is not None else _models_from_slices(mk.slices or [])
        models = []
        for entry in entries:
            params = _kept(entry.parameters)
            if entry.model == base and (method.needs_base or not params):
                continue  # the base as an input of its own merge: implied by base_model
            models.append({"model": entry.model, "parameters": params})
        data["models"] = models
    return Recipe.from_dict(data)


def _kept(parameters: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in parameters.items() if k not in _IGNORED_PARAMS}


def _path_from_slices(slices: list[_MkSlice]) -> list[dict]:
    if not slices:
        raise NotExpressible("a passthrough config needs 'slices'")
    hops = []
    for i, sl in enumerate(slices):
        if len(sl.sources) != 1:
            raise NotExpressible(f"slices[{i}]: passthrough takes exactly one source per slice")
        src = sl.sources[0]
        if src.parameters or sl.parameters:
            raise NotExpressible(
                f"slices[{i}]: per-slice parameters (e.g. 'scale') are not supported"
            )
        start, stop = src.layer_range
        hops += [{"model": src.model, "layer": layer} for layer in range(start, stop)]
    return hops


def _models_from_slices(slices: list[_MkSlice]) -> list[_MkModel]:
    """Slices that merge whole models the same way are just a models list."""
    if len(slices) != 1:
        raise NotExpressible(
            "several slices (or none) in a non-passthrough merge: give 'models', or one "
            "slice over the same layers of every model"
        )
    (sl,) = slices
    if sl.parameters or sl.base_model:
        raise NotExpressible("slice-level 'parameters' or 'base_model'")
    ranges = {s.layer_range for s in sl.sources}
    if len(ranges) != 1 or next(iter(ranges))[0] != 0:
        raise NotExpressible("slices that take different or partial layer ranges per model")
    return [_MkModel(model=s.model, parameters=s.parameters) for s in sl.sources]


# ---------------------------------------------------------------- loading
def load_config(path: str | Path) -> Recipe:
    """Read a recipe file (ours, .json/.yaml) or a mergekit YAML, told apart by content."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such file")
    data = read_yaml_mapping(path, RecipeError, "recipe file")
    try:
        return from_mergekit(data) if "merge_method" in data else Recipe.from_dict(data)
    except RecipeError as err:
        raise type(err)(f"{path}: {err}") from None
