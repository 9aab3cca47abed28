"""What an experiment says to the vLLM backend (``evaluator.backend: vllm``): engine and
generation settings. Light: imported by :mod:`mergesearch.evaluation.config`, never vllm."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class VLLMOptions(BaseModel):
    """``evaluator.vllm``: keywords for the engine and for its sampling."""

    model_config = ConfigDict(extra="forbid")

    engine: dict[str, Any] = Field(default_factory=dict)  # extra keywords for vllm.LLM
    sampling: dict[str, Any] = Field(default_factory=dict)  # extra keywords for SamplingParams
