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


def encode_items(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[Mapping[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and a mask of target positions.

    The target mask marks positions whose *next* token is an answer token or the eos.
    """
    prompts = tokenizer([it["prompt"] for it in items])["input_ids"]
    answers = tokenizer([it["answer"] for it in items], add_special_tokens=False)["input_ids"]
    seqs = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers, strict=True)]
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    target = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        target[i, len(p) - 1 : len(s) - 1] = True
    return ids, attn, target


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
    """
    if not items:
        raise ValueError("score_skill needs at least one item")
    if tokenizer.eos_token_id is None:
        raise ValueError("score_skill needs a tokenizer with an eos token (the answer's end)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct: list[bool] = []
    char_acc: list[float] = []
    logprob: list[float] = []
    try:
        for start in range(0, len(items), batch_size):
            ids, attn, target = encode_items(tokenizer, items[start : start + batch_size])
            ids, attn, target = ids.to(device), attn.to(device), target.to(device)
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            nxt = ids[:, 1:]
            hit = (logits.argmax(-1) == nxt) & target
            lp = torch.log_softmax(logits, -1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            n_target = target.sum(1)
            correct += (hit.sum(1) == n_target).tolist()
            char_acc += (hit.sum(1) / n_target).tolist()
            logprob += ((lp * target).sum(1) / n_target).tolist()
    finally:
        model.train(was_training)
    n = len(items)
    return {
        "exact_match": sum(correct) / n,
        "char_accuracy": sum(char_acc) / n,
        "answer_logprob": sum(logprob) / n,
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
