"""Any torch model, not only HF causal LMs: a loader entry point, an evaluator function,
and the digits testbed (an MLP on sklearn's digits) run through a whole search."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_digits
from torch import nn

from mergesearch.cli import main
from mergesearch.controller import BoundExperiment
from mergesearch.evaluation import EvaluationError, EvaluatorConfig, make_evaluator
from mergesearch.experiment import Experiment, ExperimentError
from mergesearch.models.checkpoint import ModelLoadError
from mergesearch.models.generic import LoadedCheckpoint
from mergesearch.models.resident import ResidentMerger
from mergesearch.recipe import Recipe, RecipeError
from mergesearch.storage import TrialStore
from mergesearch.zoo import digits

ROOT = Path(__file__).resolve().parents[1]
LOADER = "mergesearch.zoo.digits:load"
EVALUATE = "mergesearch.zoo.digits:evaluate"
ACCURACY = [{"name": "accuracy", "metric": "accuracy"}]


@pytest.fixture(scope="session", autouse=True)
def digits_dir(tmp_path_factory):
    """The digits weights, built once per test session into a folder of its own."""
    old = os.environ.get("MERGESEARCH_DIGITS")
    os.environ["MERGESEARCH_DIGITS"] = str(tmp_path_factory.mktemp("digits"))
    try:
        yield digits.build_digits()
    finally:
        if old is None:
            os.environ.pop("MERGESEARCH_DIGITS", None)
        else:
            os.environ["MERGESEARCH_DIGITS"] = old


def states() -> dict[str, dict[str, torch.Tensor]]:
    return {name: digits.load(name)[1] for name in ("base", "low", "high")}


def heldout_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits test split, made here from sklearn: the first 20% of a seed-0 shuffle."""
    data = load_digits()
    idx = np.random.default_rng(0).permutation(len(data.target))[:round(0.2 * 1797)]
    return torch.tensor(data.data[idx] / 16, dtype=torch.float32), torch.tensor(data.target[idx])


def accuracy_of(state: dict[str, torch.Tensor]) -> float:
    """Test-set accuracy of an MLP state dict, computed here from the data."""
    model = digits.MLP()
    model.load_state_dict(state)
    x, y = heldout_split()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def recipe(method: str, **params) -> Recipe:
    per = {k: v for k, v in params.items() if isinstance(v, tuple)}
    shared = {k: v for k, v in params.items() if not isinstance(v, tuple)}
    return Recipe.from_dict({
        "method": method, "base": "base", "parameters": shared,
        "models": [{"model": m, "parameters": {k: v[i] for k, v in per.items()}}
                   for i, m in enumerate(("low", "high"))]})


# ---------------------------------------------------------------- the merge engine


def test_task_arithmetic_on_loader_models_equals_the_state_dict_computation():
    sd = states()
    merger = ResidentMerger(loader=LOADER)
    w_low, w_high = 0.3, 0.9
    model = merger.apply(recipe("task_arithmetic", weight=(w_low, w_high), normalize=False))
    assert isinstance(model, digits.MLP)
    got = model.state_dict()
    for name, base in sd["base"].items():
        want = base + w_low * (sd["low"][name] - base) + w_high * (sd["high"][name] - base)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
    # the sources are untouched by merging in place, and a second recipe reuses the module
    assert torch.equal(digits.load("low")[1]["layers.0.weight"],
                       merger.pool.tensor("low", "layers.0.weight"))
    again = merger.apply(recipe("task_arithmetic", weight=(1.0, 0.0), normalize=False))
    assert again is model
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, sd["low"][name], rtol=0, atol=1e-6)


def ties_reference(base, models, weights, densities, normalize):
    """TIES as the paper defines it: trim each task vector to its top-density magnitudes
    (ties at the cut kept), elect the sign of the weighted sum, average the agreeing
    entries (by their weights when normalising)."""
    deltas = []
    for m, w, d in zip(models, weights, densities, strict=True):
        tau = m - base
        k = max(1, int(d * tau.numel()))
        cut = tau.abs().flatten().sort(descending=True).values[k - 1]
        deltas.append(torch.where(tau.abs() >= cut, tau, 0.0).double() * w)
    positive = sum(deltas) >= 0
    agree = [torch.where(positive, d > 0, d < 0) for d in deltas]
    mixed = sum(torch.where(a, d, 0.0) for a, d in zip(agree, deltas, strict=True))
    if normalize:
        div = sum(torch.where(a, w, 0.0) for a, w in zip(agree, weights, strict=True)).double()
        mixed = mixed / torch.where(div == 0, 1.0, div)
    return (base.double() + mixed).float()


@pytest.mark.parametrize("normalize", [False, True])
def test_ties_on_loader_models_equals_an_independent_ties(normalize):
    sd = states()
    weights, densities = (0.7, 1.2), (0.3, 0.6)
    model = ResidentMerger(loader=LOADER).apply(
        recipe("ties", weight=weights, density=densities, normalize=normalize))
    for name, value in model.state_dict().items():
        want = ties_reference(sd["base"][name], [sd["low"][name], sd["high"][name]],
                              weights, densities, normalize)
        torch.testing.assert_close(value, want, rtol=0, atol=1e-5)


def test_layer_wise_settings_address_the_loaders_layer_names():
    sd = states()
    ckpt = LoadedCheckpoint.load(LOADER, "low")
    assert ckpt.num_layers == 2 and "layers.1.bias" in ckpt and ckpt.config.num_hidden_layers == 2
    assert ckpt.nbytes == sum(t.numel() * 4 for t in sd["low"].values())
    per_layer = [{"filter": "layers.0.", "value": 0.2}, {"value": 1.0}]
    model = ResidentMerger(loader=LOADER).apply(
        recipe("task_arithmetic", weight=(per_layer, 0.0), normalize=False))
    for name, value in model.state_dict().items():
        w = 0.2 if name.startswith("layers.0.") else 1.0
        want = sd["base"][name] + w * (sd["low"][name] - sd["base"][name])
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6)


class Normed(nn.Module):
    """No block names (0 layers), a float buffer that merges and an integer one that stays."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)


def load_normed(ref: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A loader for tests: ``ref`` is a seed."""
    torch.manual_seed(int(ref))
    model = Normed()
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.num_batches_tracked.fill_(int(ref))
    return model, model.state_dict()


def test_any_module_merges_its_parameters_and_float_buffers_globally():
    loader = f"{__name__}:load_normed"
    sd = {r: load_normed(r)[1] for r in ("0", "1", "2")}
    ckpt = LoadedCheckpoint.load(loader, "1")
    assert ckpt.num_layers == 0
    assert set(ckpt.merge_shapes) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias",
                                      "norm.running_mean", "norm.running_var"}
    merged = ResidentMerger(loader=loader).apply(Recipe.from_dict({
        "method": "linear", "models": [{"model": "1", "parameters": {"weight": 1.0}},
                                       {"model": "2", "parameters": {"weight": 3.0}}]}))
    got = merged.state_dict()
    for name in ckpt.merge_shapes:
        torch.testing.assert_close(got[name], (sd["1"][name] + 3 * sd["2"][name]) / 4)
    assert int(got["norm.num_batches_tracked"]) == 1  # the first model's, not merged
    with pytest.raises(RecipeError, match="HF causal LMs"):
        ResidentMerger(loader=loader).apply(Recipe.from_dict({
            "method": "passthrough", "layer_path": [{"model": "1", "layer": 0}]}))


def test_a_broken_loader_is_refused_naming_it():
    with pytest.raises(ModelLoadError, match="cannot be imported"):
        LoadedCheckpoint.load("mergesearch.zoo.digits:no_such_loader", "base")
    with pytest.raises(ModelLoadError, match="failed on 'nope'"):
        LoadedCheckpoint.load(LOADER, "nope")
    with pytest.raises(ModelLoadError, match=r"\(module, state_dict\)"):
        LoadedCheckpoint.load("mergesearch.zoo.digits:load_split", "test")


# ---------------------------------------------------------------- the python evaluator


def test_python_evaluator_scores_equal_an_independent_accuracy():
    cfg = EvaluatorConfig(backend="python", function=EVALUATE, objectives=ACCURACY)
    evaluator = make_evaluator(cfg)
    model, state = digits.load("low")
    ev = evaluator.evaluate(model)
    x, y = heldout_split()
    with torch.no_grad():
        right = (model(x).argmax(-1) == y).tolist()
    assert ev.correct == {"digits": right}
    assert ev.indices == {"digits": list(range(len(y)))} and ev.n_items == {"digits": len(y)}
    assert ev.values["accuracy"] == pytest.approx(accuracy_of(state), abs=1e-12)
    assert ev.scores["digits"]["accuracy"] == ev.values["accuracy"]
    # a lower fidelity scores a seeded, nested subset, item ids naming the images
    half = evaluator.evaluate(model, fidelity=0.5)
    ids = half.indices["digits"]
    assert len(ids) == math.ceil(0.5 * len(y)) and ids == sorted(ids)
    assert half.correct["digits"] == [right[i] for i in ids]
    assert half.values["accuracy"] == pytest.approx(sum(right[i] for i in ids) / len(ids))
    assert set(evaluator.evaluate(model, fidelity=0.25).indices["digits"]) <= set(ids)
    # limit: a subset_seed-seeded sample, passed on to the function
    small = make_evaluator(cfg.model_copy(update={"limit": 50})).evaluate(model)
    assert len(small.indices["digits"]) == 50


def test_python_evaluator_refuses_what_it_cannot_read():
    with pytest.raises(EvaluationError, match="cannot be imported"):
        make_evaluator(EvaluatorConfig(backend="python", function="mergesearch.zoo.digits:x",
                                       objectives=ACCURACY))
    with pytest.raises(EvaluationError, match="takes no keyword bogus"):
        make_evaluator(EvaluatorConfig(backend="python", function=EVALUATE,
                                       options={"bogus": 1}, objectives=ACCURACY))
    missing = EvaluatorConfig(backend="python", function=EVALUATE,
                              objectives=[{"name": "f1", "metric": "f1"}])
    with pytest.raises(EvaluationError, match="no 'f1' for task 'digits'"):
        make_evaluator(missing).evaluate(digits.load("low")[0])
    with pytest.raises(ValueError, match="needs a suite"):
        EvaluatorConfig(objectives=ACCURACY)
    with pytest.raises(ValueError, match="needs function"):
        EvaluatorConfig(backend="python", objectives=ACCURACY)


# ---------------------------------------------------------------- the testbed


def test_the_uniform_merge_of_the_digits_experts_beats_each_expert(digits_dir):
    sd = states()
    uniform = {k: (sd["low"][k] + sd["high"][k]) / 2 for k in sd["base"]}
    acc = {name: accuracy_of(state) for name, state in [*sd.items(), ("uniform", uniform)]}
    print("digits test accuracy:", {k: round(v, 4) for k, v in acc.items()})
    assert acc["uniform"] > max(acc["low"], acc["high"])
    assert 0.35 < acc["low"] < 0.55 and 0.35 < acc["high"] < 0.55  # each knows half the digits
    assert acc["base"] < 0.2
    manifest = json.loads((digits_dir / digits.MANIFEST).read_text())
    assert manifest["test_accuracy"]["uniform_merge"] == pytest.approx(acc["uniform"], abs=1e-6)
    # cached: a second build reuses the folder, and the weights are deterministic
    assert digits.build_digits() == digits_dir
    rebuilt = digits.build_digits(digits_dir.parent / "again") / "low.safetensors"
    assert rebuilt.read_bytes() == (digits_dir / "low.safetensors").read_bytes()


def write_experiment(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "experiments" / "digits" / "task_arithmetic.yaml").read_text())
    data["output"] = str(tmp_path / "run")
    data.update(changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_digits_search_runs_and_resumes_through_the_cli(tmp_path, capsys):
    exp = write_experiment(tmp_path, budget={"evaluations": 12})
    assert main(["run", str(exp), "-q"]) == 0
    store = TrialStore.open(f"sqlite:///{tmp_path / 'run' / 'study.db'}",
                            "digits-task-arithmetic")
    first = {t.number: t for t in store.trials()}
    assert len(first) == 12 and all(t.state == "ok" for t in first.values())
    assert main(["run", str(exp), "--resume", "--set", "budget.evaluations=20", "-q"]) == 0
    assert "8 evaluated in this run" in capsys.readouterr().out
    trials = TrialStore.open(f"sqlite:///{tmp_path / 'run' / 'study.db'}",
                             "digits-task-arithmetic").trials()
    assert [t.number for t in trials] == list(range(20))
    assert sorted(t.candidate_id for t in trials) == list(range(20))
    for t in trials[:12]:  # nothing redone: the first run's trials as they were written
        old = first[t.number]
        assert (t.params, t.values, t.finished_at) == (old.params, old.values, old.finished_at)
    # scored per item, with item ids; the best recipe is at least as good as the uniform
    # merge (the search starts there) and recomputes from the state dicts
    sd = states()
    uniform = accuracy_of({k: (sd["low"][k] + sd["high"][k]) / 2 for k in sd["base"]})
    best = max((t for t in trials if t.cached_from is None), key=lambda t: t.values["accuracy"])
    assert best.values["accuracy"] >= uniform
    assert len(best.items["digits"]) == len(best.correct["digits"]) == 359
    merged = ResidentMerger(loader=LOADER).apply(Recipe.from_dict(best.recipe))
    assert accuracy_of(merged.state_dict()) == pytest.approx(best.values["accuracy"])
    print(f"digits search: uniform {uniform:.4f}, best of 20 trials "
          f"{best.values['accuracy']:.4f}")


def test_a_generic_search_is_checked_before_it_starts(tmp_path):
    exp = Experiment.load(write_experiment(tmp_path))
    search = BoundExperiment(exp, progress=False)
    assert search.worker_spec.tokenizer is None and search.worker_spec.loader == LOADER
    assert search.space.num_layers == 2 and len(search.space.dims) == 4  # 2 layers x 2 sources
    fp = search.fingerprint()
    other = Experiment.load(write_experiment(tmp_path, models={
        "loader": LOADER, "base": "base", "sources": {"low": "high", "high": "low"}}))
    changed = BoundExperiment(other, progress=False).fingerprint()
    assert fp["models.sources.low"] != changed["models.sources.low"]
    assert fp["evaluator.suite"] is None
    bad = write_experiment(tmp_path, evaluator={"backend": "python", "objectives": ACCURACY,
                                                "function": "mergesearch.zoo.digits:nope"})
    with pytest.raises(ExperimentError, match="evaluator.function"):
        BoundExperiment(Experiment.load(bad), progress=False)


def test_a_recipe_defined_source_over_loader_models_merges_from_its_recipe(tmp_path):
    from mergesearch.models.recipe_model import recipe_ref

    sd = states()
    inner = recipe_ref(recipe("task_arithmetic", weight=(0.5, 0.5), normalize=False).to_dict())
    model = ResidentMerger(loader=LOADER).apply(Recipe.from_dict({
        "method": "linear", "models": [{"model": inner, "parameters": {"weight": 1.0}},
                                       {"model": "low", "parameters": {"weight": 1.0}}]}))
    for name, value in model.state_dict().items():
        uniform = (sd["low"][name] + sd["high"][name]) / 2
        torch.testing.assert_close(value, (uniform + sd["low"][name]) / 2, rtol=0, atol=1e-6)
    # and so stages work on loader models: a second search merges with the first's choice
    exp = write_experiment(tmp_path, budget={"evaluations": 6}, stages=[
        {"name": "ps"}, {"name": "more", "sources_from": {"ps": "ps"}}])
    assert main(["run", str(exp), "-q"]) == 0
    db = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    trials = TrialStore.open(db, "digits-task-arithmetic.more").trials()
    assert len(trials) == 6 and all(t.state == "ok" for t in trials)
    assert any(m["model"].startswith("recipe:") for m in trials[0].recipe["models"])
