"""Recipes to and from mergekit YAML, and merged checkpoints on disk.

mergekit and mergesearch read parameter settings (scalars, layer gradients,
``{filter, value}`` lists) the same way, so most recipes map one to one.  What
mergekit cannot express raises :class:`NotExpressible` naming the feature:
methods it lacks (``global_slerp``), LiNeS scaling, layer-path input scales,
``vocab: base``.  Two differences remain that YAML cannot show: mergesearch's
DARE/DELLA ``rescale`` divides survivors by their keep probability where
mergekit matches the L1 norm (equal in expectation), and random masks come
from the recipe ``seed`` here and from the global RNG in mergekit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from mergesearch.merging import get_method
from mergesearch.recipe import Hop, Recipe, RecipeError, SourceModel

log = logging.getLogger(__name__)

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
def from_mergekit(config: dict[str, Any]) -> Recipe:
    """A recipe equivalent to a mergekit configuration."""
    unknown = set(config) - _MERGEKIT_KEYS
    if unknown:
        raise NotExpressible(
            f"mergekit keys not supported by mergesearch: {', '.join(sorted(unknown))}"
        )
    name = config.get("merge_method")
    if not name:
        raise RecipeError("mergekit config has no 'merge_method'")
    try:
        method = get_method(name)
    except KeyError as err:
        raise NotExpressible(f"mergekit method {name!r} is not available: {err.args[0]}") from None
    if not method.mergekit:
        raise NotExpressible(f"{name!r} is not a mergekit method")
    base = config.get("base_model")
    parameters = {k: v for k, v in (config.get("parameters") or {}).items()
                  if k not in _IGNORED_PARAMS}
    data: dict[str, Any] = {"method": name, "parameters": parameters}
    if "dtype" in config or "out_dtype" in config:
        data["dtype"] = config.get("out_dtype") or config["dtype"]
    if base is not None:
        data["base"] = base

    if name == "passthrough":
        data["layer_path"] = _path_from_slices(config.get("slices") or [])
    else:
        entries = config.get("models")
        if entries is None:
            entries = _models_from_slices(config.get("slices") or [])
        models = []
        for entry in entries:
            params = {k: v for k, v in (entry.get("parameters") or {}).items()
                      if k not in _IGNORED_PARAMS}
            if entry["model"] == base and (method.needs_base or not params):
                continue  # the base as an input of its own merge: implied by base_model
            models.append({"model": entry["model"], "parameters": params})
        data["models"] = models
    return Recipe.from_dict(data)


def _path_from_slices(slices: list[dict]) -> list[dict]:
    if not slices:
        raise NotExpressible("a passthrough config needs 'slices'")
    hops = []
    for i, sl in enumerate(slices):
        sources = sl.get("sources") or []
        if len(sources) != 1:
            raise NotExpressible(f"slices[{i}]: passthrough takes exactly one source per slice")
        src = sources[0]
        if src.get("parameters"):
            raise NotExpressible(
                f"slices[{i}]: per-slice parameters (e.g. 'scale') are not supported"
            )
        start, stop = src["layer_range"]
        hops += [{"model": src["model"], "layer": layer} for layer in range(start, stop)]
    return hops


def _models_from_slices(slices: list[dict]) -> list[dict]:
    """Slices that merge whole models the same way are just a models list."""
    if len(slices) != 1:
        raise NotExpressible(
            "several slices in a non-passthrough merge (different layer ranges per slice)"
        )
    (sl,) = slices
    if sl.get("parameters") or sl.get("base_model"):
        raise NotExpressible("slice-level 'parameters' or 'base_model'")
    ranges = {tuple(s["layer_range"]) for s in sl["sources"]}
    if len(ranges) != 1 or next(iter(ranges))[0] != 0:
        raise NotExpressible("slices that take different or partial layer ranges per model")
    return [{"model": s["model"], "parameters": s.get("parameters") or {}} for s in sl["sources"]]


# ---------------------------------------------------------------- loading
def load_config(path: str | Path) -> Recipe:
    """Read a recipe file (ours, .json/.yaml) or a mergekit YAML, told apart by content."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(
            path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise RecipeError(f"{path}: not valid YAML/JSON ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    try:
        return from_mergekit(data) if "merge_method" in data else Recipe.from_dict(data)
    except RecipeError as err:
        raise type(err)(f"{path}: {err}") from None


# ----------------------------------------------------------- checkpoints
def save_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    recipe: Recipe,
    tokenizer_from: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory, atomically.

    Everything is written into a temporary directory beside ``out_dir`` and
    renamed into place, so a crash never leaves a half-written checkpoint.
    The directory also holds the recipe (``mergesearch_recipe.json``) and,
    when expressible, the mergekit config (``mergekit_config.yml``).
    """
    if any(hop.scale != 1.0 for hop in recipe.layer_path or ()):
        raise NotExpressible(
            "layer-path input scales other than 1 run in memory (forward hooks) but have no "
            "place in a plain checkpoint; set every hop's scale to 1 to export"
        )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        source = tokenizer_from or recipe.tokenizer_source or recipe.model_names[0]
        _copy_tokenizer(source, tmp)
        (tmp / "mergesearch_recipe.json").write_text(recipe.to_json() + "\n")
        try:
            (tmp / "mergekit_config.yml").write_text(to_mergekit_yaml(recipe))
        except NotExpressible as err:
            log.info("no mergekit_config.yml: %s", err)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _copy_tokenizer(source: str | Path, dest: Path) -> None:
    from transformers import AutoTokenizer

    from mergesearch.models.checkpoint import resolve_model_dir

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(str(source)))
    except Exception as err:  # a checkpoint without a tokenizer is still a checkpoint
        log.warning("no tokenizer copied from %s: %s", source, str(err).splitlines()[0])
        return
    tokenizer.save_pretrained(dest)


def save_merged(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
) -> Path:
    """Merge ``recipe`` and write the result as a checkpoint (see :func:`save_checkpoint`)."""
    from mergesearch.models.resident import merge

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite)")
    model = merge(recipe, device=device, allow_pickle=allow_pickle, progress=progress)
    return save_checkpoint(model, out, recipe=recipe, overwrite=overwrite)
