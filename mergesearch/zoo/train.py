"""Model construction and the small training loop used to build the zoo."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from .scoring import encode_items
from .skills import Item


def make_model(
    vocab_size: int,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama (untied embeddings, float32)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype="float32",
    )
    return LlamaForCausalLM(config)


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    sample: Callable[[random.Random], Item],
    rng: random.Random,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    warmup: float = 0.1,
    on_step: Callable[[int, float], None] | None = None,
    trainable: Callable[[str], bool] | None = None,
) -> None:
    """AdamW with linear warm-up and cosine decay; loss on answer tokens + eos only.

    ``sample(rng)`` draws one training item; ``on_step(step, loss)`` reports progress;
    ``trainable(name)`` picks the parameters that learn (default: all), the others stay
    exactly as they are.
    """
    params = [p for n, p in model.named_parameters() if trainable is None or trainable(n)]
    if not params:
        raise ValueError("train: no parameter is trainable")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    n_warm = max(1, int(warmup * steps))

    def lr_at(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    device = next(model.parameters()).device
    model.train()
    for step in range(steps):
        batch = encode_items(tokenizer, [sample(rng) for _ in range(batch_size)])
        ids, attn, target = (t.to(device) for t in batch)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[target], ids[:, 1:][target])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
