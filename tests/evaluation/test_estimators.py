"""Fitness estimators: the maths on synthetic answers, and the HF evaluator using them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from mergesearch.evaluation import EvaluationError, EvaluatorConfig, make_evaluator
from mergesearch.evaluation.estimators import (
    AnchorEstimator,
    IRTEstimator,
    SubsetEstimator,
    anchor_points,
    fit_irt,
    make_estimator,
    subset_items,
)

from .conftest import ZOO_SUITE

OBJ = [{"name": "mean", "metric": "char_accuracy"}]


def synthetic(models: int, items: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(models, 1))
    a = rng.uniform(0.7, 2.0, size=(items, 1))
    b = rng.normal(size=items)
    p = 1 / (1 + np.exp(-(theta @ a.T - b)))
    return (rng.random((models, items)) < p).astype(float), theta, a, b


# -- IRT ------------------------------------------------------------------------------------


def test_irt_recovers_item_parameters_and_abilities() -> None:
    answers, theta, a, b = synthetic(400, 30)
    fit = fit_irt(answers, seed=0)
    assert np.corrcoef(fit.b, b)[0, 1] > 0.97
    assert np.corrcoef(fit.a[:, 0], a[:, 0])[0, 1] > 0.85
    assert np.corrcoef(fit.theta[:, 0], theta[:, 0])[0, 1] > 0.9
    # the fitted model reproduces each item's observed rate of success
    p = fit.prob(fit.theta)
    assert np.abs(p.mean(0) - answers.mean(0)).max() < 0.05
    again = fit_irt(answers, seed=0)
    assert np.array_equal(again.a, fit.a) and np.array_equal(again.b, fit.b)


def test_irt_ability_of_a_new_model_ranks_like_its_true_ability() -> None:
    answers, theta, _, _ = synthetic(300, 40, seed=1)
    fit = fit_irt(answers[:200], seed=0)
    items = list(range(40))
    est = [fit.ability(row, items)[0] for row in answers[200:]]
    assert np.corrcoef(est, theta[200:, 0])[0, 1] > 0.85


def test_pirt_with_every_item_is_the_plain_mean() -> None:
    answers, *_ = synthetic(50, 20, seed=2)
    est = IRTEstimator(answers, 20, seed=0, blend=False)
    row = answers[3]
    assert est.predict(row[est.items])["estimate"] == pytest.approx(row.mean())


def test_irt_beats_a_random_subset_of_the_same_items_on_synthetic_models() -> None:
    """Models that follow a 2PL model: p-IRT's prediction from 8 of 60 items is closer to
    the full-set mean than those 8 items' own mean (on average, by over 10%)."""
    answers, *_ = synthetic(400, 60, seed=3)
    calib, test = answers[:200], answers[200:]
    errs = {"irt": [], "subset": []}
    for seed in range(2):
        irt = IRTEstimator(calib, 8, seed=seed, blend=False)
        sub = SubsetEstimator(60, 8, seed=seed)
        assert irt.items == sub.items  # the same random items: a fair comparison
        for row in test:
            errs["irt"].append(abs(irt.predict(row[irt.items])["estimate"] - row.mean()))
            errs["subset"].append(abs(sub.predict(row[sub.items])["estimate"] - row.mean()))
    assert np.mean(errs["irt"]) < 0.9 * np.mean(errs["subset"])


# -- anchors -----------------------------------------------------------------------------------


def test_anchor_estimate_is_exact_when_every_cluster_is_homogeneous() -> None:
    rng = np.random.default_rng(0)
    patterns = rng.random((6, 4))  # 4 distinct answer vectors over 6 calibration models
    sizes = [7, 3, 12, 5]
    groups = np.repeat(np.arange(4), sizes)
    rng.shuffle(groups)
    calib = patterns[:, groups]  # items of a group answer alike
    est = AnchorEstimator(calib, 4, seed=0)
    assert len(est.items) == 4
    assert sorted(round(w * len(groups)) for w in est.weights) == sorted(sizes)
    for _ in range(5):  # any model answering alike within each group
        new = rng.random(4)[groups]
        assert est.predict(new[est.items])["estimate"] == pytest.approx(new.mean(), abs=1e-12)


def test_anchor_points_keep_fewer_items_than_distinct_patterns() -> None:
    calib = np.array([[1, 1, 0, 0, 1], [0, 0, 1, 1, 0]], dtype=float)
    items, weights = anchor_points(calib, 4)
    assert len(items) == 2 and sum(weights) == pytest.approx(1)


def test_subset_is_seeded() -> None:
    assert subset_items(100, 10, 0) == subset_items(100, 10, 0)
    assert subset_items(100, 10, 0) != subset_items(100, 10, 1)
    assert len(set(subset_items(100, 10, 3))) == 10


# -- bad inputs ------------------------------------------------------------------------------


def test_unknown_estimator_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown estimator 'tiny'"):
        EvaluatorConfig(suite="x", objectives=OBJ, estimator="tiny")
    with pytest.raises(EvaluationError, match="unknown estimator 'tiny'"):
        make_estimator("tiny", 10, 5)


def test_irt_without_source_answers_is_refused() -> None:
    with pytest.raises(ValidationError, match="estimator irt needs the answers of two or more"):
        EvaluatorConfig(suite="x", objectives=OBJ, estimator="irt")
    with pytest.raises(EvaluationError, match="needs the full-set answers of two or more"):
        make_estimator("irt", 10, 5)
    with pytest.raises(EvaluationError, match="needs the full-set answers of two or more"):
        make_estimator("anchors", 10, 5, answers=np.ones((1, 10)))


def test_subset_larger_than_the_task_is_refused(tok) -> None:
    with pytest.raises(EvaluationError, match="30 items from a task of 20"):
        make_estimator("subset", 20, 30)
    with pytest.raises(ValidationError, match="more than the 10 items per task that limit"):
        EvaluatorConfig(suite="x", objectives=OBJ, limit=10, estimator={"kind": "subset",
                                                                         "items": 20})
    cfg = EvaluatorConfig(suite=str(ZOO_SUITE), objectives=OBJ,
                          estimator={"kind": "subset", "items": 500})
    with pytest.raises(EvaluationError, match="estimator.items 500 is more than the items"):
        make_evaluator(cfg, tok)


def test_estimator_on_the_python_backend_is_refused() -> None:
    with pytest.raises(ValidationError, match="estimator: only for backend: hf"):
        EvaluatorConfig(backend="python", function="m:f", objectives=OBJ, estimator="subset")


def test_missing_calibration_model_is_refused(tok, tmp_path) -> None:
    cfg = EvaluatorConfig(suite=str(ZOO_SUITE), objectives=OBJ, limit=10, estimator={
        "kind": "irt", "items": 5, "sources": [str(tmp_path / "nope"), "zoo:nope"]})
    with pytest.raises(EvaluationError, match="estimator.sources: model .*nope.* not found"):
        make_evaluator(cfg, tok)


def test_no_estimator_dumps_as_before() -> None:
    assert "estimator" not in EvaluatorConfig(suite="x", objectives=OBJ).model_dump()


# -- the HF evaluator with an estimator --------------------------------------------------------


def _models(tok, n: int) -> list[LlamaForCausalLM]:
    from helpers import tiny_config

    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(LlamaForCausalLM(tiny_config(vocab_size=len(tok), num_hidden_layers=2)).eval())
    return out


def test_subset_estimate_is_the_mean_of_its_items_and_costs_only_them(tok, lm) -> None:
    full = make_evaluator(EvaluatorConfig(suite=str(ZOO_SUITE), objectives=OBJ, limit=30), tok)
    cfg = EvaluatorConfig(suite=str(ZOO_SUITE), objectives=OBJ, limit=30,
                          estimator={"kind": "subset", "items": 7, "seed": 3})
    ev = make_evaluator(cfg, tok)
    answers = full.item_answers(lm)
    out = ev.evaluate(lm)
    assert all(len(c) == 7 for c in out.correct.values())  # the items scored: the cost
    expected = []
    for (task, metric), values in answers.items():
        items = subset_items(30, 7, f"3:{task}")
        assert out.indices[task] == [full._data[task].doc_ids[i] for i in items]
        mean = float(np.mean([values[i] for i in items]))
        assert out.scores[task][metric] == pytest.approx(mean)
        assert out.scores[task]["char_accuracy,subset"] == pytest.approx(mean)
        assert out.scores[task]["estimator_items"] == 7
        expected.append(mean)
    assert out.values["mean"] == pytest.approx(np.mean(expected))
    assert out.estimate["estimator"] == "subset"
    # a fidelity below 1 is a plain subset, as without an estimator
    assert ev.evaluate(lm, fidelity=0.5).values == full.evaluate(lm, fidelity=0.5).values


def test_irt_in_the_evaluator_predicts_as_the_estimator_does(tok, lm) -> None:
    """Calibrated on three random models' full-set answers, the evaluator's prediction for
    a fourth equals the estimator's own from that model's full answers."""
    cfg = EvaluatorConfig(suite=str(ZOO_SUITE), objectives=OBJ, limit=30,
                          estimator={"kind": "irt", "items": 8, "sources": ["a", "b"]})
    plain = make_evaluator(EvaluatorConfig(suite=str(ZOO_SUITE), objectives=OBJ, limit=30), tok)
    calib_models = _models(tok, 3)
    rows: dict = {}
    for m in calib_models:
        for key, values in plain.item_answers(m).items():
            rows.setdefault(key, []).append(values)
    calib = {k: np.array(v) for k, v in rows.items()}
    # the same config without its sources (built unvalidated): calibrated by hand below
    ev = make_evaluator(cfg.model_copy(update={"estimator": cfg.estimator.model_copy(
        update={"sources": []})}), tok)
    with pytest.raises(EvaluationError, match="has no calibration answers"):
        ev.evaluate(lm)
    ev.calibrate(calib)
    out = ev.evaluate(lm)
    truth = plain.item_answers(lm)
    for (task, metric), values in truth.items():
        est = make_estimator("irt", 30, 8, seed=f"0:{task}", answers=calib[task, metric])
        want = est.predict(np.asarray(values)[est.items])
        assert out.scores[task][metric] == pytest.approx(want["estimate"])
        assert out.scores[task]["char_accuracy,pirt"] == pytest.approx(want["pirt"])
        assert len(out.correct[task]) == 8


def test_items_may_be_a_share_of_each_task(tok, lm) -> None:
    cfg = EvaluatorConfig(suite=str(ZOO_SUITE), objectives=OBJ, limit=30,
                          estimator={"kind": "subset", "items": 0.2})
    assert cfg.estimator.count(30) == 6 and cfg.estimator.count(8) == 2
    out = make_evaluator(cfg, tok).evaluate(lm)
    assert all(len(c) == 6 for c in out.correct.values())
    with pytest.raises(ValidationError, match="a share in"):
        EvaluatorConfig(suite="x", objectives=OBJ, estimator={"kind": "subset", "items": 1.5})
