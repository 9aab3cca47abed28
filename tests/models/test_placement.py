"""Where source models are held (device or pinned host memory): same merges, no copies."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from helpers import state, zoo_experiment
from safetensors.torch import save_file

from mergesearch.execution.worker import Worker, WorkerSpec
from mergesearch.experiment import ExperimentError
from mergesearch.models.checkpoint import Checkpoint
from mergesearch.models.resident import HEADROOM, ModelPool, ResidentMerger, choose_hold
from mergesearch.recipe import Recipe, uniform_recipe

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def recipes(tiny) -> list[Recipe]:
    return [
        uniform_recipe("dare_ties", tiny.base, tiny.sources, weight=0.5, density=0.4),
        uniform_recipe("ties", tiny.base, tiny.sources, weight=0.7, density=0.3),
        uniform_recipe("task_arithmetic", tiny.base, tiny.sources[:2], weight=0.6),
        Recipe(method="global_slerp", base=tiny.sources[0], models=[{"model": tiny.sources[1]}],
               parameters={"t": 0.3}),
    ]


def merged(merger: ResidentMerger, recipe: Recipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in merger.apply(recipe).named_parameters()}


def test_choose_hold_at_the_boundaries():
    assert choose_hold(needed=70 * GIB, free=80 * GIB, headroom=10 * GIB) == "device"
    assert choose_hold(needed=70 * GIB + 1, free=80 * GIB, headroom=10 * GIB) == "host"
    assert choose_hold(needed=0, free=0, headroom=0) == "device"
    assert choose_hold(needed=0, free=GIB, headroom=GIB + 1) == "host"


def test_invalid_hold_is_refused():
    with pytest.raises(ValueError, match="hold must be one of auto, device, host, not 'gpu'"):
        ModelPool("cpu", hold="gpu")


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_host_and_device_holding_give_identical_merges_on_cpu(tiny):
    host, device = ResidentMerger(hold="host"), ResidentMerger(hold="device")
    for recipe in recipes(tiny):
        a, b = merged(host, recipe), merged(device, recipe)
        assert all(torch.equal(a[n], b[n]) for n in a), recipe.method


def test_auto_on_cpu_holds_on_the_device_without_asking_cuda(tiny, monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA queried on a CPU device")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    merger = ResidentMerger(hold="auto")
    merger.apply(recipes(tiny)[0])
    assert merger.pool.hold == "device"


def test_checkpoint_size_comes_from_metadata(tiny):
    for ref, allow_pickle in ((tiny.base, False), (tiny.pickle_only, True)):
        ckpt = Checkpoint(ref, allow_pickle=allow_pickle)
        want = sum(t.numel() * t.element_size() for t in state(tiny.base).values())
        assert ckpt.nbytes == want


@pytest.mark.parametrize(("free", "hold"), [(10 * GIB, "device"), (GIB, "host")])
def test_auto_decides_once_from_sizes_and_free_memory(tiny, monkeypatch, caplog, free, hold):
    calls = []

    def mem_get_info(device):
        calls.append(device)
        return free, 8 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    pool = ModelPool("cuda", hold="auto")  # no CUDA call: the pool loads nothing here
    refs = [tiny.base, *tiny.sources, tiny.base]
    size = Checkpoint(tiny.base).nbytes  # every tiny model has the base's tensors
    # needed (4 models + the resident model) + headroom is exactly free, or one byte more
    resident = free - 4 * size - int(HEADROOM * 8 * GIB) + (hold == "host")
    with caplog.at_level(logging.INFO, logger="mergesearch.models.resident"):
        assert pool.place(refs, resident) == hold
        assert pool.place(refs, 0) == hold
    assert len(calls) == 1
    assert re.search(rf"holding source models on the {hold}: [\d.]+ GiB needed \+ 0.80 GiB "
                     r"headroom, [\d.]+ GiB free", caplog.text)


def test_host_holding_on_cpu_copies_no_memory_mapped_tensor(tmp_path):
    smaps = Path("/proc/self/smaps_rollup")
    if not smaps.exists():
        pytest.skip("needs Linux /proc/self/smaps_rollup")

    def anonymous() -> int:  # private memory; mapped file pages are not counted
        return int(re.search(r"^Anonymous:\s+(\d+) kB", smaps.read_text(), re.M)[1]) * 1024

    (tmp_path / "big").mkdir()
    save_file({"w": torch.randn(4096, 4096)}, tmp_path / "big" / "model.safetensors")  # 64 MiB
    pool = ModelPool("cpu", hold="host")
    before = anonymous()
    held, fetched = pool.tensor(str(tmp_path / "big"), "w"), pool.fetch(str(tmp_path / "big"), "w")
    assert fetched.data_ptr() == held.data_ptr()
    assert torch.isfinite(fetched.sum())  # every page read
    assert anonymous() - before < 16 * 2**20


def test_hold_sources_is_validated_plumbed_and_changeable_on_resume(zoo, tmp_path):
    with pytest.raises(ExperimentError, match=r"execution\.hold_sources.*'auto', 'device' or "
                                              r"'host'"):
        zoo_experiment(tmp_path, execution__hold_sources="gpu")
    exp = zoo_experiment(tmp_path, execution__hold_sources="host")
    assert exp.execution.hold_sources == "host"
    assert exp.fingerprint() == zoo_experiment(tmp_path).fingerprint()
    worker = Worker(WorkerSpec(tokenizer=str(zoo.base), hold_sources="host", evaluator={
        "suite": str(ROOT / "evaluators/zoo"),
        "objectives": [{"name": "m", "metric": "char_accuracy"}]}))
    assert worker.merger.pool.hold == "host"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_holding_on_cuda_streams_pinned_tensors_with_identical_results(tiny):
    host, device = ResidentMerger(device="cuda", hold="host"), ResidentMerger(device="cuda",
                                                                               hold="device")
    for recipe in recipes(tiny):
        a, b = merged(host, recipe), merged(device, recipe)
        assert all(torch.equal(a[n], b[n]) for n in a), recipe.method
    held = list(host.pool._tensors.values())
    assert held and all(t.device.type == "cpu" and t.is_pinned() for t in held)
    assert all(t.device.type == "cuda" for t in device.pool._tensors.values())
