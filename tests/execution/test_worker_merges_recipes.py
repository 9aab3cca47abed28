"""The worker's hook for evaluators that merge recipes themselves (the vllm backend's way),
exercised with an hf evaluator that merges in its own merger: same results as the
ordinary worker, no models held by the worker, probes refused, failures contained."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergesearch.execution.worker as worker_module
from mergesearch.evaluation.hf import HFEvaluator
from mergesearch.execution.worker import Worker, WorkerSpec
from mergesearch.models.resident import ResidentMerger
from mergesearch.objectives import weight_sink
from mergesearch.recipe import Recipe
from mergesearch.trial import Candidate

ROOT = Path(__file__).resolve().parents[2]


class SelfMerging(HFEvaluator):
    """Merges each recipe in a merger of its own, as the vLLM worker extension does."""

    merges_recipes = True
    started: list = []

    def start(self, spec: WorkerSpec, objectives) -> None:
        self.merger = ResidentMerger(device=spec.device, hold=spec.hold_sources)
        self.extra_objectives = list(objectives)  # what weight_sink reads
        self.started.append((spec, [o.name for o in objectives]))
        self.timings = {}

    def evaluate_recipe(self, recipe: Recipe, *, fidelity: float, seed: int):
        if recipe.seed == 99:
            raise RuntimeError("the engine says no")
        weights = weight_sink(self, recipe)
        model = self.merger.apply(recipe, also=weights)
        out = self.evaluate(model, fidelity=fidelity, seed=seed)
        out.values |= weights.reducer.values()
        self.timings = {"merge": 0.5, "evaluate": 0.25}
        return out


@pytest.fixture
def spec(zoo) -> WorkerSpec:
    recipe = {"method": "task_arithmetic", "base": str(zoo.model_path("base")),
              "models": [{"model": str(zoo.model_path(n)), "parameters": {"weight": w}}
                         for n, w in (("rev", 0.7), ("srt", 0.3))]}
    return WorkerSpec(tokenizer=str(zoo.model_path("base")), check_recipe=recipe, evaluator={
        "backend": "hf", "suite": str(ROOT / "evaluators" / "zoo"), "limit": 6,
        "tasks": ["zoo_rev"],
        "objectives": [{"name": "chars", "metric": "char_accuracy"},
                       {"name": "l1", "metric": "delta_l1", "source": "weights"},
                       {"name": "used", "metric": "num_models", "source": "recipe"}]})


@pytest.fixture
def self_merging(spec, monkeypatch) -> Worker:
    def make(config, tokenizer, **options):
        return SelfMerging(config, tokenizer, **options)

    monkeypatch.setattr(worker_module, "make_evaluator", make)
    monkeypatch.setenv("MERGESEARCH_COMPILE", "0")  # a compile costs seconds, changes nothing
    SelfMerging.started.clear()
    return Worker(spec)


def _candidate(spec: WorkerSpec, cid: int = 0, **changes) -> Candidate:
    kind = changes.pop("kind", "score")
    fidelity = changes.pop("fidelity", 1.0)
    return Candidate(cid, None, fidelity=fidelity, kind=kind,
                     recipe=Recipe.from_dict(spec.check_recipe | changes))


def test_the_evaluator_gets_the_recipe_and_the_worker_holds_no_models(spec, self_merging):
    assert self_merging.merger is None and self_merging.merges_itself
    assert SelfMerging.started == [(spec, ["l1"])]  # started once, with the weight objectives
    ordinary = Worker(spec)
    for fidelity in (1.0, 0.5):
        mine = self_merging.evaluate(_candidate(spec, fidelity=fidelity))
        theirs = ordinary.evaluate(_candidate(spec, fidelity=fidelity))
        assert mine.ok and theirs.ok
        assert mine.values == pytest.approx(theirs.values, rel=1e-6)
        assert set(mine.values) == {"chars", "l1", "used"} and mine.values["used"] == 2
        assert mine.items == theirs.items and mine.correct == theirs.correct
        assert mine.scores == theirs.scores and mine.cost == theirs.cost
        assert mine.timings == {"merge": 0.5, "evaluate": 0.25}


def test_probes_and_failing_evaluations_fail_their_trial_only(spec, self_merging):
    probe = self_merging.evaluate(_candidate(spec, kind="delta_stats"))
    assert not probe.ok and "probe 'delta_stats'" in probe.reason and "backend hf" in probe.reason
    failed = self_merging.evaluate(_candidate(spec, 1, seed=99))
    assert not failed.ok and failed.reason == "RuntimeError: the engine says no"
    assert self_merging.evaluate(_candidate(spec, 2)).ok
