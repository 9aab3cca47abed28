"""What an experiment says to the vLLM backend (``evaluator.backend: vllm``): engine and
generation settings. Light: imported by :mod:`mergesearch.evaluation.config`, never vllm."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Engine keywords the backend sets itself (the reason is in the error).
ENGINE_OWN = {
    "model": "set evaluator.vllm.model instead",
    "tokenizer": "the engine is fed token ids by our tokenizer (models.base's)",
    "skip_tokenizer_init": "the engine is fed token ids by our tokenizer",
    "worker_extension_cls": "the backend's own extension merges the candidates",
    "dtype": "set execution.dtype instead (the merge and the engine share it)",
}
#: Sampling keywords the backend sets itself.
SAMPLING_OWN = {
    "n": "one generation per item is scored",
    "prompt_logprobs": "the backend asks for them where a metric needs them",
    "logprobs": "the backend reads generated token ids, not their log-probabilities",
    "detokenize": "generations are decoded by our tokenizer",
    "stop": "the task YAML's generation_kwargs.until cuts each generation",
}


class VLLMOptions(BaseModel):
    """``evaluator.vllm``: keywords for the engine (``vllm.LLM``) and for its sampling
    (``vllm.SamplingParams``, over the task YAML's ``generation_kwargs``), and the
    checkpoint folder the engine is built from (``model``; default: the first model of
    the search's start recipe). Every recipe must merge to that model's architecture."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    engine: dict[str, Any] = Field(default_factory=dict)  # extra keywords for vllm.LLM
    sampling: dict[str, Any] = Field(default_factory=dict)  # extra keywords for SamplingParams

    @field_validator("engine")
    @classmethod
    def _engine_keys(cls, engine: dict[str, Any]) -> dict[str, Any]:
        return _refuse(engine, ENGINE_OWN, "engine")

    @field_validator("sampling")
    @classmethod
    def _sampling_keys(cls, sampling: dict[str, Any]) -> dict[str, Any]:
        return _refuse(sampling, SAMPLING_OWN, "sampling")


def _refuse(given: dict[str, Any], own: dict[str, str], where: str) -> dict[str, Any]:
    taken = sorted(set(given) & set(own))
    if taken:
        raise ValueError("; ".join(f"evaluator.vllm.{where}.{k}: set by the backend ({own[k]})"
                                   for k in taken))
    return given
