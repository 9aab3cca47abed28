"""Evaluator configuration: what pydantic refuses and what the evaluator refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import PreTrainedTokenizerFast

from mergesearch.evaluation import (
    EvaluationError,
    EvaluatorConfig,
    HFEvaluator,
    ObjectiveConfig,
    make_evaluator,
)

from .conftest import ZOO_SUITE, WriteTask


def config(**overrides) -> EvaluatorConfig:
    fields = {"suite": str(ZOO_SUITE), "limit": 8,
              "objectives": [{"name": "skill", "metric": "char_accuracy"}]}
    return EvaluatorConfig.model_validate(fields | overrides)


def test_defaults_and_dispatch(tok: PreTrainedTokenizerFast) -> None:
    cfg = config()
    assert (cfg.backend, cfg.tasks, cfg.subset_seed, cfg.batch_size) == ("hf", None, 0, 64)
    obj = cfg.objectives[0]
    assert (obj.tasks, obj.direction, obj.weight) == (None, "maximize", 1.0)
    evaluator = make_evaluator(cfg, tok)
    assert isinstance(evaluator, HFEvaluator)
    assert evaluator.objective_names == ["skill"] and evaluator.directions == {"skill": "maximize"}
    assert evaluator.n_items == {f"zoo_{s}": 8 for s in ("dup", "evn", "rev", "srt")}


@pytest.mark.parametrize(("overrides", "match"), [
    ({"objectives": [{"name": "a", "metric": "acc"}, {"name": "a", "metric": "acc_norm"}]},
     r"duplicate objective names \['a'\]"),
    ({"objectives": []}, "objectives"),
    ({"temperature": 0.0}, "temperature"),
    ({"objectives": [{"name": "a", "metric": "acc", "wieght": 2}]}, "wieght"),
    ({"objectives": [{"name": "a", "metric": "acc", "weight": 0}]}, "weight"),
    ({"objectives": [{"name": "a", "metric": "acc", "direction": "up"}]}, "direction"),
    ({"limit": 0}, "limit"),
    ({"backend": "sglang"}, "backend"),
    ({"backend": "lm_eval"}, "lm_eval: {tasks"),
    ({"vllm": {"engine": {}}}, "only for backend: vllm"),
])
def test_config_errors_name_the_field(overrides: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        config(**overrides)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"tasks": ["zoo_rev", "zoo_mul"]},
     r"unknown tasks \['zoo_mul'\].*\['zoo_dup', 'zoo_evn', 'zoo_rev', 'zoo_srt'\]"),
    ({"objectives": [{"name": "o", "metric": "char_accuracy", "tasks": ["zoo_xyz"]}]},
     r"objective 'o' names tasks \['zoo_xyz'\]"),
    ({"tasks": ["zoo_rev"],
      "objectives": [{"name": "o", "metric": "char_accuracy", "tasks": ["zoo_srt"]}]},
     r"objective 'o' names tasks \['zoo_srt'\].*evaluator\.tasks"),
    ({"objectives": [{"name": "o", "metric": "acc"}]},
     r"objective 'o': metric 'acc'.*generate_until.*'char_accuracy', 'answer_logprob'"),
    ({"suite": "no/such/suite"}, r"no/such/suite is not a directory"),
])
def test_evaluator_errors_name_the_culprit(tok: PreTrainedTokenizerFast, overrides: dict,
                                           match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        HFEvaluator(config(**overrides), tok)


def test_unknown_extra_metric_and_missing_data(tok: PreTrainedTokenizerFast,
                                               write_task: WriteTask, tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"metrics \['bleu'\]"):
        HFEvaluator(config(), tok, metrics=["bleu"])
    write_task("t", [{"prompt": "rev ab=", "answer": "ba"}])
    (tmp_path / "t.jsonl").unlink()
    with pytest.raises(EvaluationError, match=r"task 't' \(.*t\.yaml\).*'t\.jsonl' not found"):
        HFEvaluator(config(suite=str(tmp_path)), tok)


def test_mixed_suite_objective_metric_must_fit_every_task(
        tok: PreTrainedTokenizerFast, write_task: WriteTask, tmp_path: Path) -> None:
    write_task("gen", [{"prompt": "rev ab=", "answer": "ba"}])
    write_task("mc", [{"prompt": "rev ab=", "answer": "ba"}], output_type="multiple_choice",
               doc_to_choice=["ab", "ba"])
    with pytest.raises(EvaluationError, match=r"'acc'.*task 'gen'"):
        HFEvaluator(config(suite=str(tmp_path), objectives=[{"name": "o", "metric": "acc"}]),
                    tok)
    ok = config(suite=str(tmp_path), objectives=[
        ObjectiveConfig(name="o", metric="acc", tasks=["mc"]),
        ObjectiveConfig(name="p", metric="char_accuracy", tasks=["gen"])])
    assert HFEvaluator(ok, tok).objective_names == ["o", "p"]


@pytest.mark.parametrize(("objective", "match"), [
    ({"name": "s", "source": "weights", "metric": "sparsity"},
     r"objective 's': unknown weights metric 'sparsity'; known: delta_l1, delta_l2, "
     r"delta_sparsity"),
    ({"name": "m", "source": "recipe", "metric": "delta_l1"},
     r"objective 'm': unknown recipe metric 'delta_l1'; known: .*num_models"),
    ({"name": "m", "source": "recipe", "metric": "num_models", "tasks": ["zoo_rev"]},
     r"objective 'm': 'tasks' is only for source: evaluator, not recipe"),
    ({"name": "m", "source": "model", "metric": "num_models"}, "source"),
])
def test_objective_sources_refuse_unknown_metrics_and_tasks(objective: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        config(objectives=[objective])


def test_evaluator_computes_only_its_own_objectives(tok: PreTrainedTokenizerFast,
                                                    lm: torch.nn.Module) -> None:
    cfg = config(limit=2, objectives=[
        {"name": "sparsity", "source": "weights", "metric": "delta_sparsity"},
        {"name": "models", "source": "recipe", "metric": "num_models", "direction": "minimize"},
        {"name": "rev", "metric": "char_accuracy", "tasks": ["zoo_rev"]}])
    evaluator = HFEvaluator(cfg, tok)
    assert evaluator.objective_names == ["rev"] and evaluator.directions == {"rev": "maximize"}
    ev = evaluator.evaluate(lm)
    assert set(ev.values) == {"rev"}
    assert ev.values["rev"] == ev.scores["zoo_rev"]["char_accuracy"]
    # the default source is left out of the dump (fingerprints of older studies stand)
    dumped = [o.model_dump(mode="json") for o in cfg.objectives]
    assert [d.get("source") for d in dumped] == ["weights", "recipe", None]
    assert EvaluatorConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_relative_suite_resolves_against_base_dir(tok: PreTrainedTokenizerFast,
                                                  write_task: WriteTask, tmp_path: Path) -> None:
    write_task("t", [{"prompt": "rev ab=", "answer": "ba"}], folder=tmp_path / "evals")
    (tmp_path / "experiments").mkdir()
    evaluator = HFEvaluator(config(suite="evals"), tok, base_dir=tmp_path / "experiments")
    assert list(evaluator.tasks) == ["t"]
