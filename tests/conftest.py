"""Shared fixtures: tiny random-weight checkpoints built once per test session."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import VOCAB, perturbed, save, tiny_config
from transformers import LlamaForCausalLM


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


@pytest.fixture(scope="session")
def zoo():
    """The built-in model zoo (built once and cached; minutes on first use)."""
    from mergesearch.zoo import build_zoo

    return build_zoo(progress=False)


@pytest.fixture(scope="session")
def hard_zoo():
    """The hard zoo (built once and cached; ~4 minutes on first use)."""
    from mergesearch.zoo.hard import build_hard_zoo

    return build_hard_zoo(progress=False)


@pytest.fixture(scope="session")
def ray_cluster():
    """One private local Ray cluster for the whole session (start-up costs seconds).

    Actor processes can import modules from tests/ (test-only worker classes).
    """
    import os
    import tempfile
    from pathlib import Path

    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    tests = str(Path(__file__).resolve().parent)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray needs short socket paths
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             configure_logging=False,
             runtime_env={"env_vars": {
                 "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
                 "MERGESEARCH_COMPILE": "0",  # compiling in every fresh actor costs seconds
             }})
    yield ray
    ray.shutdown()
