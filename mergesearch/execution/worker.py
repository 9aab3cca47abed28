"""A worker: source models held once, one resident model, merge in place, evaluate.

The same class runs in process (local executor) and, later, as a Ray actor:
everything it needs arrives as a :class:`WorkerSpec` of plain data, and only
recipes come in and results go out.

An evaluator that merges recipes itself (``merges_recipes = True``, e.g. the vllm
backend, which merges inside its engine) is started with the spec and given each
trial's recipe (``evaluate_recipe``); the worker then holds no models. Recipe and
weight objectives still work (the evaluator reduces weight objectives where it
merges); probes, which read the merged model in this process, are refused.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mergesearch.evaluation import EvaluatorConfig, make_evaluator
from mergesearch.execution import probes
from mergesearch.models.resident import Hold, ResidentMerger
from mergesearch.objectives import extra_objective_values, recipe_values, weight_sink
from mergesearch.recipe import Recipe
from mergesearch.trial import Candidate, Result, tracked_metric_names

log = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """What a worker needs, as plain data (so it can be shipped to another process)."""

    tokenizer: str | None  # model directory whose tokenizer the evaluator uses (hf backend)
    evaluator: dict[str, Any]  # EvaluatorConfig as a mapping, suite path absolute
    device: str = "cpu"
    dtype: str = "float32"
    hold_sources: Hold = "auto"  # where source tensors are kept (device, pinned host)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    check_recipe: dict[str, Any] | None = field(default=None)  # planned up front to fail early
    worker_class: str | None = None  # "module:Class", a Worker subclass (an extension point)
    loader: str | None = None  # "module:function" opening every model (any torch module)


def make_worker(spec: WorkerSpec) -> Worker:
    """A worker of the spec's class (``Worker`` unless ``worker_class`` names a subclass)."""
    cls = Worker
    if spec.worker_class:
        module, _, name = spec.worker_class.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"execution.worker_class {spec.worker_class!r} cannot be "
                             f"imported: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, Worker)):
            raise ValueError(f"execution.worker_class {spec.worker_class!r} is not a Worker")
    return cls(spec)


class Worker:
    """Merges candidates into one resident model and scores it."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.tokenizer = None
        if spec.tokenizer is not None:  # the python evaluator backend needs none
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(
                spec.tokenizer, trust_remote_code=spec.trust_remote_code)
        config = EvaluatorConfig.model_validate(spec.evaluator)
        # the hf and vllm backends compute evaluator.track's metrics too, generating for
        # exact_match even where no objective asks them to
        options = {"metrics": tracked_metric_names(config.track)} \
            if config.backend in ("hf", "vllm") and config.track else {}
        self.evaluator = make_evaluator(config, self.tokenizer, **options)
        # recipe and weight objectives, computed after each merge (mergesearch.objectives)
        self.extra_objectives = [o for o in config.objectives if o.source != "evaluator"]
        self.merges_itself = bool(getattr(self.evaluator, "merges_recipes", False))
        if self.merges_itself:  # it opens the models where it merges
            self.merger = None
            self.evaluator.start(spec, [o for o in self.extra_objectives
                                        if o.source == "weights"])
            return
        self.merger = ResidentMerger(device=spec.device, dtype=getattr(torch, spec.dtype),
                                     hold=spec.hold_sources, allow_pickle=spec.allow_pickle,
                                     loader=spec.loader)
        if spec.check_recipe is not None:
            self.merger.plan(Recipe.from_dict(spec.check_recipe))

    def close(self) -> None:
        """Release what the evaluator holds (a vLLM engine and its processes); the worker
        scores nothing after.  Safe to call twice."""
        close = getattr(self.evaluator, "close", None)
        if close is not None:
            close()

    def evaluate(self, candidate: Candidate) -> Result:
        """Merge one candidate, then score it (a trial) or answer its probe; any exception
        becomes a failed result."""
        if self.merges_itself:
            return self._evaluate_recipe(candidate)
        t0 = time.perf_counter()
        merged = t0
        try:
            if candidate.recipe is None:
                raise ValueError("candidate has no recipe")
            # weight objectives are reduced while the merge streams, in the same pass
            weights = None if candidate.is_probe or not self.extra_objectives \
                else weight_sink(self, candidate.recipe)
            model = self.merger.apply(candidate.recipe, also=weights)
            merged = time.perf_counter()
            if candidate.is_probe:
                payload, cost = probes.answer(self, model, candidate)
                done = time.perf_counter()
                return Result(candidate_id=candidate.id, payload=payload, cost=cost,
                              timings={"merge": merged - t0, "probe": done - merged})
            extra = extra_objective_values(self, candidate, model, weights=weights) \
                if self.extra_objectives else {}
            # one subset per fidelity for every candidate, so their scores compare
            ev = self.evaluator.evaluate(model, fidelity=candidate.fidelity, seed=0)
        except Exception as err:  # a bad candidate must not stop the search
            log.debug("candidate %d failed", candidate.id, exc_info=True)
            now = time.perf_counter()
            return Result.failed(candidate.id, f"{type(err).__name__}: {err}",
                                 merge=merged - t0, evaluate=now - merged)
        done = time.perf_counter()
        return _scored(candidate, ev, extra, {"merge": merged - t0, "evaluate": done - merged})

    def _evaluate_recipe(self, candidate: Candidate) -> Result:
        """A trial scored by an evaluator that merges the recipe itself."""
        t0 = time.perf_counter()
        try:
            if candidate.recipe is None:
                raise ValueError("candidate has no recipe")
            if candidate.is_probe:
                raise ValueError(f"probe {candidate.kind!r}: backend "
                                 f"{self.evaluator.config.backend} merges each candidate "
                                 "inside its engine, and probes read the merged model in the "
                                 "worker; use evaluator.backend: hf for strategies that probe")
            extra = recipe_values(candidate.recipe, self.extra_objectives)
            ev = self.evaluator.evaluate_recipe(candidate.recipe, fidelity=candidate.fidelity,
                                                seed=0)
        except Exception as err:  # a bad candidate must not stop the search
            log.debug("candidate %d failed", candidate.id, exc_info=True)
            return Result.failed(candidate.id, f"{type(err).__name__}: {err}",
                                 evaluate=time.perf_counter() - t0)
        timings = dict(getattr(self.evaluator, "timings", None) or
                       {"evaluate": time.perf_counter() - t0})
        return _scored(candidate, ev, extra, timings)


def _scored(candidate: Candidate, ev: Any, extra: dict[str, float],
            timings: dict[str, float]) -> Result:
    """A trial's result from its evaluation (cost: the items scored)."""
    return Result(candidate_id=candidate.id, values=dict(ev.values) | extra,
                  scores=ev.scores, correct=ev.correct, items=dict(ev.indices),
                  cost=float(sum(len(v) for v in ev.correct.values())),
                  timings=timings).check_finite()
