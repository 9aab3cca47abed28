"""HFEvaluator on the trained zoo, against independent references (slow: needs the zoo)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from mergesearch.evaluation import EvaluatorConfig, HFEvaluator, ObjectiveConfig
from mergesearch.zoo import Zoo, score_skill

from .conftest import ZOO_SUITE, WriteTask, loglikelihood, zoo_docs

pytestmark = pytest.mark.slow
TASKS = {f"zoo_{s}": s for s in ("rev", "srt", "dup", "evn")}


def zoo_evaluator(tok, metric: str = "char_accuracy", **fields) -> HFEvaluator:
    cfg = EvaluatorConfig(suite=str(ZOO_SUITE), objectives=[ObjectiveConfig(name="o",
                                                                            metric=metric)],
                          **fields)
    return HFEvaluator(cfg, tok)


def test_teacher_forced_metrics_match_the_manifest_and_score_skill(zoo: Zoo) -> None:
    """The manifest was scored by the zoo's own code at build time: an outside reference."""
    tok = zoo.load_tokenizer()
    evaluator = zoo_evaluator(tok, batch_size=33)
    for name in ["base", *zoo.skills]:
        model = zoo.load_model(name)
        res = evaluator.evaluate(model)
        for task, skill in TASKS.items():
            got, recorded = res.scores[task], zoo.manifest["scores"][name][skill]
            assert got["greedy_match"] == pytest.approx(recorded["exact_match"], abs=1e-6)
            assert got["char_accuracy"] == pytest.approx(recorded["char_accuracy"], abs=1e-5)
            assert got["answer_logprob"] == pytest.approx(recorded["answer_logprob"], abs=1e-5)
            if name in ("base", "rev"):
                ref = score_skill(model, tok, zoo_docs(skill))
                assert res.correct[task] == ref["correct"], (name, task)
                assert got["char_accuracy"] == pytest.approx(ref["char_accuracy"], abs=1e-9)


def test_teacher_forced_metrics_match_an_unbatched_reference(zoo: Zoo) -> None:
    tok, model = zoo.load_tokenizer(), zoo.load_model("srt")
    res = zoo_evaluator(tok, limit=12, subset_seed=5, batch_size=5).evaluate(model)
    for task, skill in TASKS.items():
        docs = zoo_docs(skill)
        refs = [_reference(model, tok, docs[i]) for i in res.indices[task]]
        assert res.correct[task] == [r[0] for r in refs]
        assert res.scores[task]["char_accuracy"] == pytest.approx(
            sum(r[1] for r in refs) / 12, abs=1e-6)
        assert res.scores[task]["answer_logprob"] == pytest.approx(
            sum(r[2] for r in refs) / 12, abs=1e-5)


@torch.no_grad()
def _reference(model, tok, doc: dict[str, str]) -> tuple[bool, float, float]:
    """Greedy match, char accuracy and mean log-prob of ``answer + <eos>``, one item at a time."""
    ctx = tok(doc["prompt"])["input_ids"]
    target = [*tok(doc["answer"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
    logits = model(torch.tensor([ctx + target])).logits[0, len(ctx) - 1: -1]
    hits = [int(logits[j].argmax()) == t for j, t in enumerate(target)]
    lps = [float(logits[j].log_softmax(-1)[t]) for j, t in enumerate(target)]
    return all(hits), sum(hits) / len(hits), sum(lps) / len(lps)


def test_generated_exact_match_equals_greedy_match_and_generate(zoo: Zoo) -> None:
    tok = zoo.load_tokenizer()
    generating = zoo_evaluator(tok, "exact_match", limit=40, batch_size=16)
    forced = zoo_evaluator(tok, "greedy_match", limit=40, batch_size=16)
    for name in zoo.skills:
        model = zoo.load_model(name)
        gen, tf = generating.evaluate(model), forced.evaluate(model)
        for task in TASKS:
            assert gen.correct[task] == tf.correct[task], (name, task)
            assert gen.scores[task]["exact_match"] == tf.scores[task]["greedy_match"]
        assert gen.scores[f"zoo_{name}"]["exact_match"] > 0.8  # the expert's own skill
        assert not tf.outputs
    docs = zoo_docs("dup")
    for k in (0, 7, 31):  # and the text is what a plain, unbatched generate() writes
        prompt = tok(docs[gen.indices["zoo_dup"][k]]["prompt"], return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        assert gen.outputs["zoo_dup"][k] == text


def test_multiple_choice_on_an_expert(zoo: Zoo, write_task: WriteTask, tmp_path: Path) -> None:
    rng = random.Random(0)
    docs = []
    for d in zoo_docs("rev")[:24]:
        wrong = {d["answer"][::-1], d["answer"][1:] + d["answer"][0], "".join(sorted(d["answer"]))}
        wrong = sorted(wrong - {d["answer"]})[:3] + ["zz"] * (3 - len(wrong - {d["answer"]}))
        choices = [d["answer"], *wrong]
        rng.shuffle(choices)
        docs.append({"prompt": d["prompt"], "choices": choices, "answer": d["answer"]})
    write_task("rev_mc", docs, output_type="multiple_choice", doc_to_choice="{{choices}}",
               doc_to_target="{{answer}}")
    cfg = EvaluatorConfig(suite=str(tmp_path), batch_size=24,
                          objectives=[ObjectiveConfig(name="acc", metric="acc")])
    evaluator, tok = HFEvaluator(cfg, zoo.load_tokenizer()), zoo.load_tokenizer()
    acc = {}
    for name in ("rev", "base"):
        model = zoo.load_model(name)
        res = evaluator.evaluate(model)
        ref = []
        for d in docs:
            lls = [loglikelihood(model, tok, d["prompt"], c) for c in d["choices"]]
            ref.append(d["choices"][max(range(4), key=lls.__getitem__)] == d["answer"])
        assert res.correct["rev_mc"] == ref, name
        acc[name] = res.values["acc"]
    assert acc["rev"] >= 0.9 and acc["base"] <= acc["rev"] - 0.3


def test_filters_end_to_end(zoo: Zoo, write_task: WriteTask, tmp_path: Path) -> None:
    """The base model copies ``cpy <text>=``: filters then pick the number or the word out."""
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 3))) +
             str(rng.randint(10, 999)) for _ in range(24)]
    write_task("num", [{"prompt": f"cpy {w}=", "answer": w.lstrip("abcdefgh")} for w in words],
               filter_list=[{"name": "last", "filter": [{"function": "last_number"}]},
                            {"name": "raw", "filter": [{"function": "take_first"}]}])
    write_task("word", [{"prompt": f"cpy {w}=", "answer": w.rstrip("0123456789")} for w in words],
               filter_list=[{"name": "re", "filter": [
                   {"function": "regex", "regex_pattern": r"^([a-z]+)\d"},
                   {"function": "take_first"}]}])
    write_task("cut", [{"prompt": f"cpy {w}=", "answer": "x"} for w in words],
               generation_kwargs={"until": ["<eos>", "1"], "max_gen_toks": 12})
    cfg = EvaluatorConfig(suite=str(tmp_path), objectives=[
        ObjectiveConfig(name="num", metric="exact_match,last", tasks=["num"]),
        ObjectiveConfig(name="raw", metric="exact_match,raw", tasks=["num"]),
        ObjectiveConfig(name="word", metric="exact_match", tasks=["word"]),
        ObjectiveConfig(name="cut", metric="exact_match", tasks=["cut"])])
    res = HFEvaluator(cfg, zoo.load_tokenizer()).evaluate(zoo.load_model("base"))
    outs = res.outputs["num"]
    assert outs == res.outputs["word"]
    assert sum(o == w for o, w in zip(outs, words, strict=True)) >= 20  # it copies
    num = [(re.findall(r"\d+", o) or ["?"])[-1] == w.lstrip("abcdefgh")
           for o, w in zip(outs, words, strict=True)]
    word = [re.sub(r"\d.*", "", o) == w.rstrip("0123456789") and o[-1:].isdigit()
            for o, w in zip(outs, words, strict=True)]
    assert res.correct["num"] == num and res.correct["word"] == word
    assert res.values == {"num": sum(num) / 24, "raw": 0.0, "word": sum(word) / 24, "cut": 0.0}
    assert res.outputs["cut"] == [o.split("1")[0] for o in outs]  # stop string "1"
    assert sum("1" in o for o in outs) >= 6  # ... which really cut some outputs
    assert res.scores["num"]["exact_match"] == res.values["num"]  # the first pipeline's


def test_a_stop_string_the_tokenizer_cannot_spell_names_its_task(
        zoo: Zoo, write_task: WriteTask, tmp_path: Path) -> None:
    """A stop string outside the vocabulary is a clear error that names the task, not
    transformers' bare ValueError."""
    from mergesearch.evaluation import EvaluationError

    write_task("snow", [{"prompt": "cpy ab=", "answer": "ab"}],
               generation_kwargs={"until": ["<eos>", "\u2603"], "max_gen_toks": 4})
    cfg = EvaluatorConfig(suite=str(tmp_path), objectives=[
        ObjectiveConfig(name="em", metric="exact_match", tasks=["snow"])])
    with pytest.raises(EvaluationError, match=r"task 'snow': its stop strings \['\\u2603'\]|"
                                              r"task 'snow': its stop strings \['\u2603'\]"):
        HFEvaluator(cfg, zoo.load_tokenizer()).evaluate(zoo.load_model("base"))
