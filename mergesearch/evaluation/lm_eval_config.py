"""What an experiment says to the lm-eval backend (``evaluator.backend: lm_eval``).
Light: imported by :mod:`mergesearch.evaluation.config`, never lm_eval."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LMEvalOptions(BaseModel):
    """``evaluator.lm_eval``: the tasks and the arguments passed through to lm-eval."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str | dict[str, Any]] = Field(min_length=1)  # names, or task configs as dicts
