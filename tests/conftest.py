"""Shared fixtures: tiny random-weight checkpoints built once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


@dataclass
class TinyModels:
    base: str
    sources: list[str]
    tied_base: str
    tied_sources: list[str]
    big_vocab: str
    wide: str
    deep: str
    pickle_only: str


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    sources = [save(perturbed(base, s), root / f"src{s}") for s in (1, 2, 3)]
    torch.manual_seed(1)
    tied = LlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    tied_sources = [save(perturbed(tied, s), root / f"tied_src{s}") for s in (1, 2)]
    torch.manual_seed(2)
    big = LlamaForCausalLM(tiny_config(vocab_size=VOCAB + 4))
    with torch.no_grad():  # same weights as base, 4 extra vocabulary rows
        for name, p in big.named_parameters():
            q = base.state_dict()[name]
            p[: q.shape[0]].copy_(q) if p.shape != q.shape else p.copy_(q)
    torch.manual_seed(3)
    return TinyModels(
        base=save(base, root / "base"),
        sources=sources,
        tied_base=save(tied, root / "tied_base"),
        tied_sources=tied_sources,
        big_vocab=save(big, root / "big_vocab"),
        wide=save(LlamaForCausalLM(tiny_config(hidden_size=96, num_attention_heads=3,
                                               num_key_value_heads=3)), root / "wide"),
        deep=save(LlamaForCausalLM(tiny_config(num_hidden_layers=5)), root / "deep"),
        pickle_only=save(perturbed(base, 4), root / "pickle_only", safe=False),
    )


def state(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a saved checkpoint, read independently of mergesearch."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.fixture(scope="session")
def zoo():
    """The built-in model zoo (built once and cached; minutes on first use)."""
    from mergesearch.zoo import build_zoo

    return build_zoo(progress=False)
