"""What an experiment says about evaluation: the suite, its objectives, the subset."""

from __future__ import annotations

from collections import Counter
from typing import Literal

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


class EvaluatorConfig(BaseModel):
    """A suite of lm-eval task YAMLs, the objectives read from it and how much of it to use."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf"] = "hf"
    suite: str
    tasks: list[str] | None = Field(None, min_length=1)  # None: every task of the suite
    objectives: list[ObjectiveConfig] = Field(min_length=1)
    limit: int | None = Field(None, gt=0)  # items per task: a subset_seed-seeded sample
    subset_seed: int = 0
    batch_size: int = Field(64, gt=0)

    @field_validator("objectives")
    @classmethod
    def _unique_names(cls, objectives: list[ObjectiveConfig]) -> list[ObjectiveConfig]:
        dup = sorted(n for n, c in Counter(o.name for o in objectives).items() if c > 1)
        if dup:
            raise ValueError(f"duplicate objective names {dup}: give each objective its own name")
        return objectives
