"""lm-eval's side of mergesearch's generate_until metrics: ``TokenScoredTask``.

This file is copied, unchanged, as ``utils.py`` next to the zoo task YAMLs
(``evaluators/zoo``, ``evaluators/zoo_report``, ``evaluators/hard/{search,report}``),
which name it with ``class: !function utils.TokenScoredTask``; it imports only lm-eval
and the standard library, so ``lm_eval --include_path evaluators/zoo`` works without
mergesearch installed, from any directory.

Our hf evaluator scores a ``generate_until`` item by one teacher-forced pass over
``context + target + <eos>`` and reports, besides lm-eval's ``exact_match`` on the greedy
generation:

- ``char_accuracy``: the share of those target tokens that are the argmax prediction;
- ``answer_logprob``: their summed log-probability divided by their number;
- ``greedy_match``: 1 when every one of them is the argmax, else 0.

A stock lm-eval ``loglikelihood`` request only returns the summed log-probability and
whether *all* tokens are greedy, so this task asks one single-piece ``loglikelihood``
request per target position: context ``prompt + target[:k]``, continuation
``target[k]``, and a last one with continuation ``end_of_answer`` (``metadata``,
default ``<eos>``, the tokenizer's eos token as text). Each answer's ``is_greedy`` is
then whether that one token is the argmax, and their log-probabilities sum to the
target's (causal attention: position ``j`` sees only tokens ``<= j``). With a
character-level tokenizer (the zoo's) a piece is exactly one token, so the three metrics
equal ours item by item; with a sub-word tokenizer they would be per-character figures.
The generation request (``exact_match``, lm-eval's own code) is kept as request 0.

Relative ``dataset_kwargs.data_files`` resolve against the folder of this file (the
task YAMLs' folder), each parent of it, then the current directory: the rule our own
YAML reader follows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

#: Our metrics, with lm-eval's names: the same names as the hf backend's.
TOKEN_METRICS = ("char_accuracy", "answer_logprob", "greedy_match")
_HERE = Path(__file__).resolve().parent


class TokenScoredTask(ConfigurableTask):
    """A ``generate_until`` task that also scores every target token (see the module)."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        config = dict(config or {})
        config.pop("class", None)
        if config.get("output_type", "generate_until") != "generate_until":
            raise ValueError(f"task {config.get('task')!r}: TokenScoredTask is for "
                             "output_type generate_until")
        ours, theirs = [], []
        for entry in config.get("metric_list") or []:
            (ours if entry.get("metric") in TOKEN_METRICS else theirs).append(entry)
        if theirs:
            config["metric_list"] = theirs
        else:  # our metrics only: no exact_match, so no generation
            config.pop("metric_list", None)
        config["dataset_kwargs"] = _resolved(config.get("dataset_kwargs"))
        self._token_metrics = [e["metric"] for e in ours]
        self._generates = bool(theirs)
        super().__init__(config=config, **kwargs)
        if not self._generates:
            self._metric_fn_list, self._metric_fn_kwargs = {}, {}
            self._aggregation_list, self._higher_is_better = {}, {}
        for name in self._token_metrics:
            self._aggregation_list[name] = mean
            self._higher_is_better[name] = True

    @property
    def end_of_answer(self) -> str:
        return (self.config.metadata or {}).get("end_of_answer", "<eos>")

    def pieces(self, doc: dict[str, Any]) -> list[str]:
        """The target as scored pieces: one per character (delimiter first), then the end."""
        target = f"{self.config.target_delimiter}{self.doc_to_target(doc)}"
        return [*target, self.end_of_answer]

    def construct_requests(self, doc: dict, ctx: Any, **kwargs: Any) -> list[Instance]:
        requests = []
        if self._generates:
            generation = super().construct_requests(doc, ctx, **kwargs)
            requests.append(generation)
        kwargs.pop("apply_chat_template", None)
        kwargs.pop("chat_template", None)
        if self._token_metrics:
            pieces, context = self.pieces(doc), ctx
            for piece in pieces:
                requests.append(Instance(request_type="loglikelihood", doc=doc,
                                         arguments=(context, piece), idx=len(requests),
                                         **kwargs))
                context += piece
        return requests

    def apply_filters(self) -> None:
        """The task's filters see the generations only; token answers pass unchanged."""
        generations = [i for i in self._instances if i.request_type != "loglikelihood"]
        if generations and hasattr(self, "_filters"):
            for f in self._filters:
                f.apply(generations)
        names = [f.name for f in getattr(self, "_filters", [])] or ["none"]
        for inst in self._instances:
            if inst.request_type == "loglikelihood":
                for name in names:
                    inst.filtered_resps[name] = inst.resps[0]

    def process_results(self, doc: dict, results: list[Any]) -> dict[str, float]:
        out = super().process_results(doc, results[:1]) if self._generates else {}
        if self._token_metrics:
            answers = results[1:] if self._generates else results
            n = len(answers)
            hits = sum(bool(greedy) for _, greedy in answers)
            logprob = math.fsum(float(ll) for ll, _ in answers)
            values = {"char_accuracy": hits / n, "answer_logprob": logprob / n,
                      "greedy_match": float(hits == n)}
            out |= {m: values[m] for m in self._token_metrics}
        return out


def _resolved(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """``dataset_kwargs`` with relative data files made absolute (see the module)."""
    if not kwargs or "data_files" not in kwargs:
        return kwargs
    files = kwargs["data_files"]
    if isinstance(files, dict):
        files = {split: _resolved_list(f) for split, f in files.items()}
    else:
        files = _resolved_list(files)
    return {**kwargs, "data_files": files}


def _resolved_list(files: str | list[str]) -> str | list[str]:
    if isinstance(files, list):
        return [_resolved_file(f) for f in files]
    return _resolved_file(files)


def _resolved_file(name: str) -> str:
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path)
    for base in (_HERE, *_HERE.parents, Path.cwd()):
        if (base / path).is_file():
            return str(base / path)
    raise FileNotFoundError(f"data file {name!r} not found next to {_HERE}, in its parent "
                            f"folders or in the current directory {Path.cwd()}")
