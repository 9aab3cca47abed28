"""What every evaluator backend returns and raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mergesearch.errors import MergesearchError

if TYPE_CHECKING:
    from .config import EvaluatorConfig


class EvaluationError(MergesearchError, ValueError):
    """A problem the user can fix (suite, task file, data, objective); the message says how."""


@dataclass
class Evaluation:
    """The scores of one model: objectives, every metric per task, per-item correctness.

    ``indices[task]`` says which documents were scored (0-based positions in the task's
    data file), in the order of ``correct[task]``; ``outputs[task]`` holds the generations
    (cut at the stop strings, before filters) of tasks that ran generation;
    ``item_scores[task][metric]`` the per-item values of each metric, in the order of
    ``correct[task]``; ``estimate`` what an estimator did (its kind, items per task, the
    observed and predicted means), empty without one.
    """

    values: dict[str, float]
    scores: dict[str, dict[str, float]]
    correct: dict[str, list[bool]]
    n_items: dict[str, int]
    indices: dict[str, list[int]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    item_scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)


class Evaluator(Protocol):
    """Scores a resident model many times; loads its data once."""

    objective_names: list[str]
    directions: dict[str, str]

    def evaluate(self, model: Any, *, fidelity: float = 1.0, seed: int = 0) -> Evaluation: ...


def make_evaluator(config: EvaluatorConfig, tokenizer: Any, *,
                   base_dir: str | Path | None = None, **options: Any) -> Evaluator:
    """The evaluator of ``config.backend`` (imported lazily: backends are heavy)."""
    if config.backend == "hf":
        from .hf import HFEvaluator

        return HFEvaluator(config, tokenizer, base_dir=base_dir, **options)
    if config.backend == "vllm":
        from .vllm_backend import VLLMEvaluator

        return VLLMEvaluator(config, tokenizer, base_dir=base_dir, **options)
    if config.backend == "lm_eval":
        from .lm_eval_backend import LMEvalEvaluator

        return LMEvalEvaluator(config, tokenizer, base_dir=base_dir, **options)
    raise EvaluationError(f"evaluator backend {config.backend!r} is not available; use 'hf'")
