"""HFEvaluator behaviour on a random tiny LM: subsets, fidelity, repeatability, model state."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mergesearch.evaluation import (
    EvaluationError,
    EvaluatorConfig,
    HFEvaluator,
    ObjectiveConfig,
)
from mergesearch.zoo import score_skill

from .conftest import ZOO_SUITE, WriteTask, loglikelihood, zoo_docs

OBJECTIVES = [ObjectiveConfig(name="skill", metric="char_accuracy"),
              ObjectiveConfig(name="logprob", metric="answer_logprob", tasks=["zoo_rev"]),
              ObjectiveConfig(name="em", metric="exact_match", tasks=["zoo_dup"])]


def evaluator(tok: PreTrainedTokenizerFast, **fields) -> HFEvaluator:
    cfg = {"suite": str(ZOO_SUITE), "objectives": OBJECTIVES} | fields
    return HFEvaluator(EvaluatorConfig(**cfg), tok)


def test_scores_and_objectives(tok: PreTrainedTokenizerFast, lm: LlamaForCausalLM) -> None:
    ev = evaluator(tok, limit=20)
    res = ev.evaluate(lm)
    assert set(res.scores) == {"zoo_dup", "zoo_evn", "zoo_rev", "zoo_srt"}
    assert set(res.scores["zoo_rev"]) == {"char_accuracy", "answer_logprob", "greedy_match"}
    assert set(res.scores["zoo_dup"]) == {"char_accuracy", "answer_logprob", "greedy_match",
                                          "exact_match"}  # generation only where asked for
    assert set(res.outputs) == {"zoo_dup"} and len(res.outputs["zoo_dup"]) == 20
    assert res.values["skill"] == pytest.approx(
        sum(s["char_accuracy"] for s in res.scores.values()) / 4)
    assert res.values["logprob"] == res.scores["zoo_rev"]["answer_logprob"] < 0
    assert res.values["em"] == res.scores["zoo_dup"]["exact_match"]
    assert res.n_items == {t: 20 for t in res.scores}
    assert all(len(c) == 20 for c in res.correct.values())


def test_matches_score_skill_on_the_same_items(tok: PreTrainedTokenizerFast,
                                               lm: LlamaForCausalLM) -> None:
    res = evaluator(tok, limit=50, batch_size=7).evaluate(lm)  # odd batches: padding paths
    for skill in ("rev", "dup"):
        docs = zoo_docs(skill)
        ref = score_skill(lm, tok, [docs[i] for i in res.indices[f"zoo_{skill}"]])
        got = res.scores[f"zoo_{skill}"]
        assert got["char_accuracy"] == pytest.approx(ref["char_accuracy"], abs=1e-9)
        assert got["answer_logprob"] == pytest.approx(ref["answer_logprob"], abs=1e-5)
        assert got["greedy_match"] == ref["exact_match"]


def test_limit_is_a_seeded_deterministic_subset(tok: PreTrainedTokenizerFast,
                                                lm: LlamaForCausalLM) -> None:
    a = evaluator(tok, limit=30, subset_seed=1).evaluate(lm)
    b = evaluator(tok, limit=30, subset_seed=1).evaluate(lm)
    c = evaluator(tok, limit=30, subset_seed=2).evaluate(lm)
    assert a == b
    for task in a.indices:
        assert len(a.indices[task]) == 30 == len(set(a.indices[task]))
        assert a.indices[task] == sorted(a.indices[task])
        assert a.indices[task] != c.indices[task]
    assert a.indices["zoo_rev"] != a.indices["zoo_srt"]  # each task draws its own sample
    everything = evaluator(tok, limit=500)  # a limit above the size keeps every item
    assert everything.n_items == {t: 200 for t in a.scores}


def test_fidelity_uses_a_seeded_nested_subset(tok: PreTrainedTokenizerFast,
                                              lm: LlamaForCausalLM) -> None:
    ev = evaluator(tok, limit=40)
    full = ev.evaluate(lm)
    quarter = ev.evaluate(lm, fidelity=0.25, seed=3)
    half = ev.evaluate(lm, fidelity=0.5, seed=3)
    other = ev.evaluate(lm, fidelity=0.25, seed=4)
    for task in full.scores:
        assert quarter.n_items[task] == 10 and half.n_items[task] == 20
        assert set(quarter.indices[task]) < set(half.indices[task])
        assert quarter.indices[task] != other.indices[task]
        per_item = dict(zip(full.indices[task], full.correct[task], strict=True))
        assert quarter.correct[task] == [per_item[i] for i in quarter.indices[task]]
    assert ev.evaluate(lm, fidelity=0.01).n_items["zoo_rev"] == 1  # never empty
    with pytest.raises(EvaluationError, match="fidelity"):
        ev.evaluate(lm, fidelity=0)


def test_repeatable_sees_in_place_changes_and_keeps_the_mode(
        tok: PreTrainedTokenizerFast, lm: LlamaForCausalLM) -> None:
    ev = evaluator(tok, limit=16)
    lm.train()
    first = ev.evaluate(lm)
    assert lm.training
    lm.eval()
    assert ev.evaluate(lm) == first and not lm.training
    with torch.no_grad():
        lm.lm_head.weight.add_(torch.randn_like(lm.lm_head.weight))
    changed = ev.evaluate(lm)
    assert changed.values["logprob"] != first.values["logprob"]
    assert changed.scores != first.scores


def test_non_finite_weights_give_nan_not_an_exception(
        tok: PreTrainedTokenizerFast, lm: LlamaForCausalLM) -> None:
    with torch.no_grad():
        lm.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    res = evaluator(tok, limit=8).evaluate(lm)
    assert all(math.isnan(v) for v in res.values.values())
    assert math.isnan(res.scores["zoo_dup"]["exact_match"])
    assert not any(res.correct["zoo_rev"])


def test_multiple_choice_matches_a_per_choice_loop(
        tok: PreTrainedTokenizerFast, lm: LlamaForCausalLM, write_task: WriteTask,
        tmp_path) -> None:
    docs = [{"prompt": d["prompt"], "choices": [d["answer"], d["answer"][::-1] + "a", "ab", "q"],
             "label": i % 4} for i, d in enumerate(zoo_docs("rev")[:24])]
    for d in docs:  # move the true answer to position `label`
        d["choices"].insert(d["label"], d["choices"].pop(0))
    write_task("mc", docs, output_type="multiple_choice", doc_to_choice="choices",
               doc_to_target="label", doc_to_text="{{prompt}} ")  # trailing space: lm-eval rule
    cfg = EvaluatorConfig(suite=str(tmp_path), batch_size=5,
                          objectives=[ObjectiveConfig(name="a", metric="acc"),
                                      ObjectiveConfig(name="n", metric="acc_norm")])
    res = HFEvaluator(cfg, tok).evaluate(lm)
    acc, acc_norm = [], []
    for d in docs:
        lls = [loglikelihood(lm, tok, d["prompt"], " " + c) for c in d["choices"]]
        acc.append(max(range(4), key=lls.__getitem__) == d["label"])
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"], strict=True)]
        acc_norm.append(max(range(4), key=norm.__getitem__) == d["label"])
    assert res.correct["mc"] == acc
    assert res.values == {"a": sum(acc) / 24, "n": sum(acc_norm) / 24}
    assert acc != acc_norm  # the two metrics really differ here

