"""Generation pooled across tasks (HFEvaluator.pool_generation): the same answers as one
set of batches per task, in fewer ``generate`` calls; only tasks whose generation settings
agree share batches."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import mergesearch.evaluation.hf as hf
from mergesearch.evaluation import Evaluation, EvaluatorConfig, HFEvaluator, ObjectiveConfig

from .conftest import ZOO_SUITE, WriteTask, zoo_docs


def _both(ev: HFEvaluator, model: torch.nn.Module, **kw) -> tuple[Evaluation, Evaluation]:
    """``model`` scored with generation pooled, then per task."""
    ev.pool_generation = True
    pooled = ev.evaluate(model, **kw)
    ev.pool_generation = False
    per_task = ev.evaluate(model, **kw)
    ev.pool_generation = True
    return pooled, per_task


def _assert_same(a: Evaluation, b: Evaluation) -> None:
    assert a.outputs == b.outputs
    assert a.correct == b.correct
    assert a.values == b.values
    assert a.scores == b.scores
    assert a.item_scores == b.item_scores
    assert a.indices == b.indices


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every greedy_generate call the evaluator makes."""
    seen: list[int] = []
    real = hf.greedy_generate

    def counting(model, prompts, **kw):
        seen.append(len(prompts))
        return real(model, prompts, **kw)

    monkeypatch.setattr(hf, "greedy_generate", counting)
    return seen


def _mixed_suite(write_task: WriteTask, folder: Path) -> list[str]:
    """Five generation tasks over zoo prompts: three with the same settings, one with an
    extra stop string, one with fewer new tokens."""
    rng = random.Random(0)
    docs = {s: rng.sample(zoo_docs(s), 30) for s in ("rev", "srt", "dup", "evn")}
    same = {"until": ["<eos>"], "max_gen_toks": 12}
    write_task("a", docs["rev"], folder, generation_kwargs=same)
    write_task("b", docs["srt"], folder, generation_kwargs=same)
    write_task("c", docs["dup"][:7], folder, generation_kwargs=same)
    write_task("stop", docs["evn"], folder,
               generation_kwargs={"until": ["<eos>", "a"], "max_gen_toks": 12})
    write_task("short", docs["dup"], folder,
               generation_kwargs={"until": ["<eos>"], "max_gen_toks": 3})
    return ["a", "b", "c", "short", "stop"]


def test_pools_group_tasks_by_their_generation_settings(
        tok: PreTrainedTokenizerFast, write_task: WriteTask, tmp_path: Path) -> None:
    names = _mixed_suite(write_task, tmp_path)
    cfg = EvaluatorConfig(suite=str(tmp_path), objectives=[
        ObjectiveConfig(name="em", metric="exact_match")])
    ev = HFEvaluator(cfg, tok)
    assert ev._generation_pools(None, names) == [["a", "b", "c"], ["short"], ["stop"]]
    ev.pool_generation = False
    assert ev._generation_pools(None, names) == [[n] for n in names]


def test_pooled_equals_per_task_on_mixed_settings(
        tok: PreTrainedTokenizerFast, lm: LlamaForCausalLM, write_task: WriteTask,
        tmp_path: Path, calls: list[int]) -> None:
    _mixed_suite(write_task, tmp_path)
    cfg = EvaluatorConfig(suite=str(tmp_path), batch_size=40, objectives=[
        ObjectiveConfig(name="em", metric="exact_match")])
    ev = HFEvaluator(cfg, tok)
    pooled, per_task = _both(ev, lm)
    _assert_same(pooled, per_task)
    # a+b+c: 67 prompts in batches of 40; short and stop: 30 each, on their own
    assert calls == [40, 27, 30, 30] + [30, 30, 7, 30, 30]
    assert max(map(len, pooled.outputs["short"])) <= 3  # its own max_gen_toks was kept
    assert not any("a" in t for t in pooled.outputs["stop"])  # and its own stop string
    # a random model writes long answers: pooled with "stop", "a" would be cut too
    assert any("a" in t for t in pooled.outputs["a"] + pooled.outputs["b"])


def test_pooled_equals_per_task_on_subsets_and_nan(
        tok: PreTrainedTokenizerFast, lm: LlamaForCausalLM, calls: list[int]) -> None:
    cfg = EvaluatorConfig(suite=str(ZOO_SUITE), limit=30, batch_size=16, objectives=[
        ObjectiveConfig(name="em", metric="exact_match")])
    ev = HFEvaluator(cfg, tok)
    pooled, per_task = _both(ev, lm, fidelity=1 / 3, seed=2)
    _assert_same(pooled, per_task)
    assert calls == [16, 16, 8] + [10] * 4  # 4 tasks x 10 items: 3 calls, not 4
    with torch.no_grad():
        lm.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    calls.clear()
    res = ev.evaluate(lm)
    assert not calls and not res.outputs  # no generation for non-finite logits
    assert all(math.isnan(s["exact_match"]) for s in res.scores.values())
    assert math.isnan(res.values["em"])


@pytest.mark.slow
def test_pooled_equals_per_task_on_the_zoo(zoo, write_task: WriteTask, tmp_path: Path) -> None:
    """Every zoo model on the zoo's generation tasks (full and 1/9, as zoo-gen scores
    them), then the mixed-settings suite on an expert: the same texts either way."""
    tok = zoo.load_tokenizer()
    cfg = EvaluatorConfig(suite=str(ZOO_SUITE), limit=100, batch_size=128, objectives=[
        ObjectiveConfig(name="em", metric="exact_match")])
    ev = HFEvaluator(cfg, tok)
    for name in ("base", *zoo.skills):
        model = zoo.load_model(name)
        for fidelity in (1.0, 1 / 9):
            pooled, per_task = _both(ev, model, fidelity=fidelity)
            _assert_same(pooled, per_task)
            assert sum(map(len, pooled.outputs.values())) == (400 if fidelity == 1 else 48)
    _mixed_suite(write_task, tmp_path)
    mixed = HFEvaluator(EvaluatorConfig(suite=str(tmp_path), batch_size=16, objectives=[
        ObjectiveConfig(name="em", metric="exact_match")]), tok)
    pooled, per_task = _both(mixed, zoo.load_model("dup"))
    _assert_same(pooled, per_task)
    assert pooled.scores["c"]["exact_match"] >= 0.5  # the expert answers its own skill
