"""Merged checkpoints on disk: a recipe streamed into safetensors shards, written atomically.

The mergekit side (recipes to and from mergekit YAML) is :mod:`mergesearch.mergekit_config`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mergesearch.atomic import OutputExists, atomic_dir, check_target
from mergesearch.mergekit_config import NotExpressible, to_mergekit_yaml
from mergesearch.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


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
    _check_exportable(recipe)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        _write_recipe_files(tmp, recipe, tokenizer_from)
    return Path(out_dir)


def _check_exportable(recipe: Recipe) -> None:
    if any(hop.scale != 1.0 for hop in recipe.layer_path or ()):
        raise NotExpressible(
            "layer-path input scales other than 1 run in memory (forward hooks) but have no "
            "place in a plain checkpoint; set every hop's scale to 1 to export"
        )


def _write_recipe_files(tmp: Path, recipe: Recipe, tokenizer_from: str | Path | None) -> None:
    """The tokenizer, the recipe and (when expressible) the mergekit config, beside the
    weights."""
    source = tokenizer_from or recipe.tokenizer_source or recipe.model_names[0]
    _copy_tokenizer(source, tmp)
    (tmp / "mergesearch_recipe.json").write_text(recipe.to_json() + "\n")
    try:
        (tmp / "mergekit_config.yml").write_text(to_mergekit_yaml(recipe))
    except NotExpressible as err:
        log.info("no mergekit_config.yml: %s", err)


def _write_config(config, dtype: torch.dtype, directory: Path) -> None:
    """``config.json`` (and ``generation_config.json``) as ``save_pretrained`` writes them
    for a model of ``config`` held in ``dtype``."""
    from mergesearch.models.resident import _empty_model

    with torch.device("meta"):
        model = _empty_model(config, dtype)
    model.config.dtype = str(dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


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
    max_shard_size: str | int = "2GB",
) -> Path:
    """Merge ``recipe`` and write the result as a checkpoint, atomically.

    The merge streams into safetensors shards
    (:class:`~mergesearch.models.sinks.SafetensorsSink`): no merged model is built,
    at most one shard of merged tensors is held at a time.  The directory holds what
    :func:`save_checkpoint` writes (config, tokenizer, recipe, mergekit config) and
    reloads as the model :func:`~mergesearch.models.resident.merge` returns.
    """
    from mergesearch.models.resident import ResidentMerger
    from mergesearch.models.sinks import SafetensorsSink, drain

    out = Path(out_dir)
    check_target(out, directory=True)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} exists and is not empty; pass overwrite=True (--overwrite)")
    check_not_an_input(recipe, out)
    _check_exportable(recipe)
    dtype = getattr(torch, recipe.dtype)
    merger = ResidentMerger(device=device, dtype=dtype, allow_pickle=allow_pickle)
    stream = merger.stream(recipe, progress=progress)  # plans: a bad recipe touches no disk
    with atomic_dir(out, overwrite=overwrite) as tmp:
        drain(stream, SafetensorsSink(tmp, dtype=dtype, max_shard_size=max_shard_size))
        _write_config(merger.checkpoint_config(recipe), dtype, tmp)
        _write_recipe_files(tmp, recipe, None)
    return out


def check_not_an_input(recipe: Recipe, out: Path) -> None:
    """Refuse an output directory that is, or holds, one of the recipe's own models (it
    would be replaced by the merge of itself)."""
    target = out.expanduser().resolve()
    for name in recipe.model_names:
        model = Path(name).expanduser()
        if not model.exists():
            continue  # a hub id: not on this disk under that name
        model = model.resolve()
        if model == target or target in model.parents:
            raise RecipeError(f"output {out} would replace the input model {name}; write the "
                              "merge to another directory")
