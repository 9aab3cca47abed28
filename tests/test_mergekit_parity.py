"""Parity with mergekit 0.1.5: the same recipe merged by `mergekit-yaml` and in memory.

Deterministic methods must agree to float32 precision.  DARE masks cannot be
shared across tools, so for DARE the drop rate and rescaling are compared
statistically.  mergekit is the `dev` extra; set MERGEKIT_PYTHON to use an
interpreter from another environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergesearch.mergekit_config import to_mergekit
from mergesearch.models.resident import ResidentMerger
from mergesearch.recipe import Recipe

pytestmark = [pytest.mark.slow, pytest.mark.mergekit]

MERGEKIT_PYTHON = os.environ.get("MERGEKIT_PYTHON", sys.executable)
_DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([cfg, out, "--no-copy-tokenizer"], standalone_mode=False)
"""


def _has_mergekit() -> bool:
    probe = subprocess.run([MERGEKIT_PYTHON, "-c", "import mergekit.scripts.run_yaml"],
                           capture_output=True)
    return probe.returncode == 0


def recipes(base: str, experts: list[str]) -> dict[str, Recipe]:
    a, b, c = experts[:3]
    per_model = {"weight": [0.3, 1.0, 0.6], "density": [{"filter": "mlp", "value": 0.3},
                                                        {"value": 0.6}]}
    return {
        "linear": Recipe.from_dict({"method": "linear", "models": [
            {"model": a, "parameters": {"weight": 1.0}},
            {"model": b, "parameters": {"weight": [0.2, 2.0]}}]}),
        "task_arithmetic": Recipe.from_dict({
            "method": "task_arithmetic", "base": base, "parameters": {"lambda": 0.8},
            "models": [{"model": m, "parameters": {"weight": w}}
                       for m, w in ((a, 0.7), (b, -0.2), (c, [1.0, 0.1]))]}),
        "ties": Recipe.from_dict({"method": "ties", "base": base, "models": [
            {"model": a, "parameters": per_model},
            {"model": b, "parameters": {"weight": 0.8, "density": 0.5}},
            {"model": c, "parameters": {"weight": 1.1, "density": 0.2}}]}),
        "ties_unnormalized": Recipe.from_dict({
            "method": "ties", "base": base, "parameters": {"normalize": False, "density": 0.4},
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (a, b, c)]}),
        "breadcrumbs": Recipe.from_dict({
            "method": "breadcrumbs", "base": base, "parameters": {"gamma": 0.05},
            "models": [{"model": m, "parameters": {"weight": 0.6, "density": 0.5}}
                       for m in (a, b)]}),
        "breadcrumbs_ties": Recipe.from_dict({
            "method": "breadcrumbs_ties", "base": base, "parameters": {"gamma": 0.02},
            "models": [{"model": m, "parameters": {"weight": 0.6, "density": 0.3}}
                       for m in (a, b, c)]}),
        "slerp": Recipe.from_dict({
            "method": "slerp", "base": a, "models": [{"model": b}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7]},
                                 {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3]},
                                 {"value": 0.5}]}}),
        "passthrough": Recipe.from_dict({"method": "passthrough", "layer_path": [
            {"model": a, "layer": 0}, {"model": a, "layer": 1}, {"model": b, "layer": 1},
            {"model": c, "layer": 2}, {"model": a, "layer": 3}]}),
        "dare_linear": Recipe.from_dict({
            "method": "dare_linear", "base": base,
            "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.3}}]}),
        "dare_ties": Recipe.from_dict({
            "method": "dare_ties", "base": base,
            "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}}
                       for m in (a, b, c)]}),
    }


@pytest.fixture(scope="module")
def parity(zoo, tmp_path_factory):
    """Every recipe merged by mergekit-yaml (one process) and by us."""
    if not _has_mergekit():
        pytest.skip(f"mergekit is not importable by {MERGEKIT_PYTHON}: pip install -e '.[dev]'")
    root = tmp_path_factory.mktemp("parity")
    cases = recipes(str(zoo.base), [str(p) for p in zoo.experts.values()])
    argv = []
    for name, recipe in cases.items():
        cfg = root / f"{name}.yml"
        cfg.write_text(yaml.safe_dump(to_mergekit(recipe)))
        argv += [str(cfg), str(root / name)]
    proc = subprocess.run([MERGEKIT_PYTHON, "-c", _DRIVER, *argv], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merger = ResidentMerger()
    ours = {}
    for name, recipe in cases.items():
        model = merger.apply(recipe)
        ours[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    theirs = {name: _read(root / name) for name in cases}
    yield cases, ours, theirs
    shutil.rmtree(root, ignore_errors=True)


def _read(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


DETERMINISTIC = ["linear", "task_arithmetic", "ties", "ties_unnormalized", "breadcrumbs",
                 "breadcrumbs_ties", "slerp", "passthrough"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_methods_match_mergekit(parity, name):
    """Equal to float32 precision.

    The one allowed exception: trimming keeps a fixed count of entries, and
    when two entries of a task vector have exactly the same magnitude at the
    cut, mergekit keeps one (sort order) and we keep both.  Such ties are rare
    (a few per million entries), so at most 1e-5 of the entries may differ.
    """
    _, ours, theirs = parity
    assert set(theirs[name]) <= set(ours[name])
    assert len(theirs[name]) >= len(ours[name]) - 1  # mergekit may drop a tied lm_head
    differing = total = 0
    for k, v in theirs[name].items():
        close = torch.isclose(ours[name][k], v, rtol=2e-6, atol=2e-6)
        differing += (~close).sum().item()
        total += v.numel()
    assert differing <= 1e-5 * total, f"{name}: {differing} of {total} entries differ"


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_drop_rate_and_rescaling_match_mergekit(parity, zoo, name):
    cases, ours, theirs = parity
    base = _read(Path(zoo.base))
    recipe = cases[name]
    density = recipe.models[0].parameters["density"]
    stats = {}
    for who, merged in (("ours", ours[name]), ("mergekit", theirs[name])):
        changed = total = 0
        for k, b in base.items():
            if k not in merged or b.dim() < 2:
                continue
            delta = merged[k] - b
            changed += (delta != 0).sum().item()
            total += delta.numel()
        stats[who] = changed / total
    if name == "dare_linear":  # one source, weight 1: survivors are tau / density
        assert stats["ours"] == pytest.approx(density, abs=0.01)
        assert stats["mergekit"] == pytest.approx(density, abs=0.01)
        expert = _read(Path(recipe.models[0].model))
        for who, merged in (("ours", ours[name]), ("mergekit", theirs[name])):
            ratios = []
            for k, b in base.items():
                if b.dim() < 2:
                    continue
                tau = expert[k] - b
                kept = (merged[k] - b) != 0
                ratios.append(((merged[k] - b)[kept] / tau[kept]).mean().item())
            mean_ratio = sum(ratios) / len(ratios)
            assert mean_ratio == pytest.approx(1 / density, rel=0.05), who
    else:  # three sources, sign consensus: compare the two tools with each other
        assert stats["ours"] == pytest.approx(stats["mergekit"], abs=0.02)
        ours_l1 = sum((ours[name][k] - b).abs().sum().item() for k, b in base.items())
        mk_l1 = sum((theirs[name][k] - b).abs().sum().item() for k, b in base.items())
        assert ours_l1 == pytest.approx(mk_l1, rel=0.05)
