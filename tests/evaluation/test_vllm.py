"""The vllm evaluator backend against the hf backend, on a real vLLM engine and the zoo.

The engine tests need vllm, which lives in its own venv (scripts/vllm_env.sh):

    OMP_NUM_THREADS=1 .venv-vllm/bin/python -m pytest tests/evaluation/test_vllm.py

In the main venv they skip, saying so; the version check and the options run anywhere.
One engine serves the whole module (building one costs a minute or two on a CPU): recipe
A, then B, then A again are swapped into it, and each is scored by a worker of each
backend on the same suite (generation, exact match with a regex filter, a custom scorer,
teacher-forced metrics, multiple choice), with a limit and a fidelity subset.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mergesearch.evaluation import EvaluatorConfig, ObjectiveConfig
from mergesearch.evaluation import vllm_compat as compat
from mergesearch.evaluation.base import EvaluationError
from mergesearch.evaluation.vllm_config import VLLMOptions

ROOT = Path(__file__).resolve().parents[2]
SCORER = "vllm_test_scorers:overlap"
RAISE = "MERGESEARCH_TEST_SCORER_RAISES"


# -- anywhere: the version check and the options ------------------------------------------

@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.3"])
def test_tested_versions_pass(version: str) -> None:
    assert compat.check_version(version) == version


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "not-a-version"])
def test_other_versions_are_refused_clearly(version: str, monkeypatch) -> None:
    monkeypatch.delenv(compat.ANY_VERSION, raising=False)
    with pytest.raises(EvaluationError, match=rf"vllm {version} is installed.*tested with "
                                              r"vllm >=0\.32\.0,<0\.33.*vllm_env\.sh"):
        compat.check_version(version)
    monkeypatch.setenv(compat.ANY_VERSION, "1")
    assert compat.check_version(version) == version


@pytest.mark.parametrize(("block", "match"), [
    ({"engine": {"model": "x"}}, r"engine\.model: set by the backend"),
    ({"engine": {"dtype": "float16"}}, r"execution\.dtype"),
    ({"sampling": {"n": 4, "stop": ["x"]}}, r"sampling\.n: .*sampling\.stop: "),
])
def test_options_the_backend_sets_are_refused(block: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VLLMOptions.model_validate(block)


def test_without_vllm_the_backend_says_where_it_lives() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is importable here")
    from mergesearch.evaluation import make_evaluator
    from mergesearch.zoo import build_tokenizer

    cfg = EvaluatorConfig(backend="vllm", suite=str(ROOT / "evaluators" / "zoo"),
                          objectives=[ObjectiveConfig(name="c", metric="char_accuracy")])
    with pytest.raises(EvaluationError, match=r"needs vllm.*scripts/vllm_env\.sh"):
        make_evaluator(cfg, build_tokenizer())


# -- with a real engine ----------------------------------------------------------------------

VLLM_MISSING = ("vllm is not importable here; it lives in its own venv: bash "
                "scripts/vllm_env.sh, then run this file with .venv-vllm/bin/python -m pytest")


@pytest.mark.slow
def test_the_shipped_experiment_runs_a_search_on_vllm(zoo, tmp_path, monkeypatch) -> None:
    """experiments/zoo/vllm.yaml end to end through ``mergesearch run`` (its own engine,
    built before the module's engine below, so two never run at once)."""
    pytest.importorskip("vllm", reason=VLLM_MISSING)
    from mergesearch.cli import main
    from mergesearch.experiment import Experiment
    from mergesearch.storage import TrialStore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGESEARCH_COMPILE", "0")
    name = ROOT / "experiments" / "zoo" / "vllm.yaml"
    sets = ["budget.evaluations=3", "evaluator.limit=8"]
    assert main(["run", str(name), "-q", *[x for s in sets for x in ("--set", s)]]) == 0
    exp = Experiment.load(name, sets)
    trials = TrialStore.open(exp.storage_url, exp.name).trials()
    assert len(trials) == 3 and all(t.state == "ok" for t in trials)
    assert len({t.values["mean"] for t in trials}) > 1  # three different merges, scored
    assert all(sorted(map(len, t.items.values())) == [8] * 4 for t in trials)  # item ids kept
    assert all(t.tracked for t in trials)  # evaluator.track: greedy_match


def engine_processes() -> list[str]:
    """The names of this process's live vLLM EngineCore children."""
    return [p.name for p in multiprocessing.active_children() if "EngineCore" in p.name]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_workers_each_with_an_engine_score_as_the_local_run(zoo, ray_cluster, tmp_path,
                                                                 monkeypatch) -> None:
    """experiments/zoo/vllm.yaml on two Ray worker actors (each builds its own engine and
    merges into it) records the same scores, candidate by candidate, as one local worker,
    and each run shuts its engines down when it ends."""
    pytest.importorskip("vllm", reason=VLLM_MISSING)
    from mergesearch.controller import run
    from mergesearch.experiment import Experiment
    from mergesearch.storage import TrialStore

    monkeypatch.setenv("MERGESEARCH_COMPILE", "0")
    name = ROOT / "experiments" / "zoo" / "vllm.yaml"
    sets = ["budget.evaluations=6", "evaluator.limit=8", "strategy.name=random"]
    scores = {}
    for where, execution in (("ray", ["execution.backend=ray", "execution.workers=2"]),
                             ("local", [])):
        exp = Experiment.load(name, [*sets, *execution, f"output={tmp_path / where}"])
        summary = run(exp, progress=False)
        assert (summary.finished, summary.ok) == (6, 6), where
        # the run closed its engine: no vLLM engine process of this one is left running
        # (vLLM kills it after a grace period: give the kill a few seconds to land)
        deadline = time.monotonic() + 15
        while engine_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not engine_processes(), where
        trials = TrialStore.open(exp.storage_url, exp.name).trials()
        scores[where] = {tuple(t.params.values()): (t.values, t.items) for t in trials}
    assert len(scores["ray"]) == 6
    assert scores["ray"] == scores["local"]  # same candidates, items and scores in any order


def _write_suite(folder: Path) -> None:
    """Three tasks from the zoo's items: rev (generation, regex filter, custom scorer),
    srt (generation) and a two-choice task over rev's items."""
    folder.mkdir(parents=True)
    (folder / "vllm_test_scorers.py").write_text(textwrap.dedent(f'''
        import os

        def overlap(prediction, target, doc):
            if os.environ.get("{RAISE}"):
                raise ValueError("the scorer refuses " + doc["prompt"])
            return sum(a == b for a, b in zip(prediction, target)) / max(len(target), 1)
    '''))

    def docs(skill: str) -> list[dict]:
        lines = (ROOT / "evaluators" / "zoo" / f"{skill}.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines[:40]]

    def write(name: str, items: list[dict], **fields) -> None:
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in items))
        spec = {"task": name, "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": f"{name}.jsonl"}},
                "test_split": "test", "output_type": "generate_until",
                "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                "target_delimiter": "", "generation_kwargs": {"until": ["<eos>"],
                                                              "max_gen_toks": 12,
                                                              "do_sample": False}} | fields
        (folder / f"{name}.yaml").write_text(json.dumps(spec))

    write("t_rev", docs("rev"),
          metric_list=[{"metric": "exact_match"}, {"metric": "overlap", "scorer": SCORER}],
          filter_list=[{"name": "head", "filter": [{"function": "regex",
                                                    "regex_pattern": "^(..)"}]}])
    write("t_srt", docs("srt"))
    # other generation settings (a stop string, fewer tokens) in the same engine call
    write("t_cut", docs("srt"), generation_kwargs={"until": ["<eos>", "c"], "max_gen_toks": 4,
                                                   "do_sample": False})
    pairs = [[d["answer"], d["prompt"][4:-1]] for d in docs("rev")]  # right, unreversed
    write("t_mc", [{"prompt": d["prompt"], "choices": pair[:: 1 - 2 * (i % 2)], "gold": i % 2}
                   for i, (d, pair) in enumerate(zip(docs("rev"), pairs, strict=True))],
          output_type="multiple_choice", doc_to_choice="choices", doc_to_target="gold",
          target_delimiter=" ")


OBJECTIVES = [
    {"name": "chars", "metric": "char_accuracy", "tasks": ["t_rev", "t_srt"]},
    {"name": "em", "metric": "exact_match", "tasks": ["t_rev", "t_srt"]},
    {"name": "lp", "metric": "answer_logprob", "tasks": ["t_rev"]},
    {"name": "cut", "metric": "exact_match", "tasks": ["t_cut"]},
    {"name": "mc", "metric": "acc_norm", "tasks": ["t_mc"]},
    {"name": "overlap", "metric": "overlap", "tasks": ["t_rev"]},
    {"name": "l2", "metric": "delta_l2", "source": "weights"},
    {"name": "used", "metric": "num_models", "source": "recipe"},
]


def _recipe(zoo, *weights: tuple[str, float]) -> dict:
    return {"method": "task_arithmetic", "base": str(zoo.model_path("base")),
            "models": [{"model": str(zoo.model_path(n)), "parameters": {"weight": w}}
                       for n, w in weights]}


@pytest.fixture(scope="module")
def engines(tmp_path_factory, zoo):
    """(vllm worker, hf worker, recipes) over one suite; the engine is built once."""
    pytest.importorskip("vllm", reason=VLLM_MISSING)
    from mergesearch.execution.worker import WorkerSpec, make_worker

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["MERGESEARCH_COMPILE"] = "0"  # compiling in vLLM's fresh worker costs ~30 s
    suite = tmp_path_factory.mktemp("vllm") / "suite"
    _write_suite(suite)
    sys.path.insert(0, str(suite))  # the custom scorer's module
    recipes = {"A": _recipe(zoo, ("rev", 0.8), ("srt", 0.4)),
               "B": _recipe(zoo, ("dup", 0.9), ("evn", 0.5), ("rev", 0.0)),
               "nan": _recipe(zoo, ("rev", 1e16)),  # finite, huge: NaN logits
               "inf": _recipe(zoo, ("rev", 1e300))}  # inf in float32: the merge overflows
    evaluator = {"suite": str(suite), "limit": 24, "subset_seed": 3, "batch_size": 16,
                 "objectives": OBJECTIVES}
    base = dict(tokenizer=str(zoo.model_path("base")), check_recipe=recipes["A"])
    vllm_worker = make_worker(WorkerSpec(evaluator=evaluator | {
        "backend": "vllm", "vllm": {"engine": {"enforce_eager": True, "max_model_len": 64}}},
        **base))
    hf_worker = make_worker(WorkerSpec(evaluator=evaluator | {"backend": "hf"}, **base))
    yield vllm_worker, hf_worker, recipes
    vllm_worker.evaluator.close()
    sys.path.remove(str(suite))


def _trial(worker, recipe: dict, cid: int = 0, fidelity: float = 1.0, kind: str = "score"):
    from mergesearch.recipe import Recipe
    from mergesearch.trial import Candidate

    return worker.evaluate(Candidate(cid, None, fidelity=fidelity, kind=kind,
                                     recipe=Recipe.from_dict(recipe)))


def _evaluation(worker, recipe: dict):
    """The full Evaluation (per-item scores and generations) of one recipe."""
    from mergesearch.recipe import Recipe

    rec = Recipe.from_dict(recipe)
    if worker.merges_itself:
        return worker.evaluator.evaluate_recipe(rec)
    return worker.evaluator.evaluate(worker.merger.apply(rec))


def _assert_same(v, h) -> None:
    """Same per-item answers; scores equal (log-probabilities to float32 rounding)."""
    assert v.indices == h.indices and v.outputs == h.outputs and v.correct == h.correct
    assert v.item_scores.keys() == h.item_scores.keys()
    for task, metrics in h.item_scores.items():
        for metric, values in metrics.items():
            tol = 1e-5 if metric == "answer_logprob" else 0
            assert v.item_scores[task][metric] == pytest.approx(values, abs=tol), (task, metric)
    for task, scores in h.scores.items():
        assert v.scores[task] == pytest.approx(scores, abs=1e-5), task
    for name, value in h.values.items():
        assert v.values[name] == pytest.approx(value, abs=1e-5), name


@pytest.mark.slow
def test_two_recipes_swapped_into_one_engine_match_hf_and_swap_back_exactly(
        engines, monkeypatch) -> None:
    vllm_worker, hf_worker, recipes = engines
    llm = vllm_worker.evaluator._engine.llm
    calls, generate = [], llm.generate
    monkeypatch.setattr(llm, "generate", lambda prompts, params, **kw: calls.append(params)
                        or generate(prompts, params, **kw))
    first = _evaluation(vllm_worker, recipes["A"])
    # one generation call for the three generating tasks, each prompt with its task's params
    pooled = [p for p in calls if isinstance(p, list)]
    assert len(pooled) == 1 and len(pooled[0]) == 3 * 24
    assert {p.max_tokens for p in pooled[0]} == {12, 4}
    second = _evaluation(vllm_worker, recipes["B"])
    again = _evaluation(vllm_worker, recipes["A"])
    _assert_same(first, _evaluation(hf_worker, recipes["A"]))
    _assert_same(second, _evaluation(hf_worker, recipes["B"]))
    assert first.item_scores != second.item_scores  # the swap changed the answers
    assert first.outputs["t_rev"] != second.outputs["t_rev"]
    # a swap back reproduces the first scoring bit for bit
    assert again.item_scores == first.item_scores and again.outputs == first.outputs
    assert again.values == first.values
    # the suite exercises what it claims: generation, filter, scorer, multiple choice
    assert {"exact_match", "overlap", "char_accuracy"} <= set(first.item_scores["t_rev"])
    assert {"exact_match,head", "overlap"} <= set(first.scores["t_rev"])
    assert all(len(t) <= 4 and "c" not in t for t in first.outputs["t_cut"])
    assert any("c" in t for t in first.outputs["t_srt"])  # the stop string did cut
    assert set(first.item_scores["t_mc"]) == {"acc", "acc_norm"}
    assert 0 < first.values["em"] < 1 and 0 < second.values["chars"] < 1


@pytest.mark.slow
def test_trials_match_hf_items_fidelity_and_extra_objectives(engines) -> None:
    vllm_worker, hf_worker, recipes = engines
    for recipe, fidelity in ((recipes["B"], 1.0), (recipes["A"], 0.5)):
        v, h = _trial(vllm_worker, recipe, fidelity=fidelity), \
            _trial(hf_worker, recipe, fidelity=fidelity)
        assert v.ok and h.ok, (v.reason, h.reason)
        assert v.items == h.items and v.correct == h.correct and v.cost == h.cost
        assert {len(ids) for ids in v.items.values()} == {24 if fidelity == 1 else 12}
        assert v.values.keys() == h.values.keys()
        for name, value in h.values.items():  # l2 from vLLM's worker, num_models here
            assert v.values[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
        assert v.timings["merge"] > 0 and v.timings["evaluate"] > 0
    assert v.values["used"] == 2


@pytest.mark.slow
def test_bad_candidates_fail_their_trial_and_the_engine_goes_on(engines, monkeypatch) -> None:
    vllm_worker, hf_worker, recipes = engines
    reference = _trial(vllm_worker, recipes["A"])
    # NaN logits (finite but huge weights): a failed trial on both backends
    for worker in (vllm_worker, hf_worker):
        nan = _trial(worker, recipes["nan"], cid=1)
        assert not nan.ok and "non-finite objective values" in nan.reason
    # a merge failing half-way through the stream into vLLM's weights
    inf = _trial(vllm_worker, recipes["inf"], cid=2)
    assert not inf.ok and "produced NaN or inf" in inf.reason
    # a model that does not exist: refused before any weight is touched
    missing = _trial(vllm_worker, recipes["A"] | {"base": "/nonexistent/model"}, cid=3)
    assert not missing.ok and "/nonexistent/model" in missing.reason
    # a custom scorer that raises: its message, a failed trial
    monkeypatch.setenv(RAISE, "1")
    raised = _trial(vllm_worker, recipes["A"], cid=4)
    assert not raised.ok and "the scorer refuses" in raised.reason and SCORER in raised.reason
    monkeypatch.delenv(RAISE)
    # probes need the merged model here: refused with the reason
    probe = _trial(vllm_worker, recipes["A"], cid=5, kind="delta_stats")
    assert not probe.ok and "probe 'delta_stats'" in probe.reason
    # the search goes on: the same engine scores A exactly as before
    after = _trial(vllm_worker, recipes["A"], cid=6)
    assert after.ok and after.values == reference.values and after.correct == reference.correct


@pytest.mark.slow
@pytest.mark.parametrize("estimator", [{"kind": "subset", "items": 8},
                                       {"kind": "anchors", "items": 6}])
def test_estimators_predict_the_same_on_both_backends(engines, zoo, estimator) -> None:
    """An estimator scores its items on the engine and predicts as on hf (anchors:
    calibrated on the sources' full-set answers, scored by the hf code in this process)."""
    from mergesearch.evaluation.hf import HFEvaluator
    from mergesearch.evaluation.vllm_backend import VLLMEvaluator
    from mergesearch.recipe import Recipe

    vllm_worker, hf_worker, recipes = engines
    if estimator["kind"] == "anchors":
        estimator |= {"sources": [str(zoo.model_path(n)) for n in ("base", "rev", "srt")]}
    cfg = EvaluatorConfig.model_validate({
        "suite": vllm_worker.evaluator.config.suite, "limit": 24, "subset_seed": 3,
        "objectives": [o for o in OBJECTIVES if o.get("source") is None],
        "estimator": estimator, "backend": "vllm"})
    mine = VLLMEvaluator(cfg, vllm_worker.tokenizer)
    mine._engine = vllm_worker.evaluator._engine  # the module's engine, not a second one
    theirs = HFEvaluator(cfg.model_copy(update={"backend": "hf"}), hf_worker.tokenizer)
    recipe = Recipe.from_dict(recipes["B"])
    v = mine.evaluate_recipe(recipe)
    h = theirs.evaluate(hf_worker.merger.apply(recipe))
    assert v.estimate["items"] == h.estimate["items"] and v.indices == h.indices
    assert v.estimate["predicted"] == pytest.approx(h.estimate["predicted"], abs=1e-5)
    # (the module's engine also reduces its weight objective, l2: not one of these)
    assert {k: v.values[k] for k in h.values} == pytest.approx(h.values, abs=1e-5)


@pytest.mark.slow
def test_sequences_longer_than_the_engine_takes_are_refused_at_start(engines) -> None:
    evaluator = engines[0].evaluator
    evaluator._check_lengths(64)  # the suite fits the engine it runs on
    with pytest.raises(EvaluationError, match=r"task 't_\w+' needs sequences of \d+ tokens.*"
                                              r"max_model_len 10: raise evaluator\.vllm"):
        evaluator._check_lengths(10)


@pytest.mark.slow
def test_another_architecture_is_refused(engines, tiny) -> None:
    vllm_worker, _, _ = engines
    other = {"method": "linear", "models": [{"model": tiny.base, "parameters": {"weight": 1}}]}
    result = _trial(vllm_worker, other, cid=7)
    assert not result.ok and "another architecture" in result.reason
    assert math.isfinite(_trial(vllm_worker, engines[2]["B"], cid=8).values["chars"])
