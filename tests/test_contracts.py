"""The second-round contracts end to end: strategies that propose recipes or issue probes,
typed variables, and everything a strategy consumes surviving a kill.

Two test strategies (tests/contract_strategies.py) run through the real controller, are
SIGKILLed mid-run, resumed, and then see exactly what storage recorded: the correctness
vectors with their item ids, the probes' payloads, the metadata of each proposal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from contract_strategies import ArchiveCrossover, Prober
from helpers import completed_count, kill_mid_run, zoo_experiment

from mergesearch.controller import BoundExperiment, run
from mergesearch.experiment import Experiment
from mergesearch.storage import TrialStore
from mergesearch.trial import pack_bits, pack_ids

ROOT = Path(__file__).resolve().parents[1]
CROSSOVER = "contract_strategies:ArchiveCrossover"
PROBER = "contract_strategies:Prober"


def experiment(tmp_path: Path, strategy: str, name: str = "t", **changes) -> Experiment:
    changes = {"budget": {"evaluations": 8}, "evaluator__limit": 32} | changes
    return zoo_experiment(tmp_path, name=name, strategy={"name": strategy},
                          output=str(tmp_path / name), **changes)


def replayed(exp: Experiment, study: str = "t"):
    """The strategy as rebuilt from the study's saved state, and the study's records."""
    store = TrialStore.open(exp.storage_url, study)
    search = BoundExperiment(exp, progress=False)
    search.strategy.load_state_dict(store.load_state())
    return search.strategy, store.trials(), store.probes()


def check_seen_is_recorded(strategy, trials, probes) -> None:
    """What the rebuilt strategy saw is exactly what storage holds, for every candidate."""
    recorded = {r.candidate_id: r for r in [*trials, *probes]}
    assert set(strategy.seen) == set(recorded)  # nothing told that was not written
    for cid, seen in strategy.seen.items():
        r = recorded[cid]
        assert seen["status"] == ("ok" if r.state == "ok" else "failed")
        assert seen["payload"] == r.payload
        assert seen["values"] == pytest.approx(r.values)
        if strategy.uses_items:
            assert seen["correct"] == {t: pack_bits(v) for t, v in r.correct.items()}
            assert seen["items"] == {t: pack_ids(v) for t, v in r.items.items()}
            assert seen["correct"] and all(seen["items"].values())
        else:  # a strategy that does not declare it is not told (live or replayed alike)
            assert seen["correct"] == {}


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_recipe_proposals_run_are_recorded_with_their_metadata(zoo, tmp_path):
    exp = experiment(tmp_path, CROSSOVER)
    summary = run(exp, progress=False)
    assert summary.finished == 8 and summary.ok == 8
    strategy, trials, probes = replayed(exp)
    assert probes == []
    children = [t for t in trials if "parents" in t.meta]
    seeds = [t for t in trials if t.meta == {"role": "seed"}]
    assert len(seeds) == 3 and len(children) == 5
    for t in children:
        assert t.params == {}  # a recipe the strategy built: no point of the space
        a, b = (next(s for s in trials if s.candidate_id == p) for p in t.meta["parents"])
        w = [m["parameters"]["weight"] for m in t.recipe["models"]]
        wa = [m["parameters"]["weight"] for m in a.recipe["models"]]
        wb = [m["parameters"]["weight"] for m in b.recipe["models"]]
        # each child weight lies between its parents' (a convex combination)
        assert all(min(x, y) - 1e-12 <= z <= max(x, y) + 1e-12
                   for z, x, y in zip(w, wa, wb, strict=True))
    check_seen_is_recorded(strategy, trials, probes)


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_probes_are_recorded_but_are_not_trials(zoo, tmp_path):
    exp = experiment(tmp_path, PROBER)
    summary = run(exp, progress=False)
    # the 8th trial spends the budget: the probe after it is never asked for
    assert (summary.finished, summary.ok, summary.probes) == (8, 8, 7)
    assert len(summary.front) <= 8 and all(t.kind == "score" for t in summary.front)
    strategy, trials, probes = replayed(exp)
    assert len(trials) == 8 and len(probes) == 7
    for p in probes:
        scored = next(t for t in trials if t.candidate_id == p.meta["probe_of"])
        assert p.params == scored.params and p.kind == "delta_stats"
        assert p.payload["l2"] > 0 and 0 <= p.payload["zeros"] <= 1
        assert set(p.payload["tensors"]) >= {"model.embed_tokens.weight"}
    check_seen_is_recorded(strategy, trials, probes)
    # status counts trials only
    from mergesearch.cli import main

    assert main(["status", str(_write(tmp_path, exp))]) == 0


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_a_probe_payload_matches_an_independent_computation(zoo, tmp_path):
    import torch

    from mergesearch.models.resident import merge
    from mergesearch.recipe import Recipe

    exp = experiment(tmp_path, PROBER, budget={"evaluations": 2})
    run(exp, progress=False)
    store = TrialStore.open(exp.storage_url, "t")
    (probe,) = store.probes()
    merged = merge(Recipe.from_dict(probe.recipe)).state_dict()
    from helpers import state

    base = state(str(zoo.base))
    deltas = {n: merged[n].float() - base[n].float() for n in base}
    l2 = float(torch.sqrt(sum(d.square().sum() for d in deltas.values())))
    assert probe.payload["l2"] == pytest.approx(l2, rel=1e-5)
    name = "model.layers.0.mlp.up_proj.weight"
    assert probe.payload["tensors"][name]["l2"] == pytest.approx(
        float(deltas[name].norm()), rel=1e-5)


def _write(tmp_path: Path, exp: Experiment) -> Path:
    path = tmp_path / f"{exp.name}.yaml"
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json", exclude_none=True),
                                   sort_keys=False))  # source order is the genome's layout
    return path


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [CROSSOVER, PROBER])
def test_killed_and_resumed_the_strategy_sees_what_it_saw(zoo, tmp_path, strategy):
    exp = experiment(tmp_path, strategy, budget={"evaluations": 12})
    db = Path(exp.storage_url.removeprefix("sqlite:///"))
    kill_mid_run(_write(tmp_path, exp), db, after=5)
    assert 5 <= completed_count(db) < 12
    summary = run(exp, progress=False)  # resume in this process
    assert summary.finished == 12
    strategy_after, trials, probes = replayed(exp)
    assert sorted(t.candidate_id for t in [*trials, *probes]) == \
        list(range(len(trials) + len(probes)))  # every asked candidate recorded once
    check_seen_is_recorded(strategy_after, trials, probes)
    # and it is the search an uninterrupted run makes
    straight = experiment(tmp_path, strategy, name="straight", budget={"evaluations": 12})
    run(straight, progress=False)
    reference, _, _ = replayed(straight, "straight")
    assert strategy_after.seen.keys() == reference.seen.keys()
    for cid, seen in reference.seen.items():
        assert strategy_after.seen[cid]["correct"] == seen["correct"]
        assert strategy_after.seen[cid]["items"] == seen["items"]
        assert (strategy_after.seen[cid]["payload"] is None) == (seen["payload"] is None)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("strategy", [CROSSOVER, PROBER])
def test_on_ray_killed_and_resumed_nothing_is_lost(zoo, ray_cluster, tmp_path, strategy):
    address = ray_cluster.get_runtime_context().gcs_address
    exp = experiment(tmp_path, strategy, budget={"evaluations": 12},
                     execution={"backend": "ray", "workers": 2, "address": address})
    db = Path(exp.storage_url.removeprefix("sqlite:///"))
    kill_mid_run(_write(tmp_path, exp), db, after=5, env={"RAY_AUTH_MODE": "disabled"})
    summary = run(exp, progress=False)
    assert summary.finished == 12
    strategy_after, trials, probes = replayed(exp)
    assert sorted(t.candidate_id for t in [*trials, *probes]) == \
        list(range(len(trials) + len(probes)))
    check_seen_is_recorded(strategy_after, trials, probes)


# -- typed variables and proposals, without models ---------------------------------------

def test_contract_strategies_are_found_by_import_path_without_registering():
    from mergesearch.strategies import get_strategy, strategies

    assert get_strategy(CROSSOVER) is ArchiveCrossover and get_strategy(PROBER) is Prober
    assert ArchiveCrossover.name not in strategies()
