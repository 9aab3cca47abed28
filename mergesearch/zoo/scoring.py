"""Fast scoring of a causal LM on zoo items: exact match plus smooth metrics.

One teacher-forced forward pass over ``prompt + answer + <eos>`` gives everything:

* ``exact_match``: every answer token *and* the final ``<eos>`` is the argmax
  prediction. This equals greedy decoding's exact match (greedy generation
  reproduces the answer and stops iff each next token is the argmax given the
  correct prefix), at the cost of a single forward pass instead of a decode loop.
* ``char_accuracy``: fraction of those target tokens that are the argmax
  (averaged per item). Smooth: partial credit for nearly-right answers, which is
  what a search over merges of tiny models needs to see progress.
* ``answer_logprob``: mean log-probability per target token (averaged per item).

Char accuracy counts the ``<eos>`` and letters right by chance, so a model that
only knows the answer format already scores about 0.5 on the zoo skills.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergesearch.evaluation.scorers import RowStats, pad_right, score_rows, target_mask


def _rows(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[Mapping[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + answer + <eos>`` ids, row lengths and prompt lengths - 1."""
    prompts = tokenizer([it["prompt"] for it in items])["input_ids"]
    answers = tokenizer([it["answer"] for it in items], add_special_tokens=False)["input_ids"]
    seqs = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, lengths = pad_right(seqs, pad)
    return ids, lengths, torch.tensor([len(p) - 1 for p in prompts])


def encode_items(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[Mapping[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and a mask of target positions.

    The target mask marks positions whose *next* token is an answer token or the eos.
    """
    ids, lengths, starts = _rows(tokenizer, items)
    attn = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    return ids, attn, target_mask(starts, lengths, ids.shape[1])


@torch.no_grad()
def score_skill(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, str]],
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Score ``model`` on ``items`` (``{"prompt", "answer"}`` mappings).

    Returns ``exact_match``, ``char_accuracy``, ``answer_logprob`` (floats, means over
    items), ``n`` and ``correct`` (per-item exact-match list of bools, in item order).
    A thin wrapper over :func:`mergesearch.evaluation.scorers.score_rows`, the scorer of
    the evaluation backends.
    """
    if not items:
        raise ValueError("score_skill needs at least one item")
    if tokenizer.eos_token_id is None:
        raise ValueError("score_skill needs a tokenizer with an eos token (the answer's end)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(items), batch_size):
            batch = _rows(tokenizer, items[start : start + batch_size])
            parts.append(score_rows(model, *(t.to(device) for t in batch)))
    finally:
        model.train(was_training)
    stats = RowStats.cat(parts)
    correct = (stats.n_hit == stats.n_target).tolist()
    n = len(items)
    return {
        "exact_match": sum(correct) / n,
        "char_accuracy": sum((stats.n_hit / stats.n_target).tolist()) / n,
        "answer_logprob": sum((stats.logprob / stats.n_target).tolist()) / n,
        "n": n,
        "correct": correct,
    }


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers to ``prompts`` (text up to ``<eos>``), for demos and cross-checks."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    out = model.generate(
        **batch.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
