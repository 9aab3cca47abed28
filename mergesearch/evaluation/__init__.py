"""Evaluator backends: score a merged model on a suite of lm-eval task YAMLs.

>>> from mergesearch.evaluation import EvaluatorConfig, ObjectiveConfig, make_evaluator
>>> cfg = EvaluatorConfig(suite="evaluators/zoo",
...                       objectives=[ObjectiveConfig(name="skill", metric="char_accuracy")])
>>> evaluator = make_evaluator(cfg, tokenizer)      # reads and tokenises the suite once
>>> evaluator.evaluate(model).values                # then this, once per candidate
"""

from .base import Evaluation, EvaluationError, Evaluator, make_evaluator
from .config import EvaluatorConfig, ObjectiveConfig
from .tasks import FILTERS, METRICS, TaskSpec, load_suite


def __getattr__(name: str):
    if name == "HFEvaluator":  # imported on first use: it brings torch and transformers
        from .hf import HFEvaluator

        return HFEvaluator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FILTERS",
    "METRICS",
    "Evaluation",
    "EvaluationError",
    "Evaluator",
    "EvaluatorConfig",
    "HFEvaluator",
    "ObjectiveConfig",
    "TaskSpec",
    "load_suite",
    "make_evaluator",
]
