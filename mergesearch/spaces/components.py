"""The component space (``kind: components``): MERGE's component-wise configurations.

For every layer, each block (by default ``attention`` = the ``self_attn``
tensors and ``mlp`` = the ``mlp`` tensors) takes one **categorical** value:
a source model's name (that block copied from that model) or ``merged`` (the
block of a fixed underlying merge, ``merged:`` in the space: ``linear`` or
``task_arithmetic`` with fixed weights).  Tensors outside the blocks (layer
norms, embeddings, final norm, head) come from ``rest`` (default ``merged``,
or a source's name).

A genome decodes to a ``linear`` recipe (``normalize: false``) whose per-model
``weight`` is a mergekit-style ``{filter, value}`` list, one entry per (layer,
block) plus a last entry for the rest: a chosen source gets weight 1 and every
other model 0, which the merge engine computes exactly (a sum of one tensor
and zeros); ``merged`` gets the fixed merge written as linear weights over
the base and the sources (task arithmetic ``base + lambda * sum_i w_i (theta_i
- base)`` is the base at ``1 - lambda * sum_i w_i`` and source i at ``lambda *
w_i``).  TIES or DARE as the merged value are not linear in the models and are
refused: they need the merge engine to take a recipe-defined model as a
source (see :mod:`mergesearch.spaces.layer_path`).

Options: ``choices`` (the sources a block may take, default all), ``blocks``
(block name -> a tensor-name part after the layer index), ``init`` (the start
value of every block, default ``merged``), ``recipe`` (other recipe fields).
``merged.weight`` is one number, ``{name: w}`` or a list in source order
(default 1/N each: the mean task vector, our choice).

:func:`count_distinct_modules` gives the storage objective MERGE trades
against performance, read from a recipe alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mergesearch.recipe import Conditional, Recipe, RecipeError
from mergesearch.spaces import register_space
from mergesearch.spaces.base import GenomeDims, Models, SpaceError, genome_array, source_index
from mergesearch.strategies.base import Dimension

MERGED = "merged"
LINEAR_MERGES = ("linear", "task_arithmetic")


class MergedSpec(BaseModel):
    """The fixed merge behind the ``merged`` choice."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: str = "task_arithmetic"
    weight: float | dict[str, float] | list[float] | None = None
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool | None = Field(None, description="default: the method's")


class ComponentsConfig(BaseModel):
    """A component space as written in YAML."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["components"]
    description: str = ""
    merged: MergedSpec = MergedSpec()
    choices: list[str] | None = Field(None, description="sources a block may take")
    blocks: dict[str, str] = Field(default_factory=lambda: {"attention": "self_attn",
                                                            "mlp": "mlp"}, min_length=1)
    rest: str = MERGED
    init: str = MERGED
    recipe: dict[str, Any] = Field(
        default_factory=dict, description="other recipe fields, e.g. dtype, vocab")


class ComponentSpace(GenomeDims):
    """One categorical per (layer, block) <-> a ``linear`` recipe selecting modules."""

    def __init__(self, config: ComponentsConfig, models: Models):
        self.config = config
        self.models = models
        names = list(models.sources)
        self.choices = list(names if config.choices is None else config.choices)
        for i, c in enumerate(self.choices):
            if c not in names:
                raise SpaceError(f"space.choices[{i}]: {c!r} is not a source model "
                                 f"(sources: {', '.join(names)})")
        if not self.choices:
            raise SpaceError("space.choices: name at least one source")
        self.options = [*self.choices, MERGED]
        for field, value in (("rest", config.rest), ("init", config.init)):
            allowed = [*names, MERGED] if field == "rest" else self.options
            if value not in allowed:
                raise SpaceError(f"space.{field}: {value!r} is none of {', '.join(allowed)}")
        # the linear recipe's models: the base first when the merged value uses it
        self.refs = list(models.sources.values())
        merged = self._merged_weights()
        if len(merged) > len(self.refs):
            self.refs.insert(0, models.base)
        self._vectors = {name: self._one_hot(models.sources[name]) for name in names}
        self._vectors[MERGED] = merged
        self._check_blocks()
        self.slots = [(layer, block) for layer in range(models.num_layers)
                      for block in config.blocks]
        self.dims = [Dimension.categorical(f"{block}@L{layer}", self.options, config.init)
                     for layer, block in self.slots]
        self.start: Recipe = self.decode(self.x0)

    # -- building -----------------------------------------------------------------------

    def _merged_weights(self) -> np.ndarray:
        """The fixed merge as linear weights over (base, *sources) or the sources."""
        spec, m = self.config.merged, self.models
        if spec.method not in LINEAR_MERGES:
            raise SpaceError(f"space.merged.method: {spec.method!r} is not a linear combination "
                             f"of the models (supported: {', '.join(LINEAR_MERGES)}); a "
                             "non-linear merged value needs a recipe-defined source model")
        n = len(m.sources)
        if spec.weight is None:
            w = np.full(n, 1.0 / n)
        elif isinstance(spec.weight, dict | list):
            w = np.array(list(source_index(spec.weight, list(m.sources),
                                           "space.merged.weight").values()), dtype=float)
        else:
            w = np.full(n, float(spec.weight))
        normalize = spec.normalize if spec.normalize is not None else spec.method == "linear"
        if normalize:
            if abs(w.sum()) < 1e-12:
                raise SpaceError("space.merged.weight: the weights sum to 0 and cannot be "
                                 "normalised")
            w = w / w.sum()
        if spec.method == "linear":
            return w
        if m.base is None:
            raise SpaceError("space.merged: task_arithmetic needs a base model")
        w = spec.lambda_ * w
        return np.concatenate([[1.0 - w.sum()], w])

    def _one_hot(self, ref: str) -> np.ndarray:
        v = np.zeros(len(self.refs))
        v[self.refs.index(ref)] = 1.0
        return v

    def _filter(self, layer: int, block: str) -> str:
        return f"{self.models.layer_key}.{layer}.{self.config.blocks[block]}"

    def _check_blocks(self) -> None:
        names = self.models.tensor_names
        if names is None:
            return
        for block, part in self.config.blocks.items():
            flt = f"{self.models.layer_key}.0.{part}"
            if not any(flt in n for n in names):
                pattern = re.compile(rf"(?<![^.]){re.escape(self.models.layer_key)}\.0\.([^.]+)\.")
                found = dict.fromkeys(m.group(1) for n in names if (m := pattern.search(n)))
                raise SpaceError(f"space.blocks.{block}: {part!r} matches no tensor of layer 0 "
                                 f"(modules of a layer: {', '.join(found) or 'none'})")

    # -- genome <-> recipe --------------------------------------------------------------

    def choice_of(self, genome: Sequence[float]) -> dict[str, str]:
        """Dimension name -> the option a genome picks (indices rounded)."""
        genome = genome_array(genome, self.dims)
        out = {}
        for d, g in zip(self.dims, genome, strict=True):
            index = int(round(g))
            if not 0 <= index < len(self.options):
                raise SpaceError(f"{d.name}: {g} is not a choice index "
                                 f"(0..{len(self.options) - 1})")
            out[d.name] = self.options[index]
        return out

    def decode(self, genome: Sequence[float]) -> Recipe:
        """The linear recipe of one module choice per (layer, block)."""
        picked = list(self.choice_of(genome).values())
        vectors = [self._vectors[p] for p in picked]
        rest = self._vectors[self.config.rest]
        models = []
        for k, ref in enumerate(self.refs):
            entries = [Conditional(filter=self._filter(layer, block), value=float(v[k]))
                       for (layer, block), v in zip(self.slots, vectors, strict=True)]
            entries.append(Conditional(value=float(rest[k])))
            models.append({"model": ref, "parameters": {"weight": entries}})
        data = {"method": "linear", "models": models, "parameters": {"normalize": False},
                "seed": self.models.seed, **self.config.recipe}
        try:
            return Recipe.from_dict(data)
        except RecipeError as err:
            raise SpaceError(f"the space decodes to an invalid recipe: {err}") from None

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The choice indices of a linear recipe whose blocks each copy one source or
        equal the merged value."""
        if recipe.method != "linear":
            raise SpaceError(f"a {recipe.method!r} recipe is not a component choice "
                             "(expected 'linear')")
        genome = np.empty(len(self.dims))
        for j, (layer, block) in enumerate(self.slots):
            probe = f"model.{self._filter(layer, block)}.weight"
            v = _weights(recipe, probe, self.refs)
            index = next((i for i, o in enumerate(self.options)
                          if np.allclose(v, self._vectors[o], rtol=0, atol=1e-9)), None)
            if index is None:
                raise SpaceError(f"{self.dims[j].name}: the recipe's weights {list(v)} are "
                                 f"none of {', '.join(self.options)}")
            genome[j] = index
        return genome

    def describe(self) -> str:
        """One line per block kind, and where the rest comes from."""
        spec = self.config.merged
        lines = [f"{block}: {self.models.num_layers} categorical dims ({part!r} tensors; "
                 f"choices {', '.join(self.options)})"
                 for block, part in self.config.blocks.items()]
        lines.append(f"merged = {spec.method} (lambda {spec.lambda_:g}); other tensors: "
                     f"{self.config.rest}")
        return "\n".join(lines)


def _weights(recipe: Recipe, probe: str, refs: Sequence[str]) -> np.ndarray:
    """Each of ``refs``' linear weight for one tensor (0 for a model the recipe lacks),
    divided by their sum when the recipe normalises."""
    index = {m.model: i for i, m in enumerate(recipe.models)}
    unknown = [m for m in index if m not in refs]
    if unknown:
        raise SpaceError(f"the recipe merges {unknown[0]!r}, which is not in the space")
    v = np.array([float(recipe.resolve("weight", probe, 0.0, index[r])) if r in index else 0.0
                  for r in refs])
    if recipe.resolve("normalize", probe, 0.0) and abs(v.sum()) > 1e-12:
        v = v / v.sum()
    return v


_BLOCK = re.compile(r"(?<![^.])[A-Za-z_]\w*\.\d+\.\S+")


def count_distinct_modules(recipe: Recipe) -> int:
    """Modules a component-wise (``linear``) recipe must store, MERGE's storage objective.

    A module is one (layer, block): a ``{filter, value}`` entry of the models'
    ``weight`` settings whose filter names a layer (``layers.3.mlp``).  Our reading of
    MERGE's "distinct modules kept": the merged model's module of every block is
    stored once (the shared model every task falls back on), and each block the
    recipe takes whole from one model (weight 1 on it, 0 on the others) stores that
    expert's module too.  So all-merged counts the number of blocks, and every block
    copied from an expert adds one.  Refuses a recipe that names no layer blocks.
    """
    if recipe.method != "linear":
        raise SpaceError(f"distinct modules are counted on component (linear) recipes, "
                         f"not {recipe.method!r}")
    filters = dict.fromkeys(
        c.filter for m in recipe.models for c in _entries(m.parameters.get("weight"))
        if c.filter and _BLOCK.fullmatch(c.filter))
    filters.update(dict.fromkeys(c.filter for c in _entries(recipe.parameters.get("weight"))
                                 if c.filter and _BLOCK.fullmatch(c.filter)))
    if not filters:
        raise SpaceError("the recipe's weights name no layer blocks ({filter: layers.<i>."
                         "<block>} entries): nothing to count")
    refs = [m.model for m in recipe.models]
    count = 0
    for flt in filters:
        v = _weights(recipe, f"model.{flt}.weight", refs)
        expert = np.count_nonzero(v) == 1 and np.isclose(v.max(), 1.0, rtol=0, atol=1e-9)
        count += 1 + bool(expert)
    return count


def _entries(setting: Any) -> list[Conditional]:
    return [c for c in setting if isinstance(c, Conditional)] if isinstance(setting, list) else []


register_space("components", ComponentsConfig, ComponentSpace,
               "a source or the merged value per layer block (MERGE)")
