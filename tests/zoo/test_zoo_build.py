"""Building the zoo: loadable HF checkpoints, manifest, caching, atomicity, determinism."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesearch.zoo import Zoo, ZooConfig, build_zoo, default_zoo_dir, score_all, uniform_merge
from mergesearch.zoo import build as build_mod

TINY = ZooConfig.tiny()



def _tensors(zoo: Zoo, name: str) -> dict[str, torch.Tensor]:
    return load_file(zoo.model_path(name) / "model.safetensors")


def test_tiny_zoo_models_load_and_manifest_is_complete(tiny_zoo: Zoo) -> None:
    assert set(tiny_zoo.experts) == set(TINY.skills) == set(tiny_zoo.skills)
    for name in ["base", *tiny_zoo.skills]:
        path = tiny_zoo.model_path(name)
        assert (path / "model.safetensors").exists()
        model = AutoModelForCausalLM.from_pretrained(path)
        cfg = model.config
        assert cfg.model_type == "llama"
        assert cfg.hidden_size // cfg.num_attention_heads >= 32
        assert cfg.tie_word_embeddings is False
        tok = AutoTokenizer.from_pretrained(path)
        assert tok("rev abc=")["input_ids"][0] == tok.bos_token_id == cfg.bos_token_id
    manifest = json.loads((tiny_zoo.root / "manifest.json").read_text())
    assert manifest == tiny_zoo.manifest
    assert manifest["seed"] == 0 and manifest["config"]["hidden_size"] == TINY.hidden_size
    assert set(manifest["scores"]) == {"base", *TINY.skills, "uniform_merge"}
    for per_skill in manifest["scores"].values():
        assert set(per_skill) == set(TINY.skills)
        for metrics in per_skill.values():
            assert 0.0 <= metrics["exact_match"] <= 1.0
            assert 0.0 <= metrics["char_accuracy"] <= 1.0
            assert metrics["answer_logprob"] <= 0.0
    assert not [p for p in tiny_zoo.root.parent.iterdir() if p.name.startswith(".")]


def test_manifest_scores_are_reproduced_by_score_all(tiny_zoo: Zoo) -> None:
    tok = tiny_zoo.load_tokenizer()
    expert = tiny_zoo.skills[0]
    got = score_all(tiny_zoo.load_model(expert), tok, tiny_zoo.skills, TINY.eval_limit)
    assert got == tiny_zoo.manifest["scores"][expert]


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_same_seed_gives_identical_weights_and_other_seed_differs(
    tiny_zoo: Zoo, tmp_path: Path
) -> None:
    again = build_zoo(tmp_path / "again", config=TINY, seed=0, progress=False)
    other = build_zoo(tmp_path / "other", config=TINY, seed=1, progress=False)
    for name in ["base", *TINY.skills]:
        a, b, c = _tensors(tiny_zoo, name), _tensors(again, name), _tensors(other, name)
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not all(torch.equal(a[k], c[k]) for k in a), name
    assert again.manifest["scores"] == tiny_zoo.manifest["scores"]


def test_reuse_mismatch_and_force(tiny_zoo: Zoo, tmp_path: Path) -> None:
    root = tmp_path / "z"
    shutil.copytree(tiny_zoo.root, root)
    stamp = (root / "base" / "model.safetensors").stat().st_mtime_ns
    reused = build_zoo(root, config=TINY, progress=False)  # no training: returns at once
    assert reused.manifest == tiny_zoo.manifest
    assert (root / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="force=True"):
        build_zoo(root, config=TINY, seed=5, progress=False)
    rebuilt = build_zoo(root, config=TINY, seed=5, force=True, progress=False)
    assert rebuilt.manifest["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z"]  # no temp or old dirs left


def test_refuses_to_replace_a_directory_that_is_not_a_zoo(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a zoo"):
        build_zoo(tmp_path / "mine", config=TINY, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_interrupted_build_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(tmp: Path, *args: object) -> None:
        (tmp / "base").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "_build_into", killed)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "z", config=TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_builders_started_together_build_once(tmp_path: Path) -> None:
    """Two processes asking for the same missing zoo: one builds, the other waits for it
    and reuses its folder (here threads; flock locks open files, not processes)."""
    import threading
    import time

    calls: list[Path] = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        time.sleep(0.5)  # the second builder arrives while the first is still at work
        (tmp / "base").mkdir()
        (tmp / build_mod.MANIFEST).write_text(json.dumps(
            {"key": "k", "models": {"base": "base"}, "skills": []}))

    zoos: list[Zoo] = []
    threads = [threading.Thread(target=lambda: zoos.append(
        build_mod.build_cached(tmp_path / "z", "k", False, build))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 1 and len(zoos) == 2
    assert {z.root for z in zoos} == {tmp_path / "z"}
    assert [p.name for p in tmp_path.iterdir()] == ["z"]


def test_default_dir_follows_env_and_config_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MERGESEARCH_ZOO", str(tmp_path))
    assert default_zoo_dir(TINY, 0) == tmp_path / TINY.key(0)
    assert TINY.key(0) != TINY.key(1) != ZooConfig().key(1)
    with pytest.raises(ValueError, match="unknown zoo skills"):
        build_zoo(tmp_path / "x", config=ZooConfig(skills=("nope",)), progress=False)


def test_uniform_merge_is_base_plus_weighted_task_vectors() -> None:
    base = {"w": torch.tensor([1.0, 2.0])}
    experts = [{"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 4.0])}]
    assert torch.equal(uniform_merge(base, experts, 0.5)["w"], torch.tensor([1.5, 3.0]))


@pytest.mark.slow
@pytest.mark.mergekit
def test_mergekit_task_arithmetic_matches_uniform_merge(tiny_zoo: Zoo, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("mergekit-yaml")
    if not exe.exists():
        pytest.skip("mergekit not installed")
    models = "\n".join(
        f"  - model: {p}\n    parameters: {{weight: 0.5}}" for p in tiny_zoo.experts.values()
    )
    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {tiny_zoo.base}\n"
        f"parameters: {{normalize: false}}\ndtype: float32\nmodels:\n{models}\n"
    )
    out = tmp_path / "merged"
    subprocess.run([str(exe), str(cfg), str(out), "--copy-tokenizer"], check=True,
                   capture_output=True)
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    ours = uniform_merge(
        _tensors(tiny_zoo, "base"), [_tensors(tiny_zoo, s) for s in tiny_zoo.skills], 0.5
    )
    assert merged.keys() == ours.keys()
    for k, v in ours.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"][0] == 1


def test_zoos_are_trained_with_the_fixed_thread_count(tmp_path: Path) -> None:
    """Whatever the caller's torch threads, the build runs at BUILD_THREADS (the weights
    depend on it) and restores the caller's; a cached zoo built at another count is
    rebuilt, not reused."""
    seen: list[int] = []

    def build(tmp: Path) -> None:
        seen.append(torch.get_num_threads())
        (tmp / "base").mkdir()
        (tmp / build_mod.MANIFEST).write_text(json.dumps(
            {"key": "k", "models": {"base": "base"}, "skills": [],
             "torch_threads": torch.get_num_threads()}))

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_mod.build_cached(tmp_path / "z", "k", False, build)
        assert seen == [build_mod.BUILD_THREADS] and torch.get_num_threads() == 1
        build_mod.build_cached(tmp_path / "z", "k", False, build)  # reused
        assert len(seen) == 1
        manifest = json.loads((tmp_path / "z" / build_mod.MANIFEST).read_text())
        (tmp_path / "z" / build_mod.MANIFEST).write_text(json.dumps(
            manifest | {"torch_threads": build_mod.BUILD_THREADS + 1}))
        build_mod.build_cached(tmp_path / "z", "k", False, build)  # stale: rebuilt
        assert len(seen) == 2
    finally:
        torch.set_num_threads(before)
