"""Fixtures for the evaluator tests: the zoo tokenizer, a random tiny LM, task writers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import tiny_config
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mergesearch.zoo import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ZOO_SUITE = ROOT / "evaluators" / "zoo"
WriteTask = Callable[..., Path]


def zoo_docs(skill: str) -> list[dict[str, str]]:
    """The committed evaluation items of a zoo skill, in file order."""
    lines = (ZOO_SUITE / f"{skill}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@torch.no_grad()
def loglikelihood(model: torch.nn.Module, tok: PreTrainedTokenizerFast, context: str,
                  continuation: str) -> float:
    """Independent reference: one unpadded sequence, full logits, summed log-probability."""
    ctx = tok(context)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    return sum(float(logits[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture
def lm(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A fresh random tiny Llama over the zoo's vocabulary (seconds-fast, eval mode)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(vocab_size=len(tok), num_hidden_layers=2)).eval()


@pytest.fixture
def write_task(tmp_path: Path) -> WriteTask:
    """``write_task(name, docs, **yaml_fields)`` writes ``<name>.jsonl`` + ``<name>.yaml``."""

    def write(name: str, docs: list[dict[str, Any]], folder: Path = tmp_path,
              **fields: Any) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        spec = {"task": name, "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": f"{name}.jsonl"}},
                "test_split": "test", "output_type": "generate_until",
                "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                "target_delimiter": "", "generation_kwargs": {"until": ["<eos>"],
                                                              "max_gen_toks": 12}} | fields
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return write
