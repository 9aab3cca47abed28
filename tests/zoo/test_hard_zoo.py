"""The hard zoo: deterministic build, eval files, no copy trap, and (slow, on the real zoo)
the properties it is built for: experts good at their own skill only, a hand-over pair
that only works together, harmful sources that harm."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesearch import controller
from mergesearch.experiment import Experiment
from mergesearch.zoo.hard import (
    HARD_SKILL_TABLE,
    HARD_SKILLS,
    HardZooConfig,
    build_hard_zoo,
    eval_split,
    score_hard,
    write_hard_eval_files,
)
from mergesearch.zoo.skills import is_heldout

ROOT = Path(__file__).resolve().parents[2]
TINY = HardZooConfig.tiny()


def _hashes(root: Path) -> dict[str, str]:
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("*/model.safetensors"))}


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_tiny_hard_zoo_builds_the_same_weights_twice(tmp_path: Path) -> None:
    first = build_hard_zoo(tmp_path / "a", config=TINY, progress=False)
    second = build_hard_zoo(tmp_path / "b", config=TINY, progress=False)
    hashes = _hashes(first.root)
    assert set(hashes) == {"base", *TINY.names} and set(first.experts) == set(TINY.names)
    assert hashes == _hashes(second.root)
    assert first.manifest["key"] == second.manifest["key"]
    # and a different seed is a different zoo
    other = build_hard_zoo(tmp_path / "c", config=TINY, seed=1, progress=False)
    assert _hashes(other.root)["rot"] != hashes["rot"]


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_tiny_hard_zoo_experts_change_only_their_layers(tmp_path: Path) -> None:
    zoo = build_hard_zoo(tmp_path / "z", config=TINY, progress=False)
    base = load_file(zoo.base / "model.safetensors")
    for name, layers in (("rot", (0, 1)), ("inc", (2, 3)), ("flow_a", (0, 1)),
                         ("flow_b", (2, 3))):
        expert = load_file(zoo.model_path(name) / "model.safetensors")
        changed = {k for k in base if not torch.equal(base[k], expert[k])}
        assert changed, name
        assert all(any(f"layers.{i}." in k for i in layers) for k in changed), name


def test_committed_eval_files_are_the_generated_ones(tmp_path: Path) -> None:
    write_hard_eval_files(tmp_path)
    for part in ("search", "report"):
        for path in sorted((tmp_path / part).iterdir()):
            committed = ROOT / "evaluators" / "hard" / part / path.name
            assert committed.read_text() == path.read_text(), committed


def test_search_and_report_items_are_disjoint_held_out_prompts() -> None:
    for skill in HARD_SKILLS:
        search, report = eval_split(skill)
        assert (len(search), len(report)) == (100, 200)
        prompts = [it["prompt"] for it in search + report]
        assert len(set(prompts)) == 300 and all(map(is_heldout, prompts))


def test_no_skill_rewards_copying_the_prompt() -> None:
    """Answering with the prompt's word gets no answer character right on any skill."""
    for skill in HARD_SKILLS:
        for item in eval_split(skill)[0]:
            word = item["prompt"].split(" ", 1)[1].rstrip("=")
            assert all(a != w for a, w in zip(item["answer"], word, strict=True)), item
    assert HARD_SKILL_TABLE["rvp"].solve("abc") == "210"


# --- the real hard zoo (built once into the user cache, ~3-5 min on 2 cores) -------------

def _state(zoo, name: str) -> dict[str, torch.Tensor]:
    return load_file(zoo.model_path(name) / "model.safetensors")


def _scores(zoo, weights: dict[str, float | tuple[float, ...]]) -> dict[str, float]:
    """Char accuracy per skill (report items) of base + sum_i w_i (expert_i - base),
    computed here by hand; a tuple gives one weight per decoder layer."""
    from transformers import AutoModelForCausalLM

    base = _state(zoo, "base")
    merged = {k: v.clone() for k, v in base.items()}
    for name, w in weights.items():
        expert = _state(zoo, name)
        for k, v in base.items():
            layer = next((i for i in range(4) if f"layers.{i}." in k), None)
            scale = w[layer if layer is not None else 0] if isinstance(w, tuple) else w
            if isinstance(w, tuple) and layer is None:
                scale = sum(w) / len(w)
            merged[k] += scale * (expert[k] - v)
    model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32)
    model.load_state_dict(merged)
    scores = score_hard(model, zoo.load_tokenizer())
    return {s: m["char_accuracy"] for s, m in scores.items()}


@pytest.mark.slow
def test_each_expert_is_good_at_its_own_skill_only(hard_zoo) -> None:
    base = _scores(hard_zoo, {})
    for name in ("rot", "inc", "pos"):
        own = _scores(hard_zoo, {name: 1.0})
        assert own[name] >= 0.9 and own[name] > base[name] + 0.2, (name, own, base)
        for other in HARD_SKILLS:
            if other != name:
                assert own[other] < base[other] + 0.1, (name, other, own, base)


@pytest.mark.slow
def test_the_hand_over_pair_only_works_together(hard_zoo) -> None:
    a = _scores(hard_zoo, {"flow_a": 1.0})["rvp"]
    b = _scores(hard_zoo, {"flow_b": 1.0})["rvp"]
    both = _scores(hard_zoo, {"flow_a": (1.0, 1.0, 0.0, 0.0), "flow_b": (0.0, 0.0, 1.0, 1.0)})
    assert both["rvp"] >= 0.85 and both["rvp"] > max(a, b) + 0.1, (a, b, both)


@pytest.mark.slow
def test_harmful_sources_lower_a_good_merge(hard_zoo) -> None:
    good = {"rot": 0.5, "inc": 0.5, "pos": 0.5, "flow_a": 0.5, "flow_b": 0.5}
    mean = sum(_scores(hard_zoo, good).values()) / 4
    for harmful in ("anti", "noisy"):
        worse = sum(_scores(hard_zoo, {**good, harmful: 0.5}).values()) / 4
        assert worse < mean - 0.02, (harmful, worse, mean)


@pytest.mark.slow
def test_zoo_hard_references_resolve(hard_zoo, tmp_path: Path) -> None:
    exp = Experiment.load(ROOT / "experiments" / "hard" / "cmaes.yaml",
                          [f"output={tmp_path / 'run'}"])
    assert controller.resolve_model("zoo:hard/flow_b", exp) == str(hard_zoo.model_path("flow_b"))
    with pytest.raises(controller.ExperimentError, match="no model 'nope'"):
        controller.resolve_model("zoo:hard/nope", exp)
    assert copy.copy(hard_zoo.manifest["skills"]) == HardZooConfig().names
