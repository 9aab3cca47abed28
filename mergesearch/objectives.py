"""Objectives that are not evaluator metrics: read from the recipe or the merged weights.

An experiment declares every objective alike, under ``evaluator.objectives``; its
``source`` says where the value comes from:

* ``evaluator`` (the default): a metric of the evaluator's tasks, computed by it;
* ``recipe``: a function of the recipe alone (``num_models``: source models given a
  non-zero weight; ``distinct_modules``: the (layer, block) modules a component-wise
  recipe must store, from :mod:`mergesearch.spaces.components`);
* ``weights``: a statistic of the merged weights against the base, computed by a
  *reducer* that is fed ``(name, merged, base)`` one tensor at a time and answers
  :meth:`Reducer.value` at the end (``delta_sparsity``: the share of exactly-zero
  entries of merged - base; ``delta_l1``: sum |merged - base|, whose negative is
  MM-MO's sparsity objective; ``delta_l2``: its L2 norm).

Both kinds are computed on the worker, right after the merge:
:func:`extra_objective_values` returns them for one candidate.  New metrics are
registered with :func:`register_recipe_metric` and :func:`register_weight_reducer`.

This module does not import torch (experiment configs are validated without it);
reducers work on whatever tensors they are given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from mergesearch.errors import MergesearchError

if TYPE_CHECKING:
    import torch

    from mergesearch.evaluation.config import ObjectiveConfig
    from mergesearch.execution.worker import Worker
    from mergesearch.recipe import Recipe
    from mergesearch.trial import Candidate

SOURCES = ("evaluator", "recipe", "weights")


class ObjectiveError(MergesearchError, ValueError):
    """An objective cannot be computed (unknown metric, no base model ...); the message
    says why."""


class Reducer(Protocol):
    """Accumulates one statistic over the merged model's tensors."""

    def update(self, name: str, merged: torch.Tensor, base: torch.Tensor) -> None: ...

    def value(self) -> float: ...


RecipeMetric = Callable[["Recipe"], float]
_RECIPE: dict[str, RecipeMetric] = {}
_WEIGHTS: dict[str, Callable[[], Reducer]] = {}


def register_recipe_metric(name: str) -> Callable[[RecipeMetric], RecipeMetric]:
    """Decorator: ``fn(recipe) -> float`` computes the recipe objective ``name``."""
    def decorate(fn: RecipeMetric) -> RecipeMetric:
        if name in _RECIPE and _RECIPE[name] is not fn:
            raise ValueError(f"recipe metric {name!r} is already registered")
        _RECIPE[name] = fn
        return fn
    return decorate


def register_weight_reducer(name: str) -> Callable[[type], type]:
    """Decorator: the class (or factory) makes a fresh reducer for the weight objective
    ``name``."""
    def decorate(factory: type) -> type:
        if name in _WEIGHTS and _WEIGHTS[name] is not factory:
            raise ValueError(f"weight reducer {name!r} is already registered")
        _WEIGHTS[name] = factory
        return factory
    return decorate


def known_metrics(source: str) -> list[str]:
    """The metrics registered for ``recipe`` or ``weights`` (sorted)."""
    return sorted(_RECIPE if source == "recipe" else _WEIGHTS)


def metric_problem(source: str, metric: str) -> str | None:
    """Why ``metric`` cannot be computed for ``source`` (None: it can); for config checks."""
    if source == "evaluator":
        return None  # the evaluator checks its metrics against its tasks
    if source not in SOURCES:
        return f"unknown source {source!r}; choose one of {', '.join(SOURCES)}"
    known = known_metrics(source)
    if metric not in known:
        return f"unknown {source} metric {metric!r}; known: {', '.join(known)}"
    if metric == "distinct_modules" and _count_distinct_modules() is None:
        return ("recipe metric 'distinct_modules' needs "
                "mergesearch.spaces.components.count_distinct_modules, which this install "
                "does not have")
    return None


# ----------------------------------------------------------------- recipe metrics

@register_recipe_metric("num_models")
def num_models(recipe: Recipe) -> float:
    """Source models the merge uses: those whose ``weight`` is non-zero somewhere (every
    model of a method without a per-model weight; every model of a layer path). The base
    is not counted."""
    if recipe.layer_path:
        return float(len({hop.model for hop in recipe.layer_path}))
    from mergesearch.recipe import setting_scalars

    if "weight" not in _per_model_params(recipe.method):
        return float(len(recipe.models))
    used = 0
    for i in range(len(recipe.models)):
        setting = recipe.setting("weight", i)
        used += setting is None or any(float(v) != 0 for v in setting_scalars(setting))
    return float(used)


def _per_model_params(method: str) -> set[str]:
    from mergesearch.merging import get_method

    return {p.name for p in get_method(method).params if p.per_model}


def _count_distinct_modules() -> Callable[[Recipe], int] | None:
    try:
        from mergesearch.spaces.components import count_distinct_modules
    except ImportError:
        return None
    return count_distinct_modules


@register_recipe_metric("distinct_modules")
def distinct_modules(recipe: Recipe) -> float:
    """(layer, block) modules a component-wise recipe must store (MERGE's storage)."""
    count = _count_distinct_modules()
    if count is None:
        raise ObjectiveError(metric_problem("recipe", "distinct_modules"))
    return float(count(recipe))


def genome_value(decode: Callable[[Sequence[float]], Recipe], metric: str,
                 genome: Sequence[float]) -> float:
    """The recipe metric ``metric`` of the genome's recipe: how a strategy computes a
    ``source: recipe`` objective itself (``Problem.exact``; bind the first two arguments
    with :func:`functools.partial`)."""
    return float(_RECIPE[metric](decode(genome)))


def exact_objectives(decode: Callable[[Sequence[float]], Recipe] | None,
                     objectives: Iterable[ObjectiveConfig]
                     ) -> dict[str, Callable[[Sequence[float]], float]]:
    """``Problem.exact`` for a search: every ``source: recipe`` objective as a function
    of the genome (none without ``decode``)."""
    if decode is None:
        return {}
    return {o.name: partial(genome_value, decode, o.metric) for o in objectives
            if o.source == "recipe" and o.metric in _RECIPE}


def recipe_values(recipe: Recipe, objectives: Iterable[ObjectiveConfig]) -> dict[str, float]:
    """The values of the ``source: recipe`` objectives for one recipe."""
    out = {}
    for o in objectives:
        if o.source == "recipe":
            if o.metric not in _RECIPE:
                raise ObjectiveError(f"objective {o.name!r}: {metric_problem('recipe', o.metric)}")
            out[o.name] = float(_RECIPE[o.metric](recipe))
    return out


# ---------------------------------------------------------------- weight reducers

class DeltaReducer:
    """A reducer of ``merged - base`` alone: :class:`WeightObjectives` computes that delta
    (in float32) once per tensor for all of them and calls :meth:`add`."""

    def update(self, name: str, merged: torch.Tensor, base: torch.Tensor) -> None:
        self.add(name, merged.float() - base.float())

    def add(self, name: str, delta: torch.Tensor) -> None:
        raise NotImplementedError


@register_weight_reducer("delta_sparsity")
class DeltaSparsity(DeltaReducer):
    """Share of the entries of merged - base that are exactly zero, over all tensors."""

    def __init__(self) -> None:
        self.zeros, self.count = 0, 0

    def add(self, name: str, delta: torch.Tensor) -> None:
        self.zeros += int((delta == 0).sum())
        self.count += delta.numel()

    def value(self) -> float:
        return self.zeros / self.count if self.count else math.nan


@register_weight_reducer("delta_l1")
class DeltaL1(DeltaReducer):
    """sum |merged - base| over all tensors (MM-MO's sparsity objective is its negative)."""

    def __init__(self) -> None:
        self.total = 0.0

    def add(self, name: str, delta: torch.Tensor) -> None:
        self.total += float(delta.abs().sum())

    def value(self) -> float:
        return self.total


@register_weight_reducer("delta_l2")
class DeltaL2(DeltaReducer):
    """The L2 norm of merged - base, all tensors taken as one vector."""

    def __init__(self) -> None:
        self.squares = 0.0

    def add(self, name: str, delta: torch.Tensor) -> None:
        self.squares += float(delta.square().sum())

    def value(self) -> float:
        return math.sqrt(self.squares)


class WeightObjectives:
    """The ``source: weights`` objectives of an experiment, reduced over one merge.

    Feed every merged tensor with :meth:`update` (directly, or as a merge streams:
    :func:`weight_sink`), then read :meth:`values`; make a new one per merged model.
    The delta of a tensor is computed once for every :class:`DeltaReducer`.
    """

    def __init__(self, objectives: Iterable[ObjectiveConfig]):
        self.reducers: dict[str, Reducer] = {}
        for o in objectives:
            if o.source != "weights":
                continue
            if o.metric not in _WEIGHTS:
                raise ObjectiveError(f"objective {o.name!r}: {metric_problem('weights', o.metric)}")
            self.reducers[o.name] = _WEIGHTS[o.metric]()

    def __bool__(self) -> bool:
        return bool(self.reducers)

    def update(self, name: str, merged: torch.Tensor, base: torch.Tensor) -> None:
        if merged.shape != base.shape:
            raise ObjectiveError(f"weight objectives: merged {name!r} has shape "
                                 f"{list(merged.shape)}, the base {list(base.shape)}")
        delta = None
        for reducer in self.reducers.values():
            if isinstance(reducer, DeltaReducer):
                if delta is None:
                    delta = merged.float() - base.float()
                reducer.add(name, delta)
            else:
                reducer.update(name, merged, base)

    def values(self) -> dict[str, float]:
        return {name: float(r.value()) for name, r in self.reducers.items()}


# ------------------------------------------------------------------ on the worker

def _objectives(worker: Worker) -> list[ObjectiveConfig]:
    """The worker's recipe and weight objectives (read from its spec if it lists none)."""
    objectives = getattr(worker, "extra_objectives", None)
    if objectives is None:
        from mergesearch.evaluation.config import EvaluatorConfig

        objectives = EvaluatorConfig.model_validate(worker.spec.evaluator).objectives
    return [o for o in objectives if o.source != "evaluator"]


def weight_sink(worker: Worker, recipe: Recipe) -> Any:
    """A :class:`~mergesearch.models.sinks.ReducerSink` reducing the worker's weight
    objectives over a merge of ``recipe`` (None if there are none).

    Give it to ``worker.merger.apply(recipe, also=...)``: the reducers are fed as the
    merge streams, in the same pass, and each tensor is compared with the base's tensor
    from the worker's pool, as the resident model holds it (its dtype).  Then pass it
    to :func:`extra_objective_values` as ``weights``.
    """
    weights = WeightObjectives(_objectives(worker))
    if not weights:
        return None
    if recipe.base is None or recipe.layer_path:
        raise ObjectiveError("weight objectives compare the merge with its base: they need a "
                             "recipe with a base model and no layer_path")
    from mergesearch.models.sinks import ReducerSink

    merger = worker.merger
    pool, base = merger.pool, recipe.base
    ckpt = pool.checkpoint(base)
    return ReducerSink(weights, lambda name: pool.fetch(base, name) if name in ckpt else None,
                       dtype=merger.dtype)


def extra_objective_values(worker: Worker, candidate: Candidate, model: Any, *,
                           weights: Any = None) -> dict[str, float]:
    """The recipe and weight objectives of one merged candidate (``{}`` if there are none).

    ``worker.extra_objectives`` lists the experiment's objectives (those of
    ``source: evaluator`` are skipped); a worker without it has them read from its
    ``spec.evaluator``.  ``weights``: the :func:`weight_sink` the merge streamed into
    (the worker's way); without it, weight objectives walk the resident ``model``'s
    tensors that the recipe's base has and compare each with the base's tensor from
    the worker's pool, in float32 (a model held in a lower precision is compared as
    held).
    """
    recipe = candidate.recipe
    out = recipe_values(recipe, _objectives(worker))
    if weights is None:
        weights = weight_sink(worker, recipe)
        if weights is None:
            return out
        from mergesearch.models.sinks import drain

        drain(model.state_dict().items(), weights)
    return out | weights.reducer.values()
