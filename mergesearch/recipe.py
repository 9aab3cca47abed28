"""Recipe: a declarative, serialisable description of one merge.

A recipe names a merge method, the models it combines and the values of the
method's parameters.  A parameter value (a *setting*) may be

* a scalar (``0.5``, ``true``): the same everywhere;
* a list of numbers (a *gradient*): interpolated across the layers, the first
  value at layer 0 and the last at the last layer, so a list with one entry per
  layer gives explicit per-layer values;
* a list of ``{filter, value}`` entries: the first entry whose ``filter`` is a
  substring of the tensor name applies (no filter, or ``"*"``, matches every
  tensor), and its ``value`` is itself a scalar or a gradient.

These are the rules mergekit applies to its YAML, so recipes convert to and
from mergekit configurations (see :mod:`mergesearch.mergekit_config`).  A data-flow
merge instead lists a ``layer_path``: which layer of which model runs at each
hop, with a scale applied to that layer's input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    model_validator,
)

from mergesearch.configs import format_validation_error, load_json, load_yaml, yaml_problem
from mergesearch.errors import MergesearchError

Number = bool | float
"""A scalar setting; ints are read as floats, booleans stay booleans."""


class RecipeError(MergesearchError, ValueError):
    """A recipe is invalid or cannot be applied; the message names the fix."""


def _finite(value: Any) -> Any:
    """Refuse NaN and infinities anywhere in a setting, before the union is tried (so the
    message says what is wrong instead of listing every shape a setting may take)."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        item = item.get("value") if isinstance(item, dict) else item
        if isinstance(item, list):
            _finite(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{item} is not a usable value; give a finite number")
    return value


class Conditional(BaseModel):
    """One ``{filter, value}`` entry of a setting."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    filter: str | None = None
    value: Annotated[Number | list[float], BeforeValidator(_finite)]


Setting = Annotated[Number | list[float] | list[Conditional], BeforeValidator(_finite)]


def _layer_value(values: list[float], t: float) -> float:
    """Linear interpolation of a gradient at position ``t`` in [0, 1]."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def resolve_setting(setting: Setting, tensor_name: str, t: float) -> Number | None:
    """The value a setting takes for one tensor at layer position ``t``.

    Returns ``None`` when only filtered entries exist and none matches.
    """
    if isinstance(setting, bool | int | float):
        return setting
    if not setting:
        return None
    if isinstance(setting[0], Conditional):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return resolve_setting(cond.value, tensor_name, t)
        return None
    return _layer_value(setting, t)


def setting_scalars(setting: Setting) -> Iterator[Number]:
    """Every scalar that appears anywhere in a setting (for range checks)."""
    if isinstance(setting, bool | int | float):
        yield setting
        return
    for item in setting:
        if isinstance(item, Conditional):
            yield from setting_scalars(item.value)
        else:
            yield item


class SourceModel(BaseModel):
    """A model merged by the recipe, with its per-model parameters."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(description="Local directory or hub id of a checkpoint.")
    parameters: dict[str, Setting] = Field(default_factory=dict)


class Hop(BaseModel):
    """One step of a layer path: run ``layer`` of ``model`` on its input times ``scale``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    layer: StrictInt = Field(ge=0)
    scale: float = 1.0


class Lines(BaseModel):
    """LiNeS: scale the merged task vector of layer l by ``alpha + beta * l / (L - 1)``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    alpha: float
    beta: float


Dtype = Literal["float32", "float16", "bfloat16"]


class Recipe(BaseModel):
    """A merge: method, models, parameter settings and options.

    ``parameters`` holds method-wide parameters; a per-model parameter given
    there is the default for every model that does not set it itself.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: str
    base: str | None = None
    models: list[SourceModel] = Field(default_factory=list)
    parameters: dict[str, Setting] = Field(default_factory=dict)
    layer_path: list[Hop] | None = None
    lines: Lines | None = None
    dtype: Dtype = "float32"
    seed: StrictInt = 0
    tokenizer_source: str | None = None
    vocab: Literal["strict", "base"] = Field(
        "strict",
        description="'strict': models must share the vocabulary size. 'base': embedding rows "
        "are taken up to the base's vocabulary; rows a model lacks count as the base's.",
    )

    # ----------------------------------------------------------------- checks
    @model_validator(mode="after")
    def _check(self) -> Recipe:
        try:
            method = _method(self.method)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        if method.needs_base and self.base is None:
            raise ValueError(f"method {self.method!r} needs a base model: set 'base'")
        if method.name == "passthrough":
            if not self.layer_path:
                raise ValueError("method 'passthrough' needs a non-empty 'layer_path'")
        elif self.layer_path is not None:
            raise ValueError(
                f"'layer_path' is only used by method 'passthrough', not {self.method!r}"
            )
        n = len(self.models)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = (
                f"exactly {method.min_models}"
                if method.min_models == method.max_models
                else f"at least {method.min_models}"
            )
            raise ValueError(f"method {self.method!r} takes {want} model(s) in 'models', got {n}")
        if self.lines is not None and not method.task_vectors:
            raise ValueError(
                f"'lines' scales task vectors; method {self.method!r} does not use them"
            )
        self._check_parameters(method)
        known = self.model_names
        if self.tokenizer_source is not None and self.tokenizer_source not in known:
            raise ValueError(
                f"tokenizer_source {self.tokenizer_source!r} is not one of the recipe's models "
                f"({', '.join(known)})"
            )
        return self

    def _check_parameters(self, method: Any) -> None:
        specs = {p.name: p for p in method.params}

        def check(name: str, setting: Setting, where: str, in_model: bool) -> None:
            spec = specs.get(name)
            if spec is None:
                known = ", ".join(specs) or "none"
                raise ValueError(
                    f"{where}: unknown parameter {name!r} for method {method.name!r} "
                    f"(known: {known})"
                )
            if in_model and not spec.per_model:
                raise ValueError(
                    f"{where}: {name!r} is a method-wide parameter; set it in 'parameters'"
                )
            if _has_empty_list(setting):
                raise ValueError(f"{where}.{name}: an empty list gives no value")
            for value in setting_scalars(setting):
                spec.check(value, where=f"{where}.{name}")

        for name, setting in self.parameters.items():
            check(name, setting, "parameters", False)
        for i, source in enumerate(self.models):
            for name, setting in source.parameters.items():
                check(name, setting, f"models[{i}].parameters", True)
        if method.check is not None:
            for i in range(len(self.models)):
                values = {
                    p.name: [*setting_scalars(self.setting(p.name, i))]
                    if self.setting(p.name, i) is not None else [p.default]
                    for p in method.params
                }
                method.check(values, f"models[{i}] ({self.models[i].model})")
        for spec in method.params:
            if spec.default is not None:
                continue
            if spec.per_model:
                missing = [
                    s.model
                    for s in self.models
                    if spec.name not in s.parameters and spec.name not in self.parameters
                ]
                if missing:
                    raise ValueError(
                        f"parameter {spec.name!r} of {method.name!r} has no value for "
                        f"{', '.join(missing)}: set it per model or in 'parameters'"
                    )
            elif spec.name not in self.parameters:
                raise ValueError(f"method {method.name!r} needs parameter {spec.name!r}")

    # ------------------------------------------------------------ accessors
    @property
    def model_names(self) -> list[str]:
        """Every model the recipe reads: the base, the sources, then layer-path models."""
        names = [self.base] if self.base else []
        names += [s.model for s in self.models]
        names += [hop.model for hop in self.layer_path or ()]
        return list(dict.fromkeys(names))

    def resolve(self, name: str, tensor_name: str, t: float, model_index: int | None = None):
        """Value of parameter ``name`` for one tensor.

        Scopes are tried in order, as in mergekit: the model's own setting, the
        recipe-wide setting, the method default.  A scope whose filters all miss
        the tensor passes to the next one.
        """
        spec = _method(self.method).param(name)
        scopes = [self.parameters.get(name)]
        if model_index is not None:
            scopes.insert(0, self.models[model_index].parameters.get(name))
        for setting in scopes:
            value = None if setting is None else resolve_setting(setting, tensor_name, t)
            if value is not None:
                return spec.kind(value)
        if spec.default is not None:
            return spec.kind(spec.default)
        who = f" for {self.models[model_index].model}" if model_index is not None else ""
        raise RecipeError(
            f"parameter {name!r}{who} has no value for tensor {tensor_name!r}: "
            "add an entry without 'filter' as the default"
        )

    def setting(self, name: str, model_index: int | None = None) -> Setting | None:
        """The setting that applies to a model: its own, else the recipe-wide one."""
        if model_index is not None and name in self.models[model_index].parameters:
            return self.models[model_index].parameters[name]
        return self.parameters.get(name)

    # -------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain data, with unset options left out."""
        return self.model_dump(mode="json", exclude_defaults=True) | {"method": self.method}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise RecipeError(format_validation_error(err, "recipe")) from None

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = load_json(text)
        except ValueError as err:
            raise RecipeError(f"recipe: not valid JSON: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        try:
            data = load_yaml(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe: not valid YAML: {yaml_problem(err)}") from None
        if not isinstance(data, dict):
            raise RecipeError("recipe: expected a mapping at the top level")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe from a .json or .yaml file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise RecipeError(f"recipe {path}: cannot read it ({err.strerror})") from None
        try:
            return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)
        except RecipeError as err:
            raise RecipeError(f"{path}: {err}") from None


def _has_empty_list(setting: Setting) -> bool:
    if isinstance(setting, list):
        return not setting or any(
            isinstance(c, Conditional) and _has_empty_list(c.value) for c in setting
        )
    return False


def uniform_recipe(
    method: str, base: str | None, models: Iterable[str], **parameters: Any
) -> Recipe:
    """A recipe giving every model the same parameters (handy in code and tests)."""
    per_model = {p.name for p in _method(method).params if p.per_model}
    shared = {k: v for k, v in parameters.items() if k not in per_model}
    own = {k: v for k, v in parameters.items() if k in per_model}
    return Recipe(
        method=method,
        base=base,
        models=[SourceModel(model=m, parameters=dict(own)) for m in models],
        parameters=shared,
    )


#: methods already looked up, by name (a name is registered once and never replaced, so a
#: hit stays right; ``Recipe.resolve`` asks for every parameter of every tensor)
_METHODS: dict[str, Any] = {}


def _method(name: str):
    """The merge method registered as ``name`` (imported here: the registry needs torch,
    reading a recipe or a study does not)."""
    hit = _METHODS.get(name)
    if hit is None:
        from mergesearch.merging import get_method

        hit = _METHODS[name] = get_method(name)
    return hit
