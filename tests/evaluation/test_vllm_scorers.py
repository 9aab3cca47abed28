"""Custom scorers by import path (a task YAML's ``metric_list: [{metric: <name>, scorer:
module:function}]``), shared by the hf and vllm backends: the hf half, in the main venv
(tests/evaluation/test_vllm.py runs the same scorer on a vLLM engine)."""

from __future__ import annotations

import math
import textwrap

import pytest

from mergesearch.evaluation import EvaluatorConfig, ObjectiveConfig, make_evaluator
from mergesearch.evaluation.base import EvaluationError

from .conftest import zoo_docs

SCORERS = textwrap.dedent('''
    def shared_prefix(prediction, target, doc):
        n = 0
        while n < min(len(prediction), len(target)) and prediction[n] == target[n]:
            n += 1
        return n / len(target)

    def first_letter(prediction, target, doc):
        return prediction[:1] == doc["answer"][:1]  # a bool counts 0 or 1

    def picky(prediction, target, doc):
        if doc["prompt"].startswith("rev o"):
            raise KeyError("no o words")
        return 1.0

    def not_a_number(prediction, target, doc):
        return "high"
''')


@pytest.fixture
def scorers(tmp_path, monkeypatch) -> str:
    folder = tmp_path / "scorer_code"
    folder.mkdir()
    (folder / "my_scorers.py").write_text(SCORERS)
    monkeypatch.syspath_prepend(str(folder))
    return "my_scorers"


def _evaluator(write_task, tok, metrics: list[dict], objective: str, **fields):
    docs = zoo_docs("rev")[:10]
    path = write_task("rev", docs, metric_list=metrics, **fields)
    cfg = EvaluatorConfig(suite=str(path.parent),
                          objectives=[ObjectiveConfig(name="o", metric=objective)])
    return make_evaluator(cfg, tok), docs


def test_a_custom_scorer_scores_each_generation(write_task, tok, lm, scorers) -> None:
    ev, docs = _evaluator(write_task, tok, [
        {"metric": "exact_match"}, {"metric": "prefix", "scorer": f"{scorers}:shared_prefix"},
        {"metric": "first", "scorer": f"{scorers}:first_letter"}], "prefix")
    out = ev.evaluate(lm)
    texts = out.outputs["rev"]
    assert len(texts) == len(docs)
    mine = __import__(scorers)
    expect = [mine.shared_prefix(t, d["answer"], d) for t, d in zip(texts, docs, strict=True)]
    first = [float(t[:1] == d["answer"][:1]) for t, d in zip(texts, docs, strict=True)]
    assert out.item_scores["rev"]["prefix"] == expect
    assert out.item_scores["rev"]["first"] == first  # computed too: another metric of the task
    assert out.values["o"] == pytest.approx(sum(expect) / len(expect))
    assert out.scores["rev"]["first"] == pytest.approx(sum(first) / len(first))


def test_a_scorer_that_raises_names_itself_and_the_item(write_task, tok, lm, scorers) -> None:
    ev, docs = _evaluator(write_task, tok, [{"metric": "p", "scorer": f"{scorers}:picky"}], "p")
    bad = next(i for i, d in enumerate(docs) if d["prompt"].startswith("rev o"))
    with pytest.raises(EvaluationError, match=rf"custom scorer '{scorers}:picky' \(task 'rev', "
                                              rf"metric 'p'\) raised on item {bad}: KeyError: "
                                              r"'no o words'"):
        ev.evaluate(lm)
    ev, _ = _evaluator(write_task, tok, [{"metric": "n", "scorer": f"{scorers}:not_a_number"}],
                       "n")
    with pytest.raises(EvaluationError, match=r"returned 'high' on item 0, not a finite number"):
        ev.evaluate(lm)


def test_nan_logits_leave_custom_scores_nan_not_raised(write_task, tok, lm, scorers) -> None:
    ev, _ = _evaluator(write_task, tok, [{"metric": "p", "scorer": f"{scorers}:picky"}], "p")
    with __import__("torch").no_grad():
        lm.lm_head.weight.fill_(float("nan"))
    out = ev.evaluate(lm)  # generation (and so the scorer) is skipped, the objective is NaN
    assert math.isnan(out.values["o"]) and "rev" not in out.outputs


@pytest.mark.parametrize(("metrics", "fields", "match"), [
    ([{"metric": "exact_match", "scorer": "m:f"}], {}, r"its own metric name"),
    ([{"metric": "x", "scorer": "m:f"}, {"metric": "x", "scorer": "m:g"}], {},
     r"its own metric name"),
    ([{"metric": "x", "scorer": "no_colon"}], {}, r"'package\.module:function'"),
    ([{"metric": "x", "scorer": "m:f"}], {"output_type": "multiple_choice",
                                          "doc_to_choice": "{{[answer, prompt]}}"},
     r"needs output_type: generate_until"),
    ([{"metric": "x", "scorer": "no_such_module_here:f"}], {}, r"cannot be imported"),
])
def test_bad_scorer_declarations_are_refused(write_task, tok, metrics, fields, match) -> None:
    with pytest.raises(EvaluationError, match=match):
        _evaluator(write_task, tok, metrics, metrics[0]["metric"], **fields)
