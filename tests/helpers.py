"""Helpers shared by tests: tiny random checkpoints, read back without mergesearch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

VOCAB = 40
ROOT = Path(__file__).resolve().parent.parent


def load_script(relative: str, name: str, monkeypatch=None) -> ModuleType:
    """A script of the repository (``benchmarks/strategies.py``, ...) as a module. With
    ``monkeypatch`` it is also put in ``sys.modules`` for the test (dataclasses defined in
    it look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


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


def completed_count(db) -> int:
    """COMPLETE trials in an Optuna SQLite file, read with sqlite3 (safe while another
    process is still creating the study)."""
    import sqlite3
    from pathlib import Path

    if not Path(db).exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def zoo_experiment(tmp_path, **changes):
    """A small, fast search over the zoo (16 items per skill, objectives ``rev`` and
    ``mean``); ``changes`` replace top-level fields, ``a__b=`` nested ones."""
    from mergesearch.experiment import Experiment

    data = {
        "name": "t",
        "models": {"base": "zoo:base",
                   "sources": {s: f"zoo:{s}" for s in ("rev", "srt", "dup", "evn")}},
        "space": "search_spaces/task_arithmetic.yaml",
        "strategy": {"name": "random"},
        "evaluator": {"suite": "evaluators/zoo", "limit": 16, "batch_size": 64,
                      "objectives": [
                          {"name": "rev", "tasks": ["zoo_rev"], "metric": "char_accuracy"},
                          {"name": "mean", "metric": "char_accuracy"}]},
        "budget": {"evaluations": 6},
        "output": str(tmp_path / "run"),
        "seed": 0,
    }
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return Experiment.from_dict(data)


def live_tensor_bytes() -> int:
    """Bytes of every storage a live tensor uses, each storage once (tensors without real
    storage, e.g. the fake tensors torch.compile leaves behind, are skipped)."""
    import gc

    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta \
                and not isinstance(obj, FakeTensor):
            try:
                s = obj.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            except (RuntimeError, NotImplementedError):
                continue
    return sum(storages.values())


def kill_mid_run(path, db, after: int, *extra: str, env: dict | None = None) -> None:
    """Run ``mergesearch run path -q *extra`` in a subprocess and SIGKILL it as soon as
    ``after`` trials are stored in the SQLite file ``db`` (the controller is killed
    mid-run, nothing flushed)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(
        [str(root / "tests"), os.environ.get("PYTHONPATH", "")])} | (env or {})
    proc = subprocess.Popen([sys.executable, "-m", "mergesearch.cli", "run", str(path), "-q",
                             *extra], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while completed_count(db) < after:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
