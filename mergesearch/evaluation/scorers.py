"""Batched scoring of token continuations with a causal LM: pure functions on tensors.

:func:`score_rows` is one teacher-forced forward pass over right-padded ``context +
continuation`` rows. Per row it counts the continuation tokens that are the argmax
prediction and sums their log-probabilities: enough for char accuracy, mean answer
log-probability, "greedy match" (every target token is the argmax, which is exactly
greedy decoding's exact match when the continuation ends with ``<eos>``) and
lm-eval's multiple-choice loglikelihoods. :func:`greedy_generate` is real decoding.

Custom scorers (:func:`load_scorer`, :func:`custom_scores`): a task YAML's ``metric_list``
entry ``{metric: <name>, scorer: "package.module:function"}`` scores each generation with
``function(prediction, target, doc) -> float`` (a bool counts as 0 or 1): ``prediction``
is the generated text cut at the task's stop strings (before filters), ``target`` the
rendered target and ``doc`` the item's document. Every backend that generates (hf,
vllm) calls it the same way; a scorer that raises fails the candidate's trial with its
message.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from transformers import StoppingCriteriaList


@dataclass
class RowStats:
    """Per-row results of :func:`score_rows` (tensors on the model's device)."""

    n_target: torch.Tensor  # continuation tokens per row (long)
    n_hit: torch.Tensor  # of those, how many are the argmax prediction (long)
    logprob: torch.Tensor  # summed log-probability of the continuation (float32)
    finite: torch.Tensor  # every logit at the continuation's positions is finite (bool)

    @staticmethod
    def cat(parts: Sequence[RowStats]) -> RowStats:
        return RowStats(*(torch.cat([getattr(p, f) for p in parts]) for f in
                          ("n_target", "n_hit", "logprob", "finite")))


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[n, max_len]`` ids and the length of each row."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


def pad_left(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[n, max_len]`` ids and their attention mask (for generation)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[i, width - len(s):] = 1
    return ids, attn


def target_mask(starts: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[n, width - 1]``: True where the *next* token belongs to the continuation.

    ``starts[i]`` is the context length minus one (the position predicting the first
    continuation token); ``lengths[i]`` is the row's unpadded length.
    """
    pos = torch.arange(width - 1, device=starts.device)
    return (pos >= starts[:, None]) & (pos < lengths[:, None] - 1)


@cache
def _keeps_logits(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


@torch.no_grad()
def score_rows(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor,
               starts: torch.Tensor) -> RowStats:
    """One forward pass over right-padded rows; see :func:`target_mask` for the arguments.

    Only positions from the earliest continuation on go through the LM head
    (``logits_to_keep``, where the model supports it): with long prompts and a large
    vocabulary that is most of the head's cost.
    """
    width = ids.shape[1]
    attn = (torch.arange(width, device=ids.device) < lengths[:, None]).long()
    lo = int(starts.min())
    keep = {"logits_to_keep": width - lo} if _keeps_logits(type(model)) else {}
    logits = model(input_ids=ids, attention_mask=attn, **keep).logits
    logits = logits[:, logits.shape[1] - (width - lo): -1].float()  # positions lo .. width-2
    target = target_mask(starts, lengths, width)[:, lo:]
    nxt = ids[:, lo + 1:]
    hit = (logits.argmax(-1) == nxt) & target
    lp = torch.log_softmax(logits, -1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    finite = (torch.isfinite(logits).all(-1) | ~target).all(1)
    return RowStats(target.sum(1), hit.sum(1), torch.where(target, lp, 0.0).sum(1), finite)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_token_id: int | None, pad_token_id: int,
                    stopping: StoppingCriteriaList | None = None) -> list[list[int]]:
    """Greedy continuations of tokenised ``prompts`` (one left-padded batch), cut at eos."""
    device = next(model.parameters()).device
    ids, attn = pad_left(prompts, pad_token_id)
    out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         stopping_criteria=stopping)
    new = out[:, ids.shape[1]:].tolist()
    return [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in new]


Scorer = Callable[[str, str, Mapping], "float | bool"]


def load_scorer(path: str, task: str, metric: str) -> Scorer:
    """The custom scorer ``"package.module:function"`` of ``task``'s ``metric``, imported."""
    from mergesearch.models.checkpoint import ModelLoadError
    from mergesearch.models.generic import import_function

    from .base import EvaluationError

    try:
        return import_function(path, f"task {task!r}, metric {metric!r}: scorer")
    except ModelLoadError as err:
        raise EvaluationError(str(err)) from None


def custom_scores(scorer: Scorer, path: str, metric: str, task: str,
                  texts: Sequence[str], targets: Sequence[str], docs: Sequence[Mapping],
                  ids: Sequence[int]) -> list[float]:
    """``scorer`` on every generation: one float per item. A scorer that raises, or returns
    something that is not a finite number, raises EvaluationError naming the item
    (``ids``: document positions) and the scorer's own message."""
    from .base import EvaluationError

    out = []
    for text, target, doc, i in zip(texts, targets, docs, ids, strict=True):
        try:
            value = scorer(text, target, doc)
        except Exception as err:
            raise EvaluationError(f"custom scorer {path!r} (task {task!r}, metric {metric!r}) "
                                  f"raised on item {i}: {type(err).__name__}: {err}") from err
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EvaluationError(f"custom scorer {path!r} (task {task!r}, metric {metric!r}) "
                                  f"returned {value!r} on item {i}, not a finite number")
        out.append(float(value))
    return out
