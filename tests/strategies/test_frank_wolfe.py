"""Frank-Wolfe merging: the step formula, the oracle, hard and soft variants on synthetic
probe payloads, the oracle's pick on the real zoo, and a SIGKILL mid-run that resumes
with the same iterate and the same told cosines as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import kill_mid_run

from mergesearch.execution.fw_probe import PROBE as PROBE_PATH
from mergesearch.recipe import Recipe
from mergesearch.strategies import Dimension, Objective, Problem
from mergesearch.strategies.frank_wolfe import (
    PROBE,
    FrankWolfe,
    fw_gamma,
    hard_step,
    oracle,
    soft_step,
)
from mergesearch.trial import Candidate, Result

ROOT = Path(__file__).resolve().parents[2]
POOL = ["m/a", "m/b", "m/c"]
# "layers.1.w" is inside "layers.11.w"'s name and "norm" inside "layers.1.norm"
TENSORS = ["layers.1.w", "layers.11.w", "norm", "layers.1.norm"]


def pool_problem() -> Problem:
    def decode(genome):
        return Recipe.from_dict({"method": "task_arithmetic", "base": "m/base",
                                 "models": [{"model": m, "parameters": {"weight": float(g)}}
                                            for m, g in zip(POOL, genome, strict=True)]})
    return Problem(tuple(Dimension(f"w{i}", 0.0, 1.0, 0.3) for i in range(len(POOL))),
                   (Objective("acc", "maximize"),), decode=decode)


def payload(cos_total, per_task=None) -> dict:
    """A probe answer with cosines [sources][tensors] for the summed gradient (and tasks)."""
    cos = {"total": cos_total, **(per_task or {})}
    return {"keys": [*(per_task or {}), "total"], "sources": POOL, "tensors": TENSORS,
            "cos": cos, "dot": cos, "loss": {"total": 1.0}, "items": 4}


def weights(recipe: Recipe) -> np.ndarray:
    """Coefficients [sources, tensors] the recipe resolves to (0 where a source is absent)."""
    out = np.zeros((len(POOL), len(TENSORS)))
    for i, m in enumerate(recipe.models):
        for p, name in enumerate(TENSORS):
            out[POOL.index(m.model), p] = recipe.resolve("weight", name, 0.0, i)
    return out


def test_step_formula():
    assert [fw_gamma(t, 0.1) for t in range(3)] == pytest.approx([0.1, 0.1 * 2 / 3, 0.05])
    c, v = np.array([[0.2], [0.4]]), np.array([[1.0], [0.0]])
    assert hard_step(c, v, 0.5, 0.3) == pytest.approx(c + 0.15 * (v - c))
    out = soft_step(c, [v, 1 - v], np.array([0.3, 0.6]), 0.5)
    assert out == pytest.approx(c + 0.5 * (np.array([[0.3], [0.6]]) - c))
    cos = np.array([[0.1, -0.5], [-0.2, 0.1], [0.0, 0.3]])
    assert oracle(cos, "task").tolist() == [[1, 1], [0, 0], [0, 0]]  # sums: -0.4, -0.1, 0.3
    assert oracle(cos, "layer").tolist() == [[0, 1], [1, 0], [0, 0]]
    # the base as one more vertex, scored -0.15 / -0.3 per tensor
    assert oracle(cos, "layer", -0.15).tolist() == [[0, 1], [1, 0], [0, 0]]
    assert oracle(cos, "layer", -0.3).tolist() == [[0, 1], [0, 0], [0, 0]]  # base: col 0
    assert oracle(cos, "task", -0.3).tolist() == [[0, 0], [0, 0], [0, 0]]  # -0.6 < -0.4


def run_iteration(s: FrankWolfe, cos, acc=0.5, per_task=None):
    (probe,) = s.ask(4)
    assert probe.kind == PROBE == PROBE_PATH
    assert probe.meta["pool"] == POOL and probe.meta["base"] == "m/base"
    s.tell([Result(probe.id, payload=payload(cos, per_task))])
    scored = s.ask(8)
    s.tell([Result(c.id, {"acc": acc + 0.01 * k}) for k, c in enumerate(scored)])
    return probe, scored


def test_hard_variant_moves_toward_the_oracles_pick_at_task_granularity():
    s = FrankWolfe(pool_problem(), {"step_size": 1.0, "scaling": 0.5}, seed=0)
    favour_b = [[0.2] * 4, [-0.3] * 4, [0.1] * 4]
    c = np.zeros((3, 1))
    for t in range(3):
        probe, (scored,) = run_iteration(s, favour_b)
        assert scored.kind == "score" and scored.meta["iteration"] == t
        c = c + fw_gamma(t, 1.0) * 0.5 * (np.array([[0.0], [1.0], [0.0]]) - c)
        assert weights(scored.recipe) == pytest.approx(np.repeat(c, 4, axis=1))
    assert s.c[1, 0] > 0.4 and s.c[0, 0] == s.c[2, 0] == 0.0
    assert s.history[0]["picks"] == [["m/b"]]
    (probe,) = s.ask(2)  # the next probe is at the iterate just scored
    assert probe.kind == PROBE and probe.recipe.to_dict() == scored.recipe.to_dict()


def test_hard_variant_at_layer_granularity_picks_per_tensor():
    s = FrankWolfe(pool_problem(), {"granularity": "layer", "step_size": 1.0, "scaling": 1.0})
    cos = [[-0.9, 0.1, 0.1, 0.0], [0.1, -0.9, 0.1, 0.0], [0.1, 0.1, -0.9, -0.5]]
    _, (scored,) = run_iteration(s, cos)
    # gamma_0 * scaling = 1: the iterate is the per-tensor pick itself
    assert weights(scored.recipe).tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    _, (scored,) = run_iteration(s, [[-1.0] * 4, [0.0] * 4, [0.0] * 4])
    g = fw_gamma(1, 1.0)
    assert weights(scored.recipe)[0] == pytest.approx([1, g, g, g])


def test_by_default_a_source_must_align_by_min_cosine_else_the_tensor_keeps_the_base():
    # tensor 1: the best cosine is -0.05, above the default -min_cosine = -0.1
    cos = [[-0.5, -0.05, 0.1, 0.0], [0.1, 0.02, -0.4, 0.0], [0.1, 0.1, 0.1, -0.3]]
    opts = {"granularity": "layer", "step_size": 1.0, "scaling": 1.0}
    s = FrankWolfe(pool_problem(), opts)
    assert s.base_vertex and s.options.min_cosine == 0.1
    # at task granularity the default leaves the base out: one pick by the summed cosine
    assert not FrankWolfe(pool_problem(), {}).base_vertex
    _, (scored,) = run_iteration(s, cos)
    assert weights(scored.recipe).tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert s.history[0]["picks"] == [["base", "m/a", "m/b", "m/c"]]
    plain = FrankWolfe(pool_problem(), opts | {"base_vertex": False})  # the paper's argmin
    _, (scored,) = run_iteration(plain, cos)
    assert weights(scored.recipe).tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_soft_variant_searches_coefficients_over_one_pick_per_task():
    s = FrankWolfe(pool_problem(), {"variant": "soft", "step_size": 1.0, "scaling": 0.4,
                                    "soft_trials": 3}, seed=1)
    tasks = {"ta": [[-1.0] * 4, [0.0] * 4, [0.0] * 4], "tb": [[0.0] * 4, [0.0] * 4, [-1.0] * 4]}
    _, scored = run_iteration(s, [[0.0] * 4] * 3, per_task=tasks)
    assert len(scored) == 3 and {c.meta["role"] for c in scored} == {"soft"}
    first = weights(scored[0].recipe)[:, 0]
    assert first == pytest.approx([0.4, 0.0, 0.4])  # every a_k = scaling, gamma_0 = 1
    others = [weights(c.recipe)[:, 0] for c in scored[1:]]
    assert all(w[1] == 0 and 0 <= w[0] <= 0.8 and 0 <= w[2] <= 0.8 for w in others)
    assert s.c[:, 0] == pytest.approx(others[-1])  # the best scored (the last: +0.02)
    assert s.t == 1


def test_guard_rejects_a_step_whose_scored_merge_is_worse_than_the_iterate():
    favour_b = [[0.2] * 4, [-0.3] * 4, [0.1] * 4]
    opts = {"step_size": 1.0, "scaling": 0.5}
    tasks = {"ta": favour_b}  # the soft variant picks per task
    for variant in ("hard", "soft"):
        guarded = FrankWolfe(pool_problem(), opts | {"variant": variant, "guard": True})
        plain = FrankWolfe(pool_problem(), opts | {"variant": variant})
        for s in (guarded, plain):  # the first step: nothing to compare with
            run_iteration(s, favour_b, acc=0.8, per_task=tasks)
        kept = guarded.c.copy()
        assert kept[1, 0] > 0 and guarded.c == pytest.approx(plain.c)
        for s in (guarded, plain):  # every candidate below the iterate's 0.8
            run_iteration(s, favour_b, acc=0.5, per_task=tasks)
        assert guarded.c == pytest.approx(kept) and guarded.history[-1]["rejected"]
        assert guarded.t == 2 and plain.c[1, 0] > kept[1, 0]  # the plain loop stepped on
        (probe,) = guarded.ask(1)  # the kept iterate is probed again
        assert weights(probe.recipe)[:, 0] == pytest.approx(kept[:, 0])
        guarded.tell([Result(probe.id, payload=payload(favour_b, tasks))])
        scored = guarded.ask(8)
        guarded.tell([Result(c.id, {"acc": 0.9}) for c in scored])  # better: taken
        assert guarded.c[1, 0] > kept[1, 0] and "rejected" not in guarded.history[-1]


def test_evaluations_counts_probes_and_the_search_stops():
    s = FrankWolfe(pool_problem(), {"iterations": 50, "evaluations": 8, "probe_cost": 3.0})
    n = 0
    while not s.done:
        run_iteration(s, [[0.0] * 4, [-1.0] * 4, [0.0] * 4])
        n += 1
    assert n == 2 and s.spent == 8 and s.ask(3) == []


def test_ties_option_nests_the_iterate_and_trims_the_step():
    s = FrankWolfe(pool_problem(), {"step_size": 1.0, "scaling": 0.5, "ties_density": 0.2})
    _, (scored,) = run_iteration(s, [[0.0] * 4, [-1.0] * 4, [0.0] * 4])
    r = scored.recipe
    assert r.method == "ties" and r.base.startswith("recipe:")
    assert r.models[0].model == "m/b" and r.parameters["lambda"] == 0.5
    assert r.models[0].parameters["density"] == 0.2
    (probe,) = s.ask(1)
    assert probe.recipe.to_dict() == r.to_dict()  # the next probe is at the trimmed step


@pytest.mark.slow
def test_the_oracle_picks_the_expert_of_the_objectives_skill(zoo):
    """At the base, on one skill's proxy items, the summed cosine is least for its expert."""
    from mergesearch.execution.worker import Worker, WorkerSpec

    refs = [str(zoo.experts[k]) for k in zoo.skills]
    for skill in ("rev", "dup"):
        worker = Worker(WorkerSpec(tokenizer=str(zoo.base), evaluator={
            "suite": str(ROOT / "evaluators/zoo"), "tasks": [f"zoo_{skill}"],
            "objectives": [{"name": "m", "metric": "char_accuracy"}]}))

        def decode(genome, refs=refs):
            return Recipe.from_dict({"method": "task_arithmetic", "base": str(zoo.base),
                                     "models": [{"model": m, "parameters": {"weight": 0.0}}
                                                for m in refs]})
        problem = Problem(tuple(Dimension(f"w{i}", 0.0, 1.0, 0.3) for i in range(4)),
                          (Objective("m", "maximize"),), decode=decode)
        s = FrankWolfe(problem, {"proxy_items": 16, "step_size": 1.0})
        (probe,) = s.ask(1)
        s.tell([worker.evaluate(probe)])
        (scored,) = s.ask(1)
        assert s.history[0]["picks"] == [[str(zoo.experts[skill])]]
        assert [m.model for m in scored.recipe.models] == [str(zoo.experts[skill])]
        at_base = Candidate(id=7, genome=None, recipe=probe.recipe)
        assert worker.evaluate(scored).values["m"] > worker.evaluate(at_base).values["m"]


def fw_experiment(tmp_path: Path, name: str) -> Path:
    data = yaml.safe_load((ROOT / "experiments/zoo/frank_wolfe.yaml").read_text())
    data["strategy"]["options"] = {"variant": "hard", "granularity": "layer",
                                   "iterations": 4, "step_size": 1.0, "scaling": 0.5,
                                   "proxy_items": 8}
    data["evaluator"]["limit"] = 16
    data.pop("report")
    data["budget"] = {"evaluations": 10}
    data["output"] = str(tmp_path / name)
    data["space"] = str(ROOT / data["space"])
    data["evaluator"]["suite"] = str(ROOT / data["evaluator"]["suite"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
def test_killed_mid_run_resumes_with_the_same_iterate_and_cosines(zoo, tmp_path):
    from mergesearch.cli import main
    from mergesearch.controller import BoundExperiment
    from mergesearch.experiment import Experiment
    from mergesearch.storage import TrialStore

    path = fw_experiment(tmp_path, "killed")
    db = tmp_path / "killed" / "study.db"
    kill_mid_run(path, db, 4)  # trials and probes together: inside the second iteration
    killed = TrialStore.open(f"sqlite:///{db}", "zoo-frank-wolfe")
    before = [p.payload for p in killed.probes()]
    assert before and all(p is not None for p in before)
    assert main(["run", str(path), "--resume", "-q"]) == 0
    assert main(["run", str(fw_experiment(tmp_path, "whole")), "-q"]) == 0
    runs = {}
    for name in ("killed", "whole"):
        store = TrialStore.open(f"sqlite:///{tmp_path / name / 'study.db'}", "zoo-frank-wolfe")
        bound = BoundExperiment(Experiment.load(tmp_path / f"{name}.yaml"), progress=False)
        s = FrankWolfe(bound.problem)
        s.load_state_dict(store.load_state())
        runs[name] = (s, store)
    (a, sa), (b, sb) = runs["killed"], runs["whole"]
    assert a.t == b.t == 4 and a.done and b.done
    assert np.array_equal(a.c, b.c)  # the FW iterate
    assert json.dumps(a.cosines) == json.dumps(b.cosines)  # every told payload
    assert a.history == b.history
    assert [p.payload for p in sa.probes()][:len(before)] == before  # kept through the kill
    assert [t.recipe for t in sa.trials()] == [t.recipe for t in sb.trials()]
    assert [t.values for t in sa.trials()] == [t.values for t in sb.trials()]


def drive_fw(worker, problem: Problem, options: dict) -> tuple[FrankWolfe, float]:
    """Run frank_wolfe to the end against an in-process worker; the best iterate's score."""
    s = FrankWolfe(problem, options)
    best = -np.inf
    while not s.done:
        results = [worker.evaluate(c) for c in s.ask(8)]
        best = max([best, *(r.values["mean"] for r in results if r.values)])
        s.tell(results)
    return s, best


@pytest.mark.slow
def test_distractors_in_the_pool_leave_the_merge_within_a_small_margin(zoo, tmp_path):
    """Objective: rev and dup.  Distractors: the experts of the two other skills and noisy
    copies of both relevant experts (built here, in a temporary folder)."""
    import sys

    from mergesearch.execution.worker import Worker, WorkerSpec

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from frank_wolfe import noisy_copy

    worker = Worker(WorkerSpec(tokenizer=str(zoo.base), evaluator={
        "suite": str(ROOT / "evaluators/zoo"), "tasks": ["zoo_rev", "zoo_dup"], "limit": 32,
        "objectives": [{"name": "mean", "metric": "char_accuracy"}]}))
    clean = [str(zoo.experts["rev"]), str(zoo.experts["dup"])]
    noisy = [str(noisy_copy(zoo.experts[k], tmp_path / f"{k}_noisy", seed=i))
             for i, k in enumerate(("rev", "dup"))]
    distracted = [clean[0], str(zoo.experts["srt"]), noisy[0], clean[1],
                  str(zoo.experts["evn"]), noisy[1]]
    options = {"granularity": "layer", "iterations": 4, "step_size": 1.0, "scaling": 0.5,
               "proxy_items": 32}
    runs = {}
    for name, refs in (("clean", clean), ("distracted", distracted)):
        def decode(genome, refs=refs):
            return Recipe.from_dict({"method": "task_arithmetic", "base": str(zoo.base),
                                     "models": [{"model": m, "parameters": {"weight": 0.0}}
                                                for m in refs]})
        problem = Problem(tuple(Dimension(f"w{i}", 0.0, 1.0, 0.3) for i in range(len(refs))),
                          (Objective("mean", "maximize"),), decode=decode)
        runs[name] = drive_fw(worker, problem, options)
    (s_clean, clean_best), (s_dist, dist_best) = runs["clean"], runs["distracted"]
    base = worker.evaluate(Candidate(id=99, genome=None, recipe=Recipe.from_dict(
        s_clean._coefficients_recipe(np.zeros((2, 1)))))).values["mean"]
    assert clean_best > base + 0.05  # the search does something
    assert dist_best >= clean_best - 0.03
    # the per-tensor oracle does use the other skills' experts here and there (they share
    # the answer format), but the noisy copies get little: their cosines are diluted
    mass = np.abs(s_dist.c).sum(axis=1)
    share = {r: m / mass.sum() for r, m in zip(distracted, mass, strict=True)}
    assert sum(share[r] for r in noisy) < 0.25
    assert sum(share[r] for r in clean) > max(share[r] for r in distracted if r not in clean)
