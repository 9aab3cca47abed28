"""What an experiment says about evaluation: the suite, its objectives, the subset."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from mergesearch.objectives import metric_problem

from .lm_eval_config import LMEvalOptions
from .vllm_config import VLLMOptions


class ObjectiveConfig(BaseModel):
    """One objective: a metric averaged over some tasks of the suite (``source:
    evaluator``), or computed from the recipe or the merged weights (``recipe``,
    ``weights``: see :mod:`mergesearch.objectives`)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    metric: str
    source: Literal["evaluator", "recipe", "weights"] = "evaluator"
    tasks: list[str] | None = Field(None, min_length=1)  # None: every task of the evaluator
    direction: Literal["maximize", "minimize"] = "maximize"
    weight: float = Field(1.0, gt=0)  # for strategies that scalarise several objectives

    @model_validator(mode="after")
    def _check_source(self) -> ObjectiveConfig:
        if self.tasks is not None and self.source != "evaluator":
            raise ValueError(f"objective {self.name!r}: 'tasks' is only for source: evaluator, "
                             f"not {self.source}")
        problem = metric_problem(self.source, self.metric)
        if problem:
            raise ValueError(f"objective {self.name!r}: {problem}")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        """The default source is left out, so evaluator objectives dump (and fingerprint
        studies) as they did before sources existed."""
        data = handler(self)
        if data.get("source") == "evaluator":
            del data["source"]
        return data


class EstimatorConfig(BaseModel):
    """How a full-fidelity evaluation is estimated from a few items per task (see
    :mod:`mergesearch.evaluation.estimators`): ``kind`` full (score every item), subset,
    anchors or irt; ``items`` per task; ``sources`` the models whose full-set answers
    calibrate anchors and irt (paths or zoo names, scored once when the evaluator is
    built); ``select`` which items irt scores; ``predict`` p-IRT (``pirt``) or the blend
    with the subset mean (``gpirt``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["full", "subset", "anchors", "irt"] = "full"
    items: int | float = Field(20, gt=0)  # per task: a count, or a share in (0, 1)
    seed: int = 0
    sources: list[str] = Field(default_factory=list)
    select: Literal["random", "anchors"] = "random"  # irt only
    predict: Literal["pirt", "gpirt"] = "gpirt"  # irt only
    dims: int = Field(1, gt=0, le=8)  # irt only

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        """``estimator: irt`` is ``estimator: {kind: irt}``."""
        return {"kind": data} if isinstance(data, str) else data

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, kind: Any) -> Any:
        if kind not in ("full", "subset", "anchors", "irt"):
            raise ValueError(f"unknown estimator {kind!r}; choose full, subset, anchors or irt")
        return kind

    @field_validator("items")
    @classmethod
    def _count_or_share(cls, items: int | float) -> int | float:
        if isinstance(items, float) and items.is_integer() and items >= 1:
            return int(items)
        if isinstance(items, float) and not 0 < items < 1:
            raise ValueError(f"items {items}: a whole number of items per task, or a share "
                             "in (0, 1)")
        return items

    def count(self, n: int) -> int:
        """Items of a task of ``n``: the count, or ``ceil(share * n)``."""
        if isinstance(self.items, float):
            return max(1, math.ceil(self.items * n - 1e-9))
        return self.items

    @model_validator(mode="after")
    def _check(self) -> EstimatorConfig:
        if self.kind in ("anchors", "irt") and len(self.sources) < 2:
            raise ValueError(f"estimator {self.kind} needs the answers of two or more "
                             "calibration models: list them in evaluator.estimator.sources "
                             "(e.g. the base and source models)")
        if self.kind not in ("anchors", "irt") and self.sources:
            raise ValueError(f"estimator {self.kind} takes no sources (only anchors and irt "
                             "are calibrated)")
        return self


class EvaluatorConfig(BaseModel):
    """A suite of lm-eval task YAMLs scored by our own loop over the resident model
    (``backend: hf``) or by a vLLM engine the candidate is merged into (``backend: vllm``);
    lm-eval tasks run by lm-eval itself on the in-memory model (``backend: lm_eval``); or a
    scoring function named by import path (``backend: python``, see
    :mod:`mergesearch.evaluation.python`). Also the objectives read from it, the metrics
    tracked beside them, and how much of it to use."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf", "vllm", "lm_eval", "python"] = "hf"
    suite: str | None = None  # hf, vllm: a folder of lm-eval task YAMLs; lm_eval: an include path
    function: str | None = None  # python: "package.module:function"
    split: str = "test"  # python: passed to the function
    options: dict[str, Any] = Field(default_factory=dict)  # python: keywords for the function
    tasks: list[str] | None = Field(None, min_length=1)  # None: every task of the suite
    objectives: list[ObjectiveConfig] = Field(min_length=1)
    limit: int | None = Field(None, gt=0)  # items per task: a subset_seed-seeded sample
    subset_seed: int = 0
    batch_size: int = Field(64, gt=0)
    estimator: EstimatorConfig | None = None  # None: every item, as kind full
    vllm: VLLMOptions | None = None  # backend vllm: engine and sampling settings
    lm_eval: LMEvalOptions | None = None  # backend lm_eval: tasks and pass-through arguments
    track: list[str] = Field(default_factory=list)  # metrics recorded and shown, not optimised

    @model_validator(mode="after")
    def _backend_fields(self) -> EvaluatorConfig:
        for name in ("vllm", "lm_eval"):
            if getattr(self, name) is not None and self.backend != name:
                raise ValueError(f"evaluator.{name} is only for backend: {name}, "
                                 f"not {self.backend}")
        if self.backend == "lm_eval":
            if self.lm_eval is None:
                raise ValueError("backend lm_eval needs lm_eval: {tasks: [...]} (task names, "
                                 "or task configs as mappings)")
            used = [k for k in ("function", "options") if getattr(self, k)]
            if used or self.split != "test":
                raise ValueError(f"{', '.join(used) or 'split'}: only for backend: python")
            if self.tasks is not None:
                raise ValueError("tasks: with backend lm_eval the tasks are lm_eval.tasks "
                                 "(objectives[].tasks pick among them)")
            if self.estimator is not None and self.estimator.kind != "full":
                raise ValueError("estimator: only for backend hf; with lm_eval score fewer "
                                 "items with limit or the fidelity")
        elif self.backend in ("hf", "vllm"):
            if self.suite is None:
                raise ValueError(f"backend {self.backend} needs a suite (a folder of lm-eval "
                                 "task YAMLs)")
            used = [k for k in ("function", "options") if getattr(self, k)]
            if used or self.split != "test":
                raise ValueError(f"{', '.join(used) or 'split'}: only for backend: python")
            if self.estimator is not None and self.estimator.kind != "full" and \
                    isinstance(self.estimator.items, int) and self.limit is not None and \
                    self.estimator.items > self.limit:
                raise ValueError(f"estimator.items {self.estimator.items} is more than the "
                                 f"{self.limit} items per task that limit keeps")
        else:
            if self.estimator is not None and self.estimator.kind != "full":
                raise ValueError("estimator: only for backend: hf (a python function picks "
                                 "its own items)")
            if not self.function or ":" not in self.function:
                raise ValueError("backend python needs function: 'package.module:function'")
            if self.suite is not None:
                raise ValueError("suite is only for backend: hf")
        return self

    @model_serializer(mode="wrap")
    def _dump_evaluator(self, handler: SerializerFunctionWrapHandler) -> dict:
        """The python backend's fields are left out of an hf evaluator's dump, so its
        studies fingerprint as they did before the backend existed."""
        data = handler(self)
        for key in ("estimator", "vllm", "lm_eval"):  # studies fingerprint as before them
            if data.get(key) is None:
                data.pop(key, None)
        if not data.get("track"):
            data.pop("track", None)
        if data.get("backend") != "python":
            for key in ("function", "split", "options"):
                data.pop(key, None)
        return data

    @field_validator("objectives")
    @classmethod
    def _unique_names(cls, objectives: list[ObjectiveConfig]) -> list[ObjectiveConfig]:
        dup = sorted(n for n, c in Counter(o.name for o in objectives).items() if c > 1)
        if dup:
            raise ValueError(f"duplicate objective names {dup}: give each objective its own name")
        return objectives
