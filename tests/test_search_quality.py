"""Does searching pay? CMA-ES on the zoo against the uniform merge and every expert."""

from __future__ import annotations

import pytest

from mergesearch.controller import run
from mergesearch.evaluation import EvaluatorConfig, ObjectiveConfig, make_evaluator
from mergesearch.experiment import Experiment
from mergesearch.models.resident import ResidentMerger
from mergesearch.recipe import Recipe, uniform_recipe
from mergesearch.storage import TrialStore

SKILLS = ("rev", "srt", "dup", "evn")


@pytest.mark.slow
def test_cmaes_beats_the_uniform_merge_and_every_expert(zoo, tmp_path):
    exp = Experiment.from_dict({
        "name": "quality",
        "models": {"base": "zoo:base", "sources": {s: f"zoo:{s}" for s in SKILLS}},
        "space": "search_spaces/task_arithmetic_layers.yaml",
        "strategy": {"name": "cmaes", "options": {"popsize": 8, "sigma0": 0.2}},
        "evaluator": {"suite": "evaluators/zoo", "limit": 64, "subset_seed": 1,
                      "objectives": [{"name": "mean", "metric": "char_accuracy"}]},
        "budget": {"evaluations": 48},
        "output": str(tmp_path / "run"),
        "seed": 0,
    })
    summary = run(exp, progress=False)
    assert summary.ok == 48
    (best,) = TrialStore.open(exp.storage_url, "quality").pareto_front()

    # Judge on every held-out item (the search saw 64 of 200 per skill).
    full = make_evaluator(
        EvaluatorConfig(suite="evaluators/zoo",
                        objectives=[ObjectiveConfig(name="mean", metric="char_accuracy")]),
        zoo.load_tokenizer())
    merger = ResidentMerger()
    found = full.evaluate(merger.apply(Recipe.from_dict(best.recipe))).values["mean"]
    uniform = uniform_recipe("task_arithmetic", str(zoo.base),
                             [str(zoo.experts[s]) for s in SKILLS], weight=0.5)
    baseline = full.evaluate(merger.apply(uniform)).values["mean"]
    experts = {s: full.evaluate(zoo.load_model(s)).values["mean"] for s in SKILLS}
    print(f"cmaes {found:.4f}  uniform {baseline:.4f}  experts {experts}")
    assert found > baseline + 0.01
    assert all(found > v for v in experts.values())
