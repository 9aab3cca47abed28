"""mergekit-evolve configs (``genome:`` + ``tasks:``) run unchanged: the mapping onto an
experiment (quick: no model is loaded), its genome against mergekit-evolve's own, and a
short search from the command line over the tiny zoo."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mergesearch.experiment import Experiment, ExperimentError
from mergesearch.mergekit_evolve import (
    EvolveConfigError,
    experiment_from_evolve_config,
    is_evolve_config,
    map_evolve_config,
    split_overrides,
)
from mergesearch.spaces.parameters import SearchSpace, SpaceConfig

ROOT = Path(__file__).resolve().parents[1]
ZOO_TASKS = ROOT / "evaluators" / "zoo"


def evolve_config(**changes) -> dict:
    """A mergekit-evolve config as its documentation writes one (paths need not exist:
    the mapping opens no model)."""
    data = {
        "genome": {"models": ["/m/rev", "/m/srt"], "merge_method": "dare_ties",
                   "base_model": "/m/base", "layer_granularity": 2},
        "tasks": [{"name": "zoo_rev", "metric": "exact_match,none"},
                  {"name": "zoo_srt", "metric": "exact_match,none"}],
        "task_search_path": str(ZOO_TASKS),
    }
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return data


def mapped(**changes):
    return map_evolve_config(evolve_config(**changes), name="evo", where="evo.yml")


def bind(space: dict, sources: dict[str, str], num_layers: int = 4) -> SearchSpace:
    return SearchSpace(SpaceConfig.load(space), base="/m/base", sources=sources,
                       num_layers=num_layers)


def test_a_dare_ties_genome_maps_onto_models_space_evaluator_and_sakana_ps():
    m = mapped()
    exp = m.experiment
    assert exp["models"] == {"base": "/m/base", "sources": {"rev": "/m/rev", "srt": "/m/srt"}}
    assert exp["strategy"] == {"name": "sakana_ps",
                               "options": {"sigma0": pytest.approx(1 / 12),
                                           "include_init": False}}
    assert exp["budget"] == {"evaluations": 100}  # mergekit-evolve's --max-fevals default
    ev = exp["evaluator"]
    assert Path(ev["suite"]) == ZOO_TASKS and ev["tasks"] == ["zoo_rev", "zoo_srt"]
    # equal weights and one metric: mergekit-evolve's score (a sum) as one mean
    assert ev["objectives"] == [{"name": "score", "metric": "exact_match",
                                 "tasks": ["zoo_rev", "zoo_srt"], "direction": "maximize"}]
    Experiment.from_dict(exp)  # a valid experiment

    space = bind(exp["space"], exp["models"]["sources"])
    # mergekit-evolve's genome: groups x models x params = 2 x 2 x 2
    assert [d.name for d in space.dims] == [
        f"{p}[{s}]@L{g}" for p in ("weight", "density") for s in ("rev", "srt")
        for g in ("0-1", "2-3")]
    start = space.start  # its start point: weight 1/N, density 1, normalize on
    assert start.method == "dare_ties" and start.parameters["normalize"] is True
    for model in start.models:
        assert {e.value for e in model.parameters["weight"]} == {0.5}
        assert {e.value for e in model.parameters["density"]} == {1.0}
    # sigma0 is a fraction of each range: every range is 2 wide, so 1/12 is 1/6 of a unit
    assert {d.high - d.low for d in space.dims} == {2.0}
    # its transforms: |weight|, density clamped to [0, 1]
    genome = np.array([-0.4] * 4 + [1.7] * 4)
    decoded = space.decode(genome)
    assert [e.value for e in decoded.models[0].parameters["weight"]] == pytest.approx([0.4] * 5)
    assert {e.value for e in decoded.models[0].parameters["density"]} == {1.0}
    assert m.warnings == ["apply_chat_template: true (mergekit-evolve's default): not "
                          "mapped: prompts are scored as the task writes them, without a "
                          "chat template"]


def test_every_unmapped_field_is_named_in_one_warning_line():
    m = mapped(genome__smooth=True, genome__tokenizer_source="base", random_init=True,
               num_fewshot=5, limit=10, genome__notes="mine", tasks=[
                   {"name": "zoo_rev", "metric": "exact_match,none", "comment": "x"}])
    fields = [line.split(":")[0] for line in m.warnings]
    assert fields == ["genome.notes", "tasks.0.comment", "genome.smooth",
                      "genome.tokenizer_source", "num_fewshot", "apply_chat_template",
                      "limit", "random_init"]
    assert all("\n" not in line for line in m.warnings)
    assert m.experiment["evaluator"]["limit"] == 10


def test_weights_metrics_groups_and_methods():
    m = mapped(tasks=[{"name": "zoo_rev", "weight": 2.0, "metric": "exact_match,none"},
                      {"name": "zoo_srt", "weight": -0.5, "metric": "char_accuracy,none"},
                      {"name": "zoo_dup", "weight": 0.0},
                      {"name": "zoo", "metric": "exact_match,none"}])
    objs = {o["name"]: o for o in m.experiment["evaluator"]["objectives"]}
    assert objs["zoo_rev"] == {"name": "zoo_rev", "metric": "exact_match", "tasks": ["zoo_rev"],
                               "direction": "maximize", "weight": 2.0}
    assert objs["zoo_srt"]["direction"] == "minimize" and objs["zoo_srt"]["weight"] == 0.5
    assert "zoo_dup" not in objs and any(w.startswith("tasks.2 (zoo_dup): weight 0")
                                         for w in m.warnings)
    assert objs["zoo"]["tasks"] == ["zoo_rev", "zoo_srt", "zoo_dup", "zoo_evn"]  # a group
    assert m.experiment["evaluator"]["tasks"] == ["zoo_rev", "zoo_srt", "zoo_dup", "zoo_evn"]
    Experiment.from_dict(m.experiment)

    for method, params, normalize in (("linear", ["weight"], True),
                                      ("task_arithmetic", ["weight"], False),
                                      ("ties", ["weight", "density"], True)):
        space = mapped(genome__merge_method=method).experiment["space"]
        assert space["method"] == method and list(space["parameters"]) == params
        assert space["fixed"] == {"normalize": normalize}
    space = mapped(genome__normalize=False, genome__allow_negative_weights=True,
                   genome__layer_granularity=0, genome__filters=["self_attn", "mlp"]
                   ).experiment["space"]
    weight = space["parameters"]["weight"]
    assert space["fixed"] == {"normalize": False} and "transform" not in weight
    assert weight["granularity"] == {"modules": ["self_attn", "mlp"]}

    slerp = mapped(genome__merge_method="slerp")
    assert slerp.experiment["models"] == {"base": "/m/rev", "sources": {"srt": "/m/srt"}}
    assert slerp.experiment["space"]["parameters"] == {"t": {
        "per": "shared", "granularity": {"groups": 2}, "bounds": [0.0, 1.0], "init": 0.5}}
    assert slerp.experiment["strategy"]["options"]["sigma0"] == pytest.approx(1 / 6)
    assert any(w.startswith("genome.base_model: not used by slerp") for w in slerp.warnings)


def test_mergekit_evolve_options_come_from_set():
    options, rest, unused = split_overrides(
        ["max_fevals=12", "--sigma0=0.3", "force-population-size=6", "random_seed=3",
         "timeout=90", "batch_size=16", "vllm=true", "budget.evaluations=4", "name=other"])
    assert unused == ["vllm"] and rest == ["budget.evaluations=4", "name=other"]
    exp = map_evolve_config(evolve_config(), name="evo", options=options).experiment
    assert exp["budget"] == {"evaluations": 12, "wall_time": 90}
    assert exp["strategy"]["options"] == {"sigma0": pytest.approx(0.15), "include_init": False,
                                          "popsize": 6}
    assert exp["seed"] == 3 and exp["evaluator"]["batch_size"] == 16


@pytest.mark.parametrize("changes, message", [
    ({"tasks": ["hellaswag_train"]},
     "tasks ['hellaswag_train']: no lm-eval task YAML of that name under"),
    ({"tasks": ["zoo_rev"]}, "tasks.0.metric 'acc,none': task 'zoo_rev' (generate_until) "
                             "gives char_accuracy"),
    ({"genome__merge_method": "della"}, "genome: merge_method 'della': mergekit-evolve's "
                                        "genome knows linear"),
    ({"genome__base_model": None}, "base_model is required for dare_ties"),
    ({"genome__models": ["/m/rev+/m/lora"]}, "applies a LoRA adapter (+/m/lora)"),
    ({"genome__merge_method": "slerp", "genome__models": ["/a", "/b", "/c"]},
     "a slerp genome maps here for two models, not 3"),
    ({"task_search_path": "/nowhere/tasks"}, "task_search_path: /nowhere/tasks is not a "
                                             "directory"),
    ({"tasks": []}, "tasks: List should have at least 1 item"),
])
def test_what_cannot_run_is_refused_naming_the_field(changes, message):
    with pytest.raises(EvolveConfigError) as err:
        mapped(**changes)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    if "hellaswag" in message:
        assert "--set task_search_path=DIR" in str(err.value)


def test_a_file_is_detected_and_loaded_with_overrides(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evol merge config.yml"
    path.write_text(yaml.safe_dump(evolve_config(genome__smooth=True)))
    assert is_evolve_config(yaml.safe_load(path.read_text()))
    assert not is_evolve_config({"name": "x", "models": {}})
    with caplog.at_level(logging.WARNING, logger="mergesearch.mergekit_evolve"):
        exp = experiment_from_evolve_config(path, ["budget.evaluations=4", "vllm=true"])
    assert exp.name == "evol-merge-config" and exp.run_dir == Path("runs/evol-merge-config")
    assert exp.budget.evaluations == 4 and exp.strategy.name == "sakana_ps"
    said = [r.getMessage() for r in caplog.records]
    assert any(s.startswith("genome.smooth:") for s in said)
    assert any(s.startswith("--set vllm: a mergekit-evolve option") for s in said)
    with pytest.raises(ExperimentError, match=r"budget\.evaluations"):
        experiment_from_evolve_config(path, ["budget.evaluations=none"])


# ------------------------------------------------------------------- with mergekit / models


def _mergekit_genome(zoo, definition: dict):
    genome_mod = pytest.importorskip("mergekit.evo.genome")
    return genome_mod.ModelGenome(genome_mod.ModelGenomeDefinition.model_validate(definition))


@pytest.mark.slow
@pytest.mark.mergekit
def test_the_genome_decodes_as_mergekit_evolve_decodes_it(zoo):
    """Random genes in mergekit-evolve's layout and ours (the same values, reordered) give
    the same weight and density per model per layer group."""
    refs = [str(zoo.model_path("rev")), str(zoo.model_path("srt")), str(zoo.model_path("dup"))]
    definition = {"models": refs, "merge_method": "dare_ties", "base_model": str(zoo.base),
                  "layer_granularity": 2}
    theirs = _mergekit_genome(zoo, definition)
    m = map_evolve_config({"genome": definition, "tasks": [
        {"name": "zoo_rev", "metric": "exact_match,none"}]}, name="p",
        options={"task_search_path": str(ZOO_TASKS)})
    sources = m.experiment["models"]["sources"]
    ours = SearchSpace(SpaceConfig.load(m.experiment["space"]), base=str(zoo.base),
                       sources=sources, num_layers=theirs.num_layers)
    rng = np.random.default_rng(0)
    n_groups, n_models, params = theirs.num_layers // 2, len(refs), ("weight", "density")
    genes = rng.uniform([-1.0, 0.0], [1.0, 2.0], size=(n_groups, n_models, 1, 2))
    x0 = theirs.initial_genotype().numpy()
    config = theirs.genotype_merge_config(genes).model_dump(mode="json")
    start = ours.decode(ours.x0)
    ours_genome = [genes[g, s, 0, p] for p in range(2) for s in range(n_models)
                   for g in range(n_groups)]
    recipe = ours.decode(ours_genome)
    assert config["parameters"]["normalize"] is recipe.parameters["normalize"] is True
    for g, piece in enumerate(config["slices"]):
        for s, src in enumerate(piece["sources"][:n_models]):
            assert src["layer_range"] == [2 * g, 2 * g + 2]
            for p, param in enumerate(params):
                mine = {e.filter: e.value for e in recipe.models[s].parameters[param]}
                assert mine[f"layers.{2 * g}."] == pytest.approx(src["parameters"][param])
                begin = {e.filter: e.value for e in start.models[s].parameters[param]}
                assert begin[f"layers.{2 * g}."] == pytest.approx(x0[g, s, 0, p])


def write_config(tmp_path: Path, zoo) -> Path:
    """mergekit-evolve's example config, in its documented format, over the tiny zoo."""
    text = f"""\
genome:
  models:
    - {zoo.model_path("rev")}
    - {zoo.model_path("srt")}
  merge_method: dare_ties
  base_model: {zoo.base}
  layer_granularity: 2
  smooth: true
  tokenizer_source: base
tasks:
  - name: zoo_rev
    metric: "exact_match,none"
  - name: zoo_srt
    weight: 0.5
    metric: "exact_match,none"
limit: 4
"""
    path = tmp_path / "evol_merge_config.yml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_the_config_runs_a_search_from_the_command_line(zoo, tmp_path):
    path = write_config(tmp_path, zoo)
    evo_config = pytest.importorskip("mergekit.evo.config", reason="mergekit (the dev extra) "
                                     "checks that the example is mergekit-evolve's format")
    evo_config.EvolMergeConfiguration.model_validate(yaml.safe_load(path.read_text()))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mergesearch", "run", str(path), "-q",
         "--set", "budget.evaluations=4", "--set", f"task_search_path={ZOO_TASKS}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    for name in ("genome.smooth", "genome.tokenizer_source", "apply_chat_template", "limit"):
        assert sum(f": {name}:" in line for line in warned) == 1, done.stderr
    assert "evol_merge_config: 4 trials (4 ok, 0 failed" in done.stdout

    from mergesearch.storage import TrialStore

    store = TrialStore.open(f"sqlite:///{tmp_path / 'runs/evol_merge_config/study.db'}",
                            "evol_merge_config")
    assert [o.name for o in store.objectives] == ["zoo_rev", "zoo_srt"]
    assert [o.weight for o in store.objectives] == [1.0, 0.5]
    assert store.experiment["strategy"]["name"] == "sakana_ps"
    trials = store.trials()
    assert len(trials) == 4 and all(t.state == "ok" for t in trials)
    for t in trials:
        recipe = t.recipe
        assert recipe["method"] == "dare_ties" and recipe["base"] == str(zoo.base)
        assert [m["model"] for m in recipe["models"]] == [str(zoo.model_path("rev")),
                                                          str(zoo.model_path("srt"))]
        assert recipe["parameters"]["normalize"] is True
        for model in recipe["models"]:
            assert set(model["parameters"]) == {"weight", "density"}
            filters = [e.get("filter") for e in model["parameters"]["weight"]]
            assert filters == ["layers.0.", "layers.1.", "layers.2.", "layers.3.", None]
            assert all(0 <= e["value"] <= 1 for e in model["parameters"]["density"])
        assert len(t.params) == 8  # 2 groups x 2 models x (weight, density)
    front = json.loads((tmp_path / "runs/evol_merge_config/front").joinpath(
        next(p.name for p in (tmp_path / "runs/evol_merge_config/front").iterdir()),
        "recipe.json").read_text())
    assert front["method"] == "dare_ties"
