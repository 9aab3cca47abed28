"""Evaluator backends: score a merged model on a suite of lm-eval task YAMLs (``hf``, or
``vllm`` with the candidate merged inside the engine), with lm-eval itself (``lm_eval``),
or with a scoring function named by import path (``python``).

>>> from mergesearch.evaluation import EvaluatorConfig, ObjectiveConfig, make_evaluator
>>> cfg = EvaluatorConfig(suite="evaluators/zoo",
...                       objectives=[ObjectiveConfig(name="skill", metric="char_accuracy")])
>>> evaluator = make_evaluator(cfg, tokenizer)      # reads and tokenises the suite once
>>> evaluator.evaluate(model).values                # then this, once per candidate
"""

from pathlib import Path
from typing import Any

from .base import Evaluation, EvaluationError, Evaluator
from .base import make_evaluator as _make_suite_evaluator
from .config import EvaluatorConfig, ObjectiveConfig
from .tasks import FILTERS, METRICS, TaskSpec, load_suite


def make_evaluator(config: EvaluatorConfig, tokenizer: Any = None, *,
                   base_dir: str | Path | None = None, **options: Any) -> Evaluator:
    """The evaluator of ``config.backend``: ``hf``, ``vllm`` and ``lm_eval`` need the
    tokenizer, ``python`` (:class:`~mergesearch.evaluation.python.PythonEvaluator`) takes
    none."""
    if config.backend == "python":
        from .python import PythonEvaluator

        if options:
            raise EvaluationError(f"the python evaluator takes no options {sorted(options)}; "
                                  "give the function's keywords in evaluator.options")
        return PythonEvaluator(config)
    if tokenizer is None:
        raise EvaluationError(f"evaluator backend {config.backend!r} needs a tokenizer")
    return _make_suite_evaluator(config, tokenizer, base_dir=base_dir, **options)


def __getattr__(name: str):
    if name == "HFEvaluator":  # imported on first use: it brings torch and transformers
        from .hf import HFEvaluator

        return HFEvaluator
    if name in ("PythonEvaluator", "Scores"):
        from . import python

        return getattr(python, name)
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
    "PythonEvaluator",
    "Scores",
    "TaskSpec",
    "load_suite",
    "make_evaluator",
]
