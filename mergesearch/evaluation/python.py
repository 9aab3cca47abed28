"""The ``python`` evaluator backend: a scoring function named by import path.

``evaluator: {backend: python, function: "package.module:function", split: test}``
calls ``function(model, split, *, fidelity, seed)`` once per candidate.  It
returns :class:`Scores` or the same as a mapping::

    {"correct": {task: [bool, ...]},          # per item, in the order of "items"
     "items":   {task: [id, ...]},            # which items were scored (ints)
     "scores":  {task: {metric: value}}}

Objectives are read from the scores as the HF evaluator reads them: the mean of
the objective's metric over its tasks (all tasks the function returned, unless
the objective or ``evaluator.tasks`` names some).  ``limit`` and
``subset_seed`` are passed on as keywords when set, and ``options`` always:
a function that does not take a keyword it is given is refused when the
evaluator is built, not at the first candidate.  No tokenizer is involved.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergesearch.models.checkpoint import ModelLoadError
from mergesearch.models.generic import import_function

from .base import Evaluation, EvaluationError
from .config import EvaluatorConfig


@dataclass
class Scores:
    """What a python evaluator function returns (a mapping with these keys also works)."""

    correct: dict[str, list[bool]]
    items: dict[str, list[int]]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


class PythonEvaluator:
    """Scores a model with ``config.function``; see the module docstring."""

    def __init__(self, config: EvaluatorConfig) -> None:
        self.config = config
        try:
            self.function = import_function(config.function, "evaluator.function")
        except ModelLoadError as err:
            raise EvaluationError(str(err)) from None
        # recipe and weight objectives are computed on the worker (mergesearch.objectives)
        self._objectives = [o for o in config.objectives if o.source == "evaluator"]
        self.objective_names = [o.name for o in self._objectives]
        self.directions = {o.name: o.direction for o in self._objectives}
        self.kwargs = dict(config.options)
        if config.limit is not None:
            self.kwargs |= {"limit": config.limit, "subset_seed": config.subset_seed}
        self._check_signature()

    def _check_signature(self) -> None:
        try:
            params = inspect.signature(self.function).parameters
        except (TypeError, ValueError):  # a builtin or C callable: nothing to check
            return
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        missing = [k for k in ("fidelity", "seed", *self.kwargs) if k not in params]
        if missing:
            raise EvaluationError(f"evaluator.function {self.config.function!r} takes no "
                                  f"keyword {', '.join(missing)}; its signature must be "
                                  "function(model, split, *, fidelity, seed, ...)")

    def evaluate(self, model: Any, *, fidelity: float = 1.0, seed: int = 0) -> Evaluation:
        """Call the function on ``model``, check what it returns, read the objectives."""
        if not 0 < fidelity <= 1:
            raise EvaluationError(f"fidelity must be in (0, 1], got {fidelity}")
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            out = self.function(model, self.config.split, fidelity=fidelity, seed=seed,
                                **self.kwargs)
        finally:
            if was_training:
                model.train()
        scores = self._checked(out)
        ev = Evaluation(values={}, scores=scores.scores, correct=scores.correct,
                        n_items={t: len(c) for t, c in scores.correct.items()},
                        indices=scores.items)
        for obj in self._objectives:
            tasks = obj.tasks or list(scores.scores)
            values = []
            for task in tasks:
                metrics = scores.scores.get(task)
                if metrics is None or obj.metric not in metrics:
                    have = sorted(metrics) if metrics is not None else sorted(scores.scores)
                    what = "metrics" if metrics is not None else "tasks"
                    raise EvaluationError(
                        f"objective {obj.name!r}: {self.config.function!r} returned no "
                        f"{obj.metric!r} for task {task!r} ({what}: {have})")
                values.append(float(metrics[obj.metric]))
            ev.values[obj.name] = sum(values) / len(values) if values else math.nan
        return ev

    def _checked(self, out: Any) -> Scores:
        """``out`` as :class:`Scores`, restricted to ``evaluator.tasks``; malformed
        results are refused naming what is wrong."""
        where = f"evaluator.function {self.config.function!r}"
        if isinstance(out, Mapping):
            unknown = sorted(set(out) - {"correct", "items", "scores"})
            if unknown or "correct" not in out or "items" not in out:
                raise EvaluationError(f"{where} must return Scores or a mapping with keys "
                                      f"correct, items and scores, not {sorted(out)}")
            out = Scores(dict(out["correct"]), dict(out["items"]), dict(out.get("scores", {})))
        if not isinstance(out, Scores):
            raise EvaluationError(f"{where} returned {type(out).__name__}, not Scores")
        tasks = self.config.tasks or list(out.correct)
        correct, items, scores = {}, {}, {}
        for task in tasks:
            if task not in out.correct or task not in out.items:
                raise EvaluationError(f"{where} returned no correct/items for task {task!r}")
            correct[task] = [bool(c) for c in out.correct[task]]
            items[task] = [int(i) for i in out.items[task]]
            if len(items[task]) != len(correct[task]):
                raise EvaluationError(f"{where}: task {task!r} has {len(correct[task])} "
                                      f"correct flags but {len(items[task])} item ids")
            scores[task] = {m: float(v) for m, v in out.scores.get(task, {}).items()}
        return Scores(correct, items, scores)
