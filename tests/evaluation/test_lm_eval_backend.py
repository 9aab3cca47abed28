"""The lm-eval backend and the zoo task YAMLs lm-eval scores with our metrics.

The parity test calls lm-eval itself (``simple_evaluate`` on HFLM of an exported merge,
from another directory) and compares every metric we optimise, item by item, with our
hf evaluator on the same items.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from mergesearch.evaluation import EvaluationError, EvaluatorConfig
from mergesearch.evaluation.tasks import load_suite

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "evaluators" / "zoo"
SUITES = [ZOO, ROOT / "evaluators" / "zoo_report", ROOT / "evaluators" / "hard" / "search",
          ROOT / "evaluators" / "hard" / "report"]
OURS = ("char_accuracy", "answer_logprob", "greedy_match", "exact_match")
OBJECTIVES = [{"name": "chars", "metric": "char_accuracy"},
              {"name": "exact", "metric": "exact_match"},
              {"name": "logprob", "metric": "answer_logprob"},
              {"name": "rev", "metric": "char_accuracy", "tasks": ["zoo_rev"]}]


@pytest.fixture(scope="module", autouse=True)
def _hf_home(tmp_path_factory: pytest.TempPathFactory):
    """datasets' cache (lm-eval loads the JSON lines through it) in a temporary folder."""
    home = tmp_path_factory.mktemp("hf_home")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_DATASETS_CACHE",
                                            "HF_DATASETS_OFFLINE")}
    os.environ |= {"HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"),
                   "HF_DATASETS_OFFLINE": "1"}
    import datasets.config

    old_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = home / "datasets"
    yield home
    datasets.config.HF_DATASETS_CACHE = old_cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _config(**fields) -> EvaluatorConfig:
    return EvaluatorConfig.model_validate({"backend": "lm_eval", "objectives": OBJECTIVES,
                                           **fields})


# -- the task files (quick: no lm-eval) --------------------------------------------------

def test_each_suite_has_our_task_class_and_our_parser_reads_it() -> None:
    source = (ROOT / "mergesearch" / "evaluation" / "lm_eval_task.py").read_text()
    for suite in SUITES:
        assert (suite / "utils.py").read_text() == source, suite
        for name, spec in load_suite(suite).items():
            raw = (spec.path).read_text()
            assert "class: !function utils.TokenScoredTask" in raw, name
            assert set(OURS) <= set(spec.metrics)


def test_our_parser_refuses_other_python_hooks(write_task, tmp_path: Path) -> None:
    path = write_task("t", [{"prompt": "a", "answer": "b"}])
    text = path.read_text()
    path.write_text(text + "class: !function utils.SomethingElse\n")
    with pytest.raises(EvaluationError, match=r"class 'utils.SomethingElse'.*TokenScoredTask"):
        load_suite(tmp_path)
    path.write_text(text + "class: !function utils.TokenScoredTask\n"
                    "process_docs: !function utils.process_docs\n")
    with pytest.raises(EvaluationError, match="process_docs"):
        load_suite(tmp_path)
    path.write_text(text.replace("doc_to_text: '{{prompt}}'",
                                 "doc_to_text: !function utils.render"))
    with pytest.raises(EvaluationError, match=r"\['doc_to_text'\] use `!function`"):
        load_suite(tmp_path)


# -- lm-eval itself on an exported merge --------------------------------------------------

@pytest.fixture(scope="module")
def exported(zoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task-arithmetic merge of two zoo experts, exported as a checkpoint folder."""
    from mergesearch.export import save_merged
    from mergesearch.recipe import Recipe

    recipe = Recipe(method="task_arithmetic", base=str(zoo.base),
                    models=[{"model": str(zoo.model_path("rev")), "parameters": {"weight": 0.7}},
                            {"model": str(zoo.model_path("srt")), "parameters": {"weight": 0.5}}])
    return save_merged(recipe, tmp_path_factory.mktemp("export") / "merged")


@pytest.mark.slow
def test_lm_eval_on_an_exported_checkpoint_equals_our_hf_evaluator(
        exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.evaluation.hf import HFEvaluator

    monkeypatch.chdir(tmp_path)  # data_files resolve against the suite, not the cwd
    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    ours = HFEvaluator(EvaluatorConfig(suite=str(ZOO), objectives=OBJECTIVES), tok)
    mine = ours.evaluate(model)
    assert 0.05 < mine.values["exact"] < 0.95  # a merge that is neither broken nor perfect
    lm = HFLM(pretrained=str(exported), device="cpu", batch_size=64)
    out = simple_evaluate(lm, tasks=["zoo"], log_samples=True, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(ZOO),
                                                   include_defaults=False))
    assert not list(tmp_path.iterdir())
    for task in ours.tasks:
        rows = sorted((s for s in out["samples"][task]), key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in rows] == mine.indices[task] == list(range(200))
        for metric in OURS:
            theirs = [float(s[metric]) for s in rows]
            exact = metric != "answer_logprob"
            tol = 1e-6 if exact else 1e-5  # ours: float32 hits / n; theirs: Python floats
            assert theirs == pytest.approx(mine.item_scores[task][metric], abs=tol), (task, metric)
            assert out["results"][task][f"{metric},none"] == pytest.approx(
                mine.scores[task][metric], abs=tol), (task, metric)
        assert [str(s["resps"][0][0]) for s in rows] == mine.outputs[task]
    # the group: the mean over the tasks, as the objectives are
    for metric, name in (("char_accuracy", "chars"), ("exact_match", "exact"),
                         ("answer_logprob", "logprob")):
        assert out["results"]["zoo"][f"{metric},none"] == pytest.approx(
            mine.values[name], abs=1e-6)


# -- the backend: in memory, on the resident module ----------------------------------------

@pytest.fixture(scope="module")
def resident(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.base)
    return tok, AutoModelForCausalLM.from_pretrained(zoo.base).eval()


@pytest.mark.slow
def test_backend_matches_hf_on_subsets_and_sees_new_weights(resident, zoo, _hf_home: Path,
                                                            tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from transformers import AutoModelForCausalLM

    from mergesearch.evaluation import make_evaluator
    from mergesearch.evaluation.hf import HFEvaluator

    tok, _ = resident
    model = AutoModelForCausalLM.from_pretrained(zoo.base).eval()  # changed below
    monkeypatch.chdir(tmp_path)
    backend = make_evaluator(_config(suite=str(ZOO), limit=60, subset_seed=3,
                                     lm_eval={"tasks": ["zoo"], "batch_size": 32}), tok)
    hf = HFEvaluator(EvaluatorConfig(suite=str(ZOO), objectives=OBJECTIVES, limit=60,
                                     subset_seed=3), tok)
    assert backend.objective_names == hf.objective_names
    before = _files(_hf_home) | _files(tmp_path)
    expert = dict(AutoModelForCausalLM.from_pretrained(zoo.model_path("rev")).named_parameters())
    for step, (fidelity, seed) in enumerate([(1.0, 0), (0.25, 1), (0.25, 1)]):
        if step == 2:  # the worker merges in place: the same module, new weights
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(expert[name])
        a = backend.evaluate(model, fidelity=fidelity, seed=seed)
        b = hf.evaluate(model, fidelity=fidelity, seed=seed)
        assert a.indices == b.indices
        assert {t: len(v) for t, v in a.indices.items()} == (
            dict.fromkeys(b.indices, 60) if fidelity == 1 else dict.fromkeys(b.indices, 15))
        assert a.values == pytest.approx(b.values, abs=1e-5)
        assert a.correct == b.correct and a.outputs == b.outputs
        for task in b.scores:
            for metric in OURS:
                assert a.item_scores[task][metric] == pytest.approx(
                    b.item_scores[task][metric], abs=1e-5)
                assert a.scores[task][f"{metric},none"] == a.scores[task][metric]
        if step == 1:
            subset = a.values
    assert a.values["rev"] > subset["rev"] + 0.1  # the rev expert's weights were seen
    assert backend.lm(model) is backend._lm  # one HFLM around the module
    assert _files(_hf_home) | _files(tmp_path) == before  # nothing written per candidate
    with torch.no_grad():  # a broken merge: NaN scores, as on the hf backend, not an error
        model.model.norm.weight.fill_(float("nan"))
    broken = backend.evaluate(model, fidelity=0.25, seed=1)
    assert all(math.isnan(v) for v in broken.values.values())
    assert not any(c for v in broken.correct.values() for c in v)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_dict_task_and_a_local_task_folder(resident, tmp_path: Path) -> None:
    from mergesearch.evaluation.hf import HFEvaluator
    from mergesearch.evaluation.lm_eval_backend import LMEvalEvaluator

    tok, model = resident
    docs = [json.loads(line) for line in (ZOO / "rev.jsonl").read_text().splitlines()][:30]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mini.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    fields = {"dataset_path": "json", "test_split": "test", "output_type": "generate_until",
              "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
              "target_delimiter": "", "generation_kwargs": {"until": ["<eos>"],
                                                            "max_gen_toks": 12},
              "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                              for m in OURS]}
    # a task defined in the experiment: relative data files against the experiment folder
    inline = {"task": "mini_inline", "dataset_kwargs": {"data_files": {
        "test": "data/mini.jsonl"}}, **fields}
    objectives = [{"name": "chars", "metric": "char_accuracy"},
                  {"name": "exact", "metric": "exact_match,none"}]
    a = LMEvalEvaluator(EvaluatorConfig(backend="lm_eval", objectives=objectives,
                                        lm_eval={"tasks": [inline]}), tok,
                        base_dir=tmp_path / "experiments").evaluate(model)
    # the same task as a local folder (an include path) that our hf backend reads too
    folder = tmp_path / "suite"
    folder.mkdir()
    (folder / "utils.py").write_text((ZOO / "utils.py").read_text())
    (folder / "mini.yaml").write_text("class: !function utils.TokenScoredTask\n" + yaml.safe_dump(
        {"task": "mini_local", "dataset_kwargs": {"data_files": {
            "test": "../data/mini.jsonl"}}, **fields}))
    b = LMEvalEvaluator(EvaluatorConfig(backend="lm_eval", suite=str(folder),
                                        objectives=objectives,
                                        lm_eval={"tasks": ["mini_local"]}), tok).evaluate(model)
    ours = [{"name": "chars", "metric": "char_accuracy"},
            {"name": "exact", "metric": "exact_match"}]  # our name of lm-eval's ...,none
    c = HFEvaluator(EvaluatorConfig(suite=str(folder), objectives=ours), tok).evaluate(model)
    assert a.indices["mini_inline"] == b.indices["mini_local"] == list(range(30))
    for metric in OURS:
        assert a.item_scores["mini_inline"][metric] == pytest.approx(
            c.item_scores["mini_local"][metric], abs=1e-5)
    assert a.values == pytest.approx(c.values, abs=1e-5)
    assert b.values == pytest.approx(c.values, abs=1e-5)
    assert not math.isnan(a.values["chars"])


@pytest.mark.slow
def test_bad_inputs_are_clear_errors(resident, tmp_path: Path) -> None:
    from mergesearch.evaluation.lm_eval_backend import LMEvalEvaluator

    tok, _ = resident
    with pytest.raises(EvaluationError, match=r"evaluator\.lm_eval\.tasks: unknown tasks "
                                              r"\['zoo_nope'\].*include_defaults"):
        LMEvalEvaluator(_config(suite=str(ZOO), lm_eval={"tasks": ["zoo_nope"]}), tok)
    bad = [{"name": "f1", "metric": "f1", "tasks": ["zoo_rev"]}]
    with pytest.raises(EvaluationError, match=r"objective 'f1': metric 'f1' is not produced "
                                              r"by lm-eval task 'zoo_rev'.*char_accuracy"):
        LMEvalEvaluator(EvaluatorConfig(backend="lm_eval", suite=str(ZOO), objectives=bad,
                                        lm_eval={"tasks": ["zoo_rev"]}), tok)
    missing = {"task": "gone", "dataset_path": "json", "test_split": "test",
               "dataset_kwargs": {"data_files": {"test": "nowhere.jsonl"}},
               "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}"}
    with pytest.raises(EvaluationError, match=r"evaluator\.lm_eval\.tasks\[0\] \(gone\): "
                                              r"data file 'nowhere.jsonl' not found"):
        LMEvalEvaluator(_config(lm_eval={"tasks": [missing]}), tok, base_dir=tmp_path)
    folder = tmp_path / "suite"
    folder.mkdir()
    (folder / "gone.yaml").write_text(yaml.safe_dump({**missing, "dataset_kwargs": {
        "data_files": {"test": str(tmp_path / "nowhere.jsonl")}}}))
    with pytest.raises(EvaluationError, match=r"evaluator\.lm_eval\.tasks: a data file is "
                                              r"missing.*nowhere\.jsonl"):
        LMEvalEvaluator(_config(suite=str(folder), lm_eval={"tasks": ["gone"]}), tok)
    (folder / "gone.yaml").unlink()
    (folder / "plain.yaml").write_text(yaml.safe_dump({**missing, "task": "plain",
        "dataset_kwargs": {"data_files": {"test": str(ZOO / "rev.jsonl")}},
        "metric_list": [{"metric": "char_accuracy", "aggregation": "mean"}]}))
    with pytest.raises(EvaluationError, match=r"task 'plain' lists metrics \['char_accuracy'\]"
                                              r".*utils\.TokenScoredTask"):
        LMEvalEvaluator(_config(suite=str(folder), lm_eval={"tasks": ["plain"]}), tok)
    # refused when the experiment is read, before any evaluator is built
    with pytest.raises(ValidationError, match=r"tasks: with backend lm_eval the tasks are "
                                              r"lm_eval\.tasks"):
        _config(suite=str(ZOO), tasks=["zoo_rev"], lm_eval={"tasks": ["zoo"]})
    with pytest.raises(ValidationError, match=r"estimator: only for backend hf"):
        _config(suite=str(ZOO), estimator={"kind": "subset", "items": 4},
                lm_eval={"tasks": ["zoo"]})


@pytest.mark.slow
def test_arguments_are_passed_through_to_lm_eval(resident, zoo) -> None:
    from transformers import AutoModelForCausalLM

    from mergesearch.evaluation.lm_eval_backend import LMEvalEvaluator

    tok, _ = resident
    model = AutoModelForCausalLM.from_pretrained(zoo.model_path("dup")).eval()
    objectives = [{"name": "exact", "metric": "exact_match"},
                  {"name": "chars", "metric": "char_accuracy"}]

    def run(**options):
        config = EvaluatorConfig(backend="lm_eval", suite=str(ZOO), objectives=objectives,
                                 limit=12, lm_eval={"tasks": ["zoo_dup"], **options})
        return LMEvalEvaluator(config, tok).evaluate(model)

    plain = run()
    short = run(gen_kwargs={"max_gen_toks": 2})
    assert max(map(len, plain.outputs["zoo_dup"])) > 2
    assert all(len(o) <= 2 for o in short.outputs["zoo_dup"])
    assert short.values["exact"] == 0 < plain.values["exact"]
    assert short.values["chars"] == plain.values["chars"]  # teacher-forced: no generation
    told = run(system_instruction="srt ")  # prepended to every context
    assert told.item_scores["zoo_dup"]["char_accuracy"] != \
        plain.item_scores["zoo_dup"]["char_accuracy"]
    shots = run(num_fewshot=2)  # two solved items (from the test split) before each
    assert shots.outputs["zoo_dup"] != plain.outputs["zoo_dup"]
    assert shots.indices == plain.indices
