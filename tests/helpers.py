"""Helpers shared by tests: tiny random checkpoints, read back without mergesearch."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

VOCAB = 40


def tiny_config(**overrides) -> LlamaConfig:
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
               num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False)
    return LlamaConfig(**(cfg | overrides))


def tiny_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    chars = [chr(ord("a") + i) for i in range(vocab - 2)]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>", "<pad>", *chars])},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def save(model: torch.nn.Module, path: Path, *, safe: bool = True) -> str:
    model.save_pretrained(path)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    if not safe:  # a legacy pickle checkpoint
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return str(path)


def perturbed(base: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A 'fine-tune' of ``base``: every parameter moved by seeded Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def state(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a saved checkpoint, read independently of mergesearch."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))
