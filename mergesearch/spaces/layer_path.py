"""The layer-path space (``kind: layer_path``): Sakana's data-flow search (DFS).

The pool's layers are laid out model after model (M = the sum of their layer
counts) and the layout is repeated ``repeats`` (r) times: T = M * r slots.
Each slot has one **binary** indicator (the slot's layer is on the path iff 1)
and, unless ``search_scales: false``, one **real** input scale (bounds
``scale_bounds``, start 1.0) that multiplies the hidden states entering that
layer.  A genome decodes to a ``passthrough`` recipe whose ``layer_path``
lists the slots that are on, in layout order.

Options:

* ``models``: the pool, in order (default: every source).  An entry is a
  source's short name, or a **recipe-defined model** ``{name: ps, recipe:
  <recipe file or mapping>}`` (e.g. the parameter-space result of an earlier
  stage).  ``over: <recipe file or mapping>`` is the short form that puts
  such a model, named ``over``, first in the pool (Sakana's PS + DFS).
  A recipe-defined model is referenced in the path as ``recipe:<JSON>`` (the
  convention of :mod:`mergesearch.models.recipe_model`), so every trial's
  recipe stays self-contained.
* ``fix_ends`` (default true, as in the paper): the path opens with the first
  model's first layer and closes with its last layer.  The opening layer is
  slot 0 of the first repetition, so that slot is always on and has no
  indicator; the closing layer is appended after the chosen slots.  Both run
  at scale 1 (our choice).  Without ``fix_ends`` the first and last hops'
  models give the embeddings and the head (as the merge engine does), and a
  genome that turns every slot off is refused with a :class:`SpaceError`.
* ``scales``: ``hop`` (default) gives each slot its own input scale; ``matrix`` is
  the paper's W, one scale per (previous layer, layer) pair of the pool (M x M
  dimensions): a hop's input is scaled by W[the layer before it, its layer], so a
  layer that follows the same layer twice gets the same scale.  The opening hop
  (no previous layer) and, under ``fix_ends``, the closing hop run at scale 1.
* ``repeats`` (default 1); ``scale_bounds`` (default [0.5, 2.0]: our choice,
  the paper gives none); ``recipe``: other recipe fields (``dtype`` ...).

Start (``x0``): the first model's layers on in the first repetition and
everything else off, so ``x0`` decodes to the first model itself (Sakana's
init).  ``encode`` places a path's hops on the earliest slots that fit in
order and refuses a path the layout cannot express (a hop out of layout order,
a scale outside the bounds, other ends under ``fix_ends``).

Paper: Akiba et al. 2024, T = 192 (M = 64, r = 3), scales by the matrix W; the default
scale per hop follows a deployed port's ``input_scales`` (T dimensions rather than M^2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mergesearch.recipe import Recipe, RecipeError
from mergesearch.spaces import register_space
from mergesearch.spaces.base import GenomeDims, Models, SpaceError, genome_array
from mergesearch.strategies.base import Dimension

RECIPE_PREFIX = "recipe:"


def recipe_ref(recipe: dict[str, Any]) -> str:
    """The model reference that stands for a recipe-defined model (keys sorted, compact)."""
    return RECIPE_PREFIX + json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def _read_recipe(value: Any, info: ValidationInfo) -> dict[str, Any]:
    """A recipe file (relative to the space file) or mapping, as checked plain data: the
    content, not the path, is what the space holds (and fingerprints digest)."""
    try:
        if isinstance(value, str | Path):
            folder = (info.context or {}).get("folder")
            path = Path(value)
            if not path.is_absolute() and folder is not None:
                path = Path(folder) / path
            return Recipe.load(path).to_dict()
        if isinstance(value, dict):
            return Recipe.from_dict(value).to_dict()
    except RecipeError as err:
        raise ValueError(str(err)) from None
    raise ValueError("expected a recipe file or a recipe mapping")


class RecipeModel(BaseModel):
    """A pool member that is itself a merge (a recipe-defined model)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    recipe: dict[str, Any]
    layers: int | None = Field(None, ge=1, description="its depth, when it differs from "
                                                       "its first model's")

    @field_validator("recipe", mode="before")
    @classmethod
    def _load(cls, value: Any, info: ValidationInfo) -> dict[str, Any]:
        return _read_recipe(value, info)


class LayerPathConfig(BaseModel):
    """A layer-path space as written in YAML."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["layer_path"]
    description: str = ""
    models: list[str | RecipeModel] | None = Field(
        None, description="the pool in order (default: every source)")
    over: dict[str, Any] | None = Field(
        None, description="a fixed recipe whose model opens the pool (named 'over')")
    repeats: int = Field(1, ge=1)
    scale_bounds: tuple[float, float] = (0.5, 2.0)
    search_scales: bool = True
    scales: Literal["hop", "matrix"] = Field(
        "hop", description="hop: one input scale per slot; matrix: the paper's W, one per "
                           "(previous layer, layer) pair of the pool")
    fix_ends: bool = True
    recipe: dict[str, Any] = Field(
        default_factory=dict, description="other recipe fields, e.g. dtype, vocab")

    @field_validator("over", mode="before")
    @classmethod
    def _load_over(cls, value: Any, info: ValidationInfo) -> dict[str, Any] | None:
        return None if value is None else _read_recipe(value, info)

    @field_validator("scale_bounds")
    @classmethod
    def _scale_bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"{list(value)} must be two finite numbers, low below high")
        if not low <= 1.0 <= high:
            raise ValueError(f"{list(value)} must contain 1.0 (the start scale)")
        return value


@dataclass(frozen=True)
class Member:
    """One model of the pool: its short name, its reference in a path, its depth."""

    name: str
    ref: str
    depth: int


@dataclass(frozen=True)
class Slot:
    repeat: int
    member: Member
    layer: int


class LayerPathSpace(GenomeDims):
    """Indicators (and input scales) per layer slot <-> a ``passthrough`` recipe."""

    def __init__(self, config: LayerPathConfig, models: Models):
        self.config = config
        self.models = models
        self.pool = self._pool()
        first = self.pool[0]
        if config.fix_ends and first.depth < 2:
            raise SpaceError(f"space.fix_ends: the first model, {first.name}, has one layer; "
                             "it cannot both open and close the path")
        self.slots = [Slot(r, m, layer) for r in range(config.repeats) for m in self.pool
                      for layer in range(m.depth)]
        if config.fix_ends:  # slot 0 opens every path
            self.slots = self.slots[1:]
        self._ends = ((first, 0), (first, first.depth - 1)) if config.fix_ends else None
        self.dims: list[Dimension] = []
        for s in self.slots:
            on = s.repeat == 0 and s.member is first and not (
                config.fix_ends and s.layer == first.depth - 1)
            self.dims.append(Dimension.binary(f"path[r{s.repeat}]/{s.member.name}@L{s.layer}",
                                              int(on)))
        # the pool's layers, in layout order: the rows and columns of the matrix W
        self.layers = [(m, layer) for m in self.pool for layer in range(m.depth)]
        self._index = {(m.ref, layer): i for i, (m, layer) in enumerate(self.layers)}
        self.n_slots = len(self.slots)
        if config.search_scales:
            low, high = config.scale_bounds
            if config.scales == "hop":
                self.dims += [Dimension(f"scale[r{s.repeat}]/{s.member.name}@L{s.layer}", low,
                                        high, 1.0) for s in self.slots]
            else:
                self.dims += [Dimension(f"W[{a.name}@L{i}->{b.name}@L{j}]", low, high, 1.0)
                              for a, i in self.layers for b, j in self.layers]
        self.start: Recipe = self.decode(self.x0)

    # -- building -----------------------------------------------------------------------

    def _pool(self) -> list[Member]:
        m, cfg = self.models, self.config
        entries: list[str | RecipeModel] = list(m.sources) if cfg.models is None else \
            list(cfg.models)
        if cfg.over is not None:
            entries.insert(0, RecipeModel(name="over", recipe=cfg.over))
        if not entries:
            raise SpaceError("space.models: the pool is empty: name at least one model")
        pool = []
        for i, entry in enumerate(entries):
            where = "space.over" if cfg.over is not None and i == 0 else \
                f"space.models[{i - (cfg.over is not None)}]"
            if isinstance(entry, str):
                if entry not in m.sources:
                    raise SpaceError(f"{where}: {entry!r} is not a source model "
                                     f"(sources: {', '.join(m.sources) or 'none'})")
                pool.append(Member(entry, m.sources[entry], m.depth(entry)))
            else:
                if entry.name in m.sources:
                    raise SpaceError(f"{where}.name: {entry.name!r} is already a source's name")
                pool.append(Member(entry.name, recipe_ref(entry.recipe),
                                   entry.layers or self._recipe_depth(entry.recipe)))
        names = [p.name for p in pool]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SpaceError(f"space.models: {twice[0]!r} is in the pool twice")
        return pool

    def _recipe_depth(self, recipe: dict[str, Any]) -> int:
        """A recipe-defined model's depth: its path's length, else its first model's."""
        if recipe.get("layer_path"):
            return len(recipe["layer_path"])
        first = Recipe.from_dict(recipe).model_names[0]
        by_ref = {ref: name for name, ref in self.models.sources.items()}
        return self.models.depth(by_ref[first]) if first in by_ref else self.models.num_layers

    # -- genome <-> recipe --------------------------------------------------------------

    def decode(self, genome: Sequence[float]) -> Recipe:
        """The passthrough recipe of the slots a genome turns on."""
        genome = genome_array(genome, self.dims)
        n = self.n_slots
        matrix = self.config.search_scales and self.config.scales == "matrix"
        scales = genome[n:] if self.config.search_scales and not matrix else np.ones(n)
        hops = [{"model": s.member.ref, "layer": s.layer, "scale": float(scale)}
                for s, on, scale in zip(self.slots, genome[:n], scales, strict=True)
                if on >= 0.5]
        if self._ends is not None:
            (a, first), (_, last) = self._ends
            hops = [{"model": a.ref, "layer": first, "scale": 1.0}, *hops]
        if matrix:  # a hop's input scale is W[previous layer, this layer]
            w = genome[n:].reshape(len(self.layers), len(self.layers))
            for prev, hop in zip(hops, hops[1:], strict=False):
                hop["scale"] = float(w[self._index[prev["model"], prev["layer"]],
                                       self._index[hop["model"], hop["layer"]]])
        if self._ends is not None:
            hops.append({"model": a.ref, "layer": last, "scale": 1.0})
        if not hops:
            raise SpaceError("the genome turns every layer slot off: a layer path needs at "
                             "least one layer")
        data = {"method": "passthrough", "layer_path": hops, "seed": self.models.seed,
                **self.config.recipe}
        try:
            return Recipe.from_dict(data)
        except RecipeError as err:
            raise SpaceError(f"the space decodes to an invalid recipe: {err}") from None

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome of a layer path: each hop on the earliest slot after the previous
        hop's that runs the same layer of the same model."""
        if not recipe.layer_path:
            raise SpaceError(f"a {recipe.method!r} recipe has no layer path to encode")
        hops = list(enumerate(recipe.layer_path))
        if self._ends is not None:
            (a, first), (_, last) = self._ends
            ends = [(a.ref, first, 1.0), (a.ref, last, 1.0)]
            got = [(h.model, h.layer, h.scale) for _, h in (hops[0], hops[-1])]
            if len(hops) < 2 or got != ends:
                raise SpaceError(f"with fix_ends the path must open with {a.name}@L{first} and "
                                 f"close with {a.name}@L{last}, both at scale 1")
            hops = hops[1:-1]
        n = self.n_slots
        genome = np.zeros(len(self.dims))
        genome[n:] = 1.0
        low, high = self.config.scale_bounds
        if self.config.search_scales and self.config.scales == "matrix":
            return self._encode_matrix(recipe, hops, genome)
        for j, (k, hop) in zip(self._slots_of(hops), hops, strict=True):
            if self.config.search_scales and not low <= hop.scale <= high:
                raise SpaceError(f"layer_path[{k}].scale {hop.scale} is outside the "
                                 f"scale_bounds {list(self.config.scale_bounds)}")
            if not self.config.search_scales and hop.scale != 1.0:
                raise SpaceError(f"layer_path[{k}].scale {hop.scale}: this space keeps every "
                                 "scale at 1")
            genome[j] = 1.0
            if self.config.search_scales:
                genome[n + j] = hop.scale
        return genome

    def _slots_of(self, hops) -> list[int]:
        """The slot of each hop: the earliest after the previous hop's that runs its layer."""
        out, at = [], 0
        for k, hop in hops:
            j = next((j for j in range(at, self.n_slots) if self.slots[j].member.ref == hop.model
                      and self.slots[j].layer == hop.layer), None)
            if j is None:
                raise SpaceError(f"layer_path[{k}] (layer {hop.layer} of {_short(hop.model)}) "
                                 "has no slot left after the previous hop's: the space cannot "
                                 "express this path")
            out.append(j)
            at = j + 1
        return out

    def _encode_matrix(self, recipe: Recipe, hops, genome: np.ndarray) -> np.ndarray:
        """Indicators as in the per-hop case; each hop's scale sets W[previous, this], which
        must then be the same wherever that pair of layers meets again."""
        n, width = self.n_slots, len(self.layers)
        low, high = self.config.scale_bounds
        path = recipe.layer_path
        if self._ends is None and hops and hops[0][1].scale != 1.0:
            raise SpaceError("layer_path[0].scale: the first hop has no previous layer, so "
                             "this space runs it at scale 1")
        set_at: dict[int, tuple[int, float]] = {}
        for j, (k, hop) in zip(self._slots_of(hops), hops, strict=True):
            genome[j] = 1.0
            if k == 0:
                continue
            prev = path[k - 1]
            cell = n + self._index[prev.model, prev.layer] * width + self._index[hop.model,
                                                                                  hop.layer]
            if not low <= hop.scale <= high:
                raise SpaceError(f"layer_path[{k}].scale {hop.scale} is outside the "
                                 f"scale_bounds {list(self.config.scale_bounds)}")
            if cell in set_at and set_at[cell][1] != hop.scale:
                raise SpaceError(f"layer_path[{k}].scale {hop.scale} differs from "
                                 f"layer_path[{set_at[cell][0]}].scale {set_at[cell][1]}, "
                                 "which follows the same layer: one matrix W cannot give both")
            set_at[cell] = (k, hop.scale)
            genome[cell] = hop.scale
        return genome

    def describe(self) -> str:
        """One line per part: the pool, the indicators, the scales."""
        cfg = self.config
        pool = ", ".join(f"{m.name} ({m.depth} layers)" for m in self.pool)
        n = len(self.slots)
        lines = [f"pool: {pool}; {cfg.repeats} repeat(s)",
                 f"path: {n} binary dims (one per layer slot)"
                 + (f"; opens with {self.pool[0].name}@L0 and closes with "
                    f"{self.pool[0].name}@L{self.pool[0].depth - 1}" if cfg.fix_ends else "")]
        if cfg.search_scales and cfg.scales == "matrix":
            m = len(self.layers)
            lines.append(f"scale: {m * m} dims (matrix W: the input scale of a layer after "
                         f"each layer of the pool, {m} x {m}, bounds {list(cfg.scale_bounds)})")
        elif cfg.search_scales:
            lines.append(f"scale: {n} dims (input scale per slot, bounds "
                         f"{list(cfg.scale_bounds)})")
        return "\n".join(lines)


def _short(ref: str) -> str:
    return "a recipe-defined model" if ref.startswith(RECIPE_PREFIX) else repr(ref)


register_space("layer_path", LayerPathConfig, LayerPathSpace,
               "layer path over a pool of models (Sakana DFS)")
