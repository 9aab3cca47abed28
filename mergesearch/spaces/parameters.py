"""The parameter space (``kind: parameters``, the default): which recipe parameters
vary, where, and within what bounds.

A search space is declared in YAML (``search_spaces/*.yaml``) and bound to a
set of models (the sources' names and the number of layers) to give a
:class:`SearchSpace`: a flat genome of named, bounded real dimensions with
``decode(genome) -> Recipe`` and ``encode(recipe) -> genome``.

Each searched parameter has

* ``per``: ``source`` (one value per source model) or ``shared`` (one value
  for all, written recipe-wide);
* ``granularity``: ``global``, ``layer``, ``{groups: G}`` (one value per run
  of G consecutive layers), ``{modules: [self_attn, mlp]}`` (one value per
  tensor-name filter), or groups and modules together;
* ``bounds`` and ``init`` in genome units; with ``per: source`` the init may
  be given per source, ``{rev: 1.0, srt: 0.0}`` (``"*"``: every other source)
  or a list in source order, so a start point can be "this expert alone"
  (``{rev: 1, "*": 0}``) or "this pair";
* ``transform``: a list applied in order when decoding: ``abs``,
  ``clamp`` (to the method parameter's valid range), ``normalize`` (values of
  the sources at one position sum to 1) and ``softmax`` (across sources).

Layered values become mergekit-style ``{filter, value}`` lists (``layers.3.``,
``layers.3.self_attn``), so every decoded recipe also exports to mergekit.
A tensor of a layer that no module filter matches (a layer norm) takes the
mean of its layer group's values; tensors outside the layers (embeddings,
final norm, head) take the mean of all of a parameter's values: our choice, so
that they follow the blocks they sit in or feed.

Searching ``lambda`` too (``per: shared``) scales the merged task vector:
``search_spaces/task_arithmetic_lambda.yaml`` and
``ties_layer_groups_lambda.yaml``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergesearch.configs import format_validation_error, read_yaml_mapping
from mergesearch.merging import get_method
from mergesearch.merging.layers import gradient_position
from mergesearch.recipe import Conditional, Recipe, RecipeError, Setting
from mergesearch.spaces import register_space
from mergesearch.spaces.base import GenomeDims, Models, SpaceError, genome_array, source_index
from mergesearch.strategies.base import Dimension

TRANSFORMS = ("abs", "clamp", "normalize", "softmax")
_ACROSS_SOURCES = {"normalize", "softmax"}


class Granularity(BaseModel):
    """Where one parameter takes separate values: runs of layers and/or module filters."""

    model_config = ConfigDict(extra="forbid")

    groups: int | None = Field(None, ge=1, description="layers per group; None = one value")
    modules: list[str] | None = Field(None, min_length=1)


class ParamSpace(BaseModel):
    """How one recipe parameter is searched."""

    model_config = ConfigDict(extra="forbid")

    per: Literal["source", "shared"] = "source"
    granularity: Granularity = Granularity()
    bounds: tuple[float, float]
    init: float | dict[str, float] | list[float] | None = Field(
        None, description="start value; per source as {name: value} or a list in order")
    transform: list[str] = Field(default_factory=list)

    @field_validator("bounds")
    @classmethod
    def _finite_bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(map(math.isfinite, value)):
            raise ValueError(f"{list(value)} must be finite numbers: a search needs a bounded "
                             "box (use transform: [abs] or [clamp] for a one-sided range)")
        return value

    @field_validator("init")
    @classmethod
    def _finite_init(cls, value):
        values = value.values() if isinstance(value, dict) else \
            value if isinstance(value, list) else [] if value is None else [value]
        for v in values:
            if not math.isfinite(v):
                raise ValueError(f"{v} must be a finite number")
        return value

    @field_validator("granularity", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value == "global":
            return {}
        if value == "layer":
            return {"groups": 1}
        return value

    @field_validator("transform", mode="before")
    @classmethod
    def _transform_list(cls, value: Any) -> Any:
        value = [value] if isinstance(value, str) else value
        out = []
        for name in value:
            name = {"normalise": "normalize"}.get(name, name)
            if name not in TRANSFORMS:
                raise ValueError(f"unknown transform {name!r} (known: {', '.join(TRANSFORMS)})")
            out.append(name)
        return out


class SpaceConfig(BaseModel):
    """A search space as written in YAML."""

    model_config = ConfigDict(extra="forbid")

    # left out of dumps, so fingerprints of studies made before kinds existed still match
    kind: Literal["parameters"] = Field("parameters", exclude=True)
    description: str = ""
    method: str
    parameters: dict[str, ParamSpace] = Field(min_length=1)
    fixed: dict[str, Setting] = Field(
        default_factory=dict, description="recipe-wide parameters that are not searched")
    recipe: dict[str, Any] = Field(
        default_factory=dict, description="other recipe fields, e.g. dtype, lines, vocab")

    @classmethod
    def load(cls, source: str | Path | dict[str, Any]) -> SpaceConfig:
        """From a YAML file path or a mapping (an inline space in an experiment)."""
        where = "space"
        if not isinstance(source, dict):
            where = str(source)
            source = read_yaml_mapping(source, SpaceError, "search space file")
        try:
            return cls.model_validate(source)
        except ValidationError as err:
            raise SpaceError(format_validation_error(err, where)) from None


@dataclass(frozen=True)
class _Slot:
    """Where the values of one parameter go: a tensor-name filter per position."""

    filters: tuple[str | None, ...]  # None: the single global value
    probes: tuple[str, ...]  # a tensor name inside each position, to read values back
    # with layer groups and module filters: (layer filters, positions) per group, so that
    # a tensor of the group no module matches takes the mean of the group's values
    groups: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...] = ()


class SearchSpace(GenomeDims):
    """A genome <-> Recipe mapping for one set of models.

    ``sources`` maps short names (used in dimension names) to model references.
    ``tensor_names`` (the first model's, optional) lets module filters be checked:
    one that matches no tensor is refused instead of silently falling back.
    """

    def __init__(self, config: SpaceConfig, *, base: str | None, sources: dict[str, str],
                 num_layers: int, layer_key: str = "layers", seed: int = 0,
                 tensor_names: Sequence[str] | None = None):
        self.config = config
        self.base = base
        self.sources = dict(sources)
        self.num_layers = num_layers
        self.layer_key = layer_key
        self.seed = seed
        self.tensor_names = None if tensor_names is None else list(tensor_names)
        self.method = self._check_method()
        self._slots: dict[str, _Slot] = {}
        self.dims: list[Dimension] = []
        self._index: dict[tuple[str, int | None], slice] = {}  # (param, source idx) -> genome span
        for name, spec in config.parameters.items():
            self._check_param(name, spec)
            self._check_modules(f"space.parameters.{name}.granularity.modules", spec.granularity)
            slot = self._slot(spec.granularity)
            self._slots[name] = slot
            owners = list(range(len(self.sources))) if spec.per == "source" else [None]
            inits = self._inits(name, spec)
            for owner in owners:
                start = len(self.dims)
                for label in self._labels(spec.granularity):
                    who = f"[{list(self.sources)[owner]}]" if owner is not None else ""
                    init = inits[owner]
                    self.dims.append(Dimension(f"{name}{who}{label}", spec.bounds[0],
                                               spec.bounds[1], init))
                self._index[(name, owner)] = slice(start, len(self.dims))
        # decoded now, so invalid recipes fail here and not at the first candidate
        self.start: Recipe = self.decode(self.x0)

    # -- building -----------------------------------------------------------------------

    def _check_method(self):
        try:
            method = get_method(self.config.method)
        except KeyError as err:
            raise SpaceError(f"space.method: {err.args[0]}") from None
        if method.name == "passthrough":
            raise SpaceError("space.method: layer-path (passthrough) spaces are not supported yet")
        n = len(self.sources)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            raise SpaceError(f"method {method.name!r} cannot merge {n} source model(s)")
        return method

    def _check_param(self, name: str, spec: ParamSpace) -> None:
        where = f"space.parameters.{name}"
        known = {p.name: p for p in self.method.params}
        if name not in known:
            raise SpaceError(f"{where}: {self.method.name!r} has no parameter {name!r} "
                             f"(known: {', '.join(known) or 'none'})")
        param = known[name]
        if param.kind is bool:
            raise SpaceError(f"{where}: {name!r} is a switch, not a number: put it under 'fixed'")
        if spec.per == "source" and not param.per_model:
            raise SpaceError(f"{where}: {name!r} is method-wide: use per: shared")
        low, high = spec.bounds
        if not low < high:
            raise SpaceError(f"{where}.bounds: low {low} must be below high {high}")
        valid_low = -math.inf if param.low is None else param.low
        valid_high = math.inf if param.high is None else param.high
        if not spec.transform and (low < valid_low or high > valid_high):
            raise SpaceError(f"{where}.bounds: {list(spec.bounds)} exceeds the valid range of "
                             f"{name!r}, [{param.low}, {param.high}]: narrow the bounds or add "
                             "transform: [clamp]")
        across = _ACROSS_SOURCES.intersection(spec.transform)
        if across and spec.per != "source":
            raise SpaceError(f"{where}.transform: {', '.join(sorted(across))} works across "
                             "sources and needs per: source")
        if spec.granularity.groups is not None and spec.granularity.groups > self.num_layers:
            raise SpaceError(f"{where}.granularity: groups of {spec.granularity.groups} layers, "
                             f"but the models have {self.num_layers}")
        if name in self.config.fixed:
            raise SpaceError(f"{where}: {name!r} is both searched and fixed")

    def _inits(self, name: str, spec: ParamSpace) -> dict[int | None, float]:
        """The start value of each owner (source index, or None when shared)."""
        where = f"space.parameters.{name}.init"
        init = spec.init
        if isinstance(init, dict | list):
            if spec.per != "source":
                raise SpaceError(f"{where}: a value per source needs per: source")
            by_name = source_index(init, list(self.sources), where)
            values = dict(enumerate(by_name.values()))
        else:
            mid = sum(spec.bounds) / 2 if init is None else init
            values = dict.fromkeys(range(len(self.sources)) if spec.per == "source" else [None],
                                   mid)
        low, high = spec.bounds
        for owner, value in values.items():
            if not low <= value <= high:
                who = "" if owner is None or not isinstance(init, dict | list) else \
                    f".{list(self.sources)[owner]}"
                raise SpaceError(f"{where}{who}: {value} is outside the bounds {list(spec.bounds)}")
        return values

    def _check_modules(self, where: str, g: Granularity) -> None:
        """Refuse a module filter that matches no tensor where it is applied (inside a
        layer, right after the layer index, when the parameter also varies by layer)."""
        if g.modules is None or self.tensor_names is None:
            return
        for module in g.modules:
            if g.groups is None:
                filters = [module]
            else:
                filters = [f"{self.layer_key}.{i}.{module}" for i in range(self.num_layers)]
            if not any(f in name for name in self.tensor_names for f in filters):
                found = ", ".join(self._layer_modules()[:8]) or "none"
                raise SpaceError(f"{where}: {module!r} matches no tensor of the models "
                                 f"(modules of a layer: {found})")

    def _layer_modules(self) -> list[str]:
        """The first name part after the layer index (``self_attn``, ``mlp`` ...), in order."""
        pattern = re.compile(rf"(?<![^.]){re.escape(self.layer_key)}\.\d+\.([^.]+)\.")
        found = (pattern.search(name) for name in self.tensor_names or ())
        return list(dict.fromkeys(m.group(1) for m in found if m))

    def _groups(self, g: Granularity) -> list[list[int]] | None:
        if g.groups is None:
            return None
        return [list(range(i, min(i + g.groups, self.num_layers)))
                for i in range(0, self.num_layers, g.groups)]

    def _labels(self, g: Granularity) -> list[str]:
        groups = self._groups(g)
        layer_labels = [""] if groups is None else [
            f"@L{ls[0]}" if len(ls) == 1 else f"@L{ls[0]}-{ls[-1]}" for ls in groups]
        module_labels = [""] if g.modules is None else [f"/{m}" for m in g.modules]
        return [a + b for a in layer_labels for b in module_labels]

    def _slot(self, g: Granularity) -> _Slot:
        groups = self._groups(g)
        modules = g.modules or [None]
        filters, probes, fallbacks = [], [], []
        for layers in groups or [None]:
            if layers is not None and g.modules:
                positions = tuple(range(len(filters), len(filters) + len(modules)))
                fallbacks.append((tuple(f"{self.layer_key}.{i}." for i in layers), positions))
            for module in modules:
                if layers is None:
                    filters.append(module)
                    probes.append(f"model.{self.layer_key}.0.{module or 'any'}.weight")
                else:
                    # one filter per layer of the group; the probe reads the first
                    filters.append(tuple(f"{self.layer_key}.{i}." + (f"{module}" if module else "")
                                         for i in layers))
                    probes.append(f"model.{self.layer_key}.{layers[0]}.{module or 'any'}.weight")
        return _Slot(tuple(filters), tuple(probes), tuple(fallbacks))

    # -- genome <-> recipe --------------------------------------------------------------

    def decode(self, genome: Sequence[float]) -> Recipe:
        """The recipe a genome stands for."""
        genome = genome_array(genome, self.dims)
        sources = [{"model": ref, "parameters": {}} for ref in self.sources.values()]
        shared: dict[str, Setting] = dict(self.config.fixed)
        for name, spec in self.config.parameters.items():
            param = self.method.param(name)
            if spec.per == "source":
                values = np.stack([genome[self._index[(name, i)]] for i in range(len(sources))])
                values = _apply(spec.transform, values, param)
                for i, row in enumerate(values):
                    sources[i]["parameters"][name] = self._setting(self._slots[name], row)
            else:
                row = _apply(spec.transform, genome[self._index[(name, None)]][None], param)[0]
                shared[name] = self._setting(self._slots[name], row)
        data = {"method": self.config.method, "base": self.base, "models": sources,
                "parameters": shared, "seed": self.seed, **self.config.recipe}
        try:
            return Recipe.from_dict(data)
        except RecipeError as err:
            raise SpaceError(f"the space decodes to an invalid recipe: {err}") from None

    def encode(self, recipe: Recipe) -> np.ndarray:
        """A genome that decodes to ``recipe`` (values read at each position, transforms
        inverted where they can be, then clipped to the bounds)."""
        genome = np.empty(len(self.dims))
        refs = list(self.sources.values())
        for name, spec in self.config.parameters.items():
            slot = self._slots[name]
            owners = range(len(refs)) if spec.per == "source" else [None]
            rows = []
            for owner in owners:
                index = None
                if owner is not None:
                    index = next((i for i, m in enumerate(recipe.models) if m.model == refs[owner]),
                                 None)
                    if index is None:
                        raise SpaceError(f"recipe has no model {refs[owner]!r}")
                rows.append([float(recipe.resolve(
                    name, probe, gradient_position(probe, self.num_layers), index))
                    for probe in slot.probes])
            values = _invert(spec.transform, np.array(rows))
            for owner, row in zip(owners, values, strict=True):
                span = self._index[(name, owner)]
                genome[span] = row
        return np.clip(genome, [d.low for d in self.dims], [d.high for d in self.dims])

    def _setting(self, slot: _Slot, row: np.ndarray) -> Setting:
        if slot.filters == (None,):
            return float(row[0])
        entries = []
        for flt, value in zip(slot.filters, row, strict=True):
            for f in flt if isinstance(flt, tuple) else (flt,):
                entries.append(Conditional(filter=f, value=float(value)))
        # after every module entry (first match wins): the rest of a layer, then the rest
        for layer_filters, positions in slot.groups:
            mean = float(np.mean(row[list(positions)]))
            entries.extend(Conditional(filter=f, value=mean) for f in layer_filters)
        entries.append(Conditional(value=float(np.mean(row))))
        return entries

    def describe(self) -> str:
        """One line per parameter: how many dimensions it takes and where."""
        lines = []
        for name, spec in self.config.parameters.items():
            n = sum(s.stop - s.start for (p, _), s in self._index.items() if p == name)
            lines.append(f"{name}: {n} dims ({spec.per}, bounds {list(spec.bounds)})")
        return "\n".join(lines)


def _build(config: SpaceConfig, models: Models) -> SearchSpace:
    return SearchSpace(config, base=models.base, sources=models.sources,
                       num_layers=models.num_layers, layer_key=models.layer_key,
                       seed=models.seed, tensor_names=models.tensor_names)


register_space("parameters", SpaceConfig, _build, "layer-wise merge parameters")


def _apply(transforms: list[str], values: np.ndarray, param) -> np.ndarray:
    """Apply transforms to a (sources x positions) array."""
    for name in transforms:
        if name == "abs":
            values = np.abs(values)
        elif name == "clamp":
            low = -math.inf if param.low is None else param.low
            high = math.inf if param.high is None else param.high
            values = np.clip(values, low, high)
        elif name == "normalize":
            total = values.sum(axis=0, keepdims=True)
            safe = np.where(np.abs(total) < 1e-12, 1.0, total)
            values = np.where(np.abs(total) < 1e-12, 1.0 / len(values), values / safe)
        elif name == "softmax":
            z = np.exp(values - values.max(axis=0, keepdims=True))
            values = z / z.sum(axis=0, keepdims=True)
    return values


def _invert(transforms: list[str], values: np.ndarray) -> np.ndarray:
    """A preimage of decoded values: softmax -> centred log; the rest keep values as they are
    (abs, clamp and normalize map their own outputs to themselves)."""
    for name in reversed(transforms):
        if name == "softmax":
            logs = np.log(np.maximum(values, 1e-12))
            values = logs - logs.mean(axis=0, keepdims=True)
    return values

