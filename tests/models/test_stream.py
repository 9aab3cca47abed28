"""The merge engine as plan -> stream of merged (name, tensor) -> sink, and the merge context.

The stream equals what ``apply`` leaves in the resident model, tensor by tensor; the
safetensors sink writes a checkpoint that transformers reloads as ``merge()``'s model
while holding at most a shard (measured on the live tensors the stream yields); module
and reducers teed in one pass give the objective values of the old walk over the
model; per-source statistics are computed once per merger.
"""

from __future__ import annotations

import json
import weakref
from types import SimpleNamespace

import pytest
import torch
from helpers import perturbed, save, state, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mergesearch.evaluation import ObjectiveConfig
from mergesearch.execution.worker import Worker, WorkerSpec
from mergesearch.export import save_checkpoint, save_merged
from mergesearch.merging import base as method_registry
from mergesearch.merging import context as statistic_registry
from mergesearch.merging.base import MergeMethod, Param
from mergesearch.merging.context import MergeContext
from mergesearch.models.resident import ResidentMerger, merge
from mergesearch.models.sinks import ModuleSink, ReducerSink, SafetensorsSink, Tee, drain
from mergesearch.objectives import DeltaReducer, extra_objective_values, weight_sink
from mergesearch.recipe import Recipe, RecipeError, uniform_recipe
from mergesearch.trial import Candidate

WEIGHTS = [ObjectiveConfig(name=m, source="weights", metric=m)
           for m in ("delta_sparsity", "delta_l1", "delta_l2")]


def recipes(tiny) -> dict[str, Recipe]:
    three = tiny.sources
    ta = uniform_recipe("task_arithmetic", tiny.base, three, weight=0.6)
    return {
        "linear": uniform_recipe("linear", None, three, weight=1.0),
        "task_arithmetic_lines": Recipe.from_dict(ta.to_dict() | {
            "lines": {"alpha": 0.2, "beta": 0.6}}),
        "ties": uniform_recipe("ties", tiny.base, three, weight=1.0, density=0.3),
        "dare_ties": uniform_recipe("dare_ties", tiny.base, three, weight=0.5, density=0.4)
        .model_copy(update={"seed": 5}),
        "slerp": Recipe.from_dict({"method": "slerp", "base": tiny.base, "models": [
            {"model": three[0]}], "parameters": {"t": 0.3}}),
        "global_slerp": Recipe.from_dict({"method": "global_slerp", "base": tiny.base,
                                          "models": [{"model": three[1]}],
                                          "parameters": {"t": 0.7}}),
        "vocab_base": uniform_recipe("task_arithmetic", tiny.base, [tiny.big_vocab, three[0]],
                                     weight=0.5).model_copy(update={"vocab": "base"}),
        "tied": uniform_recipe("task_arithmetic", tiny.tied_base, tiny.tied_sources,
                               weight=0.4),
        "copied_path": Recipe.from_dict({"method": "passthrough", "vocab": "base",
                                         "layer_path": [{"model": tiny.base, "layer": 2},
                                                        {"model": tiny.big_vocab, "layer": 0}]}),
    }


# ------------------------------------------------------------- stream == apply

@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_stream_equals_the_applied_module_tensor_by_tensor(tiny, dtype):
    merger = ResidentMerger(dtype=dtype)
    for case, recipe in recipes(tiny).items():
        held = {n: p.detach().clone() for n, p in merger.apply(recipe).named_parameters()}
        streamed = dict(merger.stream(recipe))
        assert list(streamed) == list(held), case  # parameter names, tied ones once
        for name, tensor in streamed.items():
            assert tensor.dtype == torch.float32, (case, name)  # the compute dtype
            assert torch.equal(tensor.to(dtype), held[name]), (case, name)


def test_a_zero_copy_layer_path_streams_its_tensors_under_plain_depth_n_names(tiny):
    a, b = tiny.base, tiny.deep
    recipe = Recipe(method="passthrough", layer_path=[
        {"model": a, "layer": 2}, {"model": b, "layer": 4}, {"model": a, "layer": 2}])
    merger = ResidentMerger()
    streamed = dict(merger.stream(recipe))
    copier = ResidentMerger()
    copier._zero_copy_paths = False
    copied = {n: p.detach() for n, p in copier.apply(recipe).named_parameters()}
    assert list(streamed) == list(copied)
    assert "model.layers.2.mlp.up_proj.weight" in streamed
    for name, tensor in streamed.items():
        assert torch.equal(tensor, copied[name]), name
    # nothing copied: the path's tensors are the source models' own
    src_a = state(a)["model.layers.2.self_attn.q_proj.weight"]
    assert torch.equal(streamed["model.layers.0.self_attn.q_proj.weight"], src_a)
    assert (streamed["model.layers.0.self_attn.q_proj.weight"].data_ptr()
            == streamed["model.layers.2.self_attn.q_proj.weight"].data_ptr())


def test_apply_tees_extra_sinks_in_the_same_pass(tiny):
    recipe = recipes(tiny)["ties"]
    seen = []

    class Recorder:
        def accept(self, name, tensor):
            seen.append((name, tensor.clone()))

        def close(self):
            return "closed"

    merger = ResidentMerger()
    model = merger.apply(recipe, also=Recorder())
    held = model.state_dict()
    assert [n for n, _ in seen] == [n for n, _ in model.named_parameters()]
    assert all(torch.equal(t, held[n]) for n, t in seen)
    # the module sink alone, driven by hand, does what apply does
    fresh = LlamaForCausalLM(tiny_config())
    assert drain(merger.stream(recipe), Tee(ModuleSink(fresh), Recorder()))[0] is fresh
    assert all(torch.equal(p, held[n]) for n, p in fresh.state_dict().items())
    with pytest.raises(KeyError, match="no parameter or buffer 'nope'"):
        ModuleSink(fresh).accept("nope", torch.zeros(1))


# ---------------------------------------------------------- safetensors export

@pytest.mark.parametrize("case", ["ties", "tied", "copied_path", "zero_copy_path"])
def test_streamed_export_reloads_as_the_merged_model(tiny, tmp_path, case):
    if case == "zero_copy_path":
        recipe = Recipe(method="passthrough", layer_path=[
            {"model": tiny.base, "layer": 1}, {"model": tiny.deep, "layer": 3},
            {"model": tiny.base, "layer": 1}])
    else:
        recipe = recipes(tiny)[case]
    want = merge(recipe)
    out = save_merged(recipe, tmp_path / "streamed")
    old = save_checkpoint(want, tmp_path / "old", recipe=recipe)  # save_pretrained's way
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in old.iterdir())
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((old / name).read_text())
    assert (out / "mergesearch_recipe.json").read_text() == (old / "mergesearch_recipe.json"
                                                            ).read_text()
    assert sorted(load_file(out / "model.safetensors")) == sorted(
        load_file(old / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    got = reloaded.state_dict()
    for name, tensor in want.state_dict().items():
        assert torch.equal(got[name], tensor), name
    ids = torch.tensor([[2, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want(ids).logits, rtol=0, atol=0)


def test_streamed_export_shards_in_bf16_and_never_builds_a_merged_model(tiny, tmp_path,
                                                                        monkeypatch):
    recipe = recipes(tiny)["dare_ties"].model_copy(update={"dtype": "bfloat16"})
    want = merge(recipe).state_dict()

    def no_resident(*args, **kwargs):
        raise AssertionError("the export built a merged model")

    monkeypatch.setattr(ResidentMerger, "apply", no_resident)
    monkeypatch.setattr(ResidentMerger, "_resident", no_resident)
    out = save_merged(recipe, tmp_path / "out", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert not list(out.glob("*.part"))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in want.values())
    got = reloaded.state_dict()
    assert all(torch.equal(got[n], t) for n, t in want.items())


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> SimpleNamespace:
    """A Llama with wide layers (~4M parameters, 17 MB in float32): the merged model is
    many times bigger than a shard."""
    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(hidden_size=256, intermediate_size=1024,
                                        num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=4))
    return SimpleNamespace(base=save(base, root / "base"),
                           sources=[save(perturbed(base, s), root / f"s{s}") for s in (1, 2)])


class LiveBytes:
    """Bytes of the tensors a stream yielded that are still alive (anywhere), and the most
    at any point: weakref finalizers count a tensor out when it is freed."""

    def __init__(self) -> None:
        self.live = self.peak = self.total = 0
        self.largest = 0

    def _freed(self, size: int) -> None:
        self.live -= size

    def track(self, stream):
        for name, tensor in stream:
            size = tensor.nbytes
            self.live, self.total = self.live + size, self.total + size
            self.largest = max(self.largest, size)
            weakref.finalize(tensor, self._freed, size)
            self.peak = max(self.peak, self.live)
            yield name, tensor
            del tensor


def test_safetensors_sink_holds_a_shard_not_the_merged_model(wide, tmp_path):
    recipe = uniform_recipe("ties", wide.base, wide.sources, weight=1.0, density=0.5)
    merger = ResidentMerger()  # float32 throughout: the sink keeps the yielded tensors
    model_bytes = sum(merger.pool.checkpoint(wide.base).tensor(n).nbytes
                      for n in merger.pool.checkpoint(wide.base).names)
    shard = model_bytes // 8

    kept = LiveBytes()  # a sink that keeps everything: the measurement sees the whole model
    everything = {}
    for name, tensor in kept.track(merger.stream(recipe)):
        everything[name] = tensor
    assert kept.peak == kept.total == model_bytes

    live = LiveBytes()
    sink = SafetensorsSink(tmp_path, max_shard_size=shard)
    files = drain(live.track(merger.stream(recipe)), sink)
    assert live.total == model_bytes and live.largest < shard
    assert live.peak <= shard + live.largest < model_bytes / 3
    assert sink.peak_bytes <= shard
    assert len(files) >= 8
    written = {}
    for f in files:
        written |= load_file(f)
    assert written.keys() == everything.keys()
    assert all(torch.equal(written[n], t) for n, t in everything.items())


# ------------------------------------------------------------- weight objectives

def worker_for(merger: ResidentMerger, objs) -> SimpleNamespace:
    return SimpleNamespace(merger=merger, extra_objectives=objs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["dare_ties", "tied", "vocab_base_same_rows"])
def test_module_and_reducers_teed_give_the_old_walks_values(tiny, case, dtype):
    if case == "vocab_base_same_rows":
        r = uniform_recipe("task_arithmetic", tiny.base, tiny.sources[:2], weight=0.7)
    else:
        r = recipes(tiny)[case]
    merger = ResidentMerger(dtype=dtype)
    worker = worker_for(merger, [*WEIGHTS, ObjectiveConfig(name="n", source="recipe",
                                                           metric="num_models")])
    cand = Candidate(0, None, recipe=r)
    sink = weight_sink(worker, r)
    model = merger.apply(r, also=sink)
    teed = extra_objective_values(worker, cand, model, weights=sink)
    walked = extra_objective_values(worker, cand, model)  # the model's state dict, walked
    assert teed == pytest.approx(walked, rel=1e-9) and teed["n"] == len(r.models)
    assert 0 <= teed["delta_sparsity"] < 1 and teed["delta_l1"] > 0


def test_each_delta_is_computed_once_for_all_reducers(tiny, monkeypatch):
    deltas: dict[str, set[int]] = {}

    def no_own_delta(self, name, merged, base):
        raise AssertionError("a delta reducer subtracted the base itself")

    for cls in DeltaReducer.__subclasses__():
        add = cls.add

        def spy(self, name, delta, add=add):
            deltas.setdefault(name, set()).add(id(delta))
            return add(self, name, delta)

        monkeypatch.setattr(cls, "add", spy)
    monkeypatch.setattr(DeltaReducer, "update", no_own_delta)
    r = recipes(tiny)["ties"]
    merger = ResidentMerger()
    sink = weight_sink(worker_for(merger, WEIGHTS), r)
    merger.apply(r, also=sink)
    assert len(deltas) == len(state(tiny.base))
    assert all(len(ids) == 1 for ids in deltas.values())  # one delta shared by all three


def score(model, split, *, fidelity, seed):
    """A python evaluator for the worker test: one item, always right."""
    return {"correct": {"t": [True]}, "items": {"t": [0]}, "scores": {"t": {"accuracy": 1.0}}}


def test_the_worker_reduces_weight_objectives_while_it_merges(tiny, monkeypatch):
    spec = WorkerSpec(tokenizer=None, evaluator={
        "backend": "python", "function": f"{__name__}:score", "objectives": [
            {"name": "acc", "metric": "accuracy"},
            *[o.model_dump(mode="json") for o in WEIGHTS]]})
    worker = Worker(spec)
    walks = []
    original = torch.nn.Module.state_dict

    def counted(self, *args, **kwargs):
        walks.append(type(self).__name__)
        return original(self, *args, **kwargs)

    r = recipes(tiny)["ties"]
    monkeypatch.setattr(torch.nn.Module, "state_dict", counted)
    result = worker.evaluate(Candidate(0, None, recipe=r))
    monkeypatch.undo()
    assert result.ok, result.reason
    assert walks == []  # no walk over the merged model
    want = extra_objective_values(worker_for(ResidentMerger(), WEIGHTS),
                                  Candidate(0, None, recipe=r), merge(r))
    assert {k: result.values[k] for k in want} == pytest.approx(want, rel=1e-9)
    assert result.values["acc"] == 1.0


def test_reducer_sink_skips_tensors_the_base_lacks():
    seen = []
    reducer = SimpleNamespace(update=lambda name, merged, base: seen.append(
        (name, merged.dtype, float((merged.float() - base).sum()))))
    sink = ReducerSink(reducer, {"a": torch.ones(2)}.get, dtype=torch.bfloat16)
    sink.accept("a", torch.full((2,), 1.001))  # 1.001 is 1 in bfloat16
    sink.accept("b", torch.zeros(3))
    assert sink.close() is reducer and seen == [("a", torch.bfloat16, 0.0)]


# ------------------------------------------------------------------ merge context

@pytest.fixture
def norm_matched(monkeypatch):
    """A method that asks for the context: the linear average rescaled to the sources'
    mean norm (norms from the context), and a counting statistic."""
    calls = []

    def counted_norm(x):
        calls.append(tuple(x.shape))
        return float(torch.linalg.vector_norm(x))

    def fn(base, models, *, weight, context, seed=0):
        avg = sum(w * m for w, m in zip(weight, models, strict=True)) / sum(weight)
        target = sum(context.stat("counted_norm", i) for i in range(len(models))) / len(models)
        return avg * (target / max(float(torch.linalg.vector_norm(avg)), 1e-12))

    method = MergeMethod(name="norm_matched", fn=fn, needs_base=False, context=True,
                         params=(Param("weight", per_model=True),), mergekit=False)
    monkeypatch.setitem(method_registry._REGISTRY, "norm_matched", method)
    monkeypatch.setitem(statistic_registry._STATISTICS, "counted_norm", counted_norm)
    return calls


def test_merge_context_statistics_are_computed_once_per_merger(tiny, norm_matched):
    merger = ResidentMerger()
    r = Recipe.from_dict({"method": "norm_matched", "models": [
        {"model": s, "parameters": {"weight": w}} for s, w in zip(tiny.sources, (1, 2, 3),
                                                                   strict=True)]})
    model = merger.apply(r)
    names = [n for n, _ in model.named_parameters()]
    assert len(norm_matched) == len(names) * 3  # each (source, tensor) once
    srcs = [state(s) for s in tiny.sources]
    for name, p in model.named_parameters():
        avg = (srcs[0][name] + 2 * srcs[1][name] + 3 * srcs[2][name]) / 6
        target = sum(float(torch.linalg.vector_norm(s[name])) for s in srcs) / 3
        torch.testing.assert_close(p.detach(), avg * target / torch.linalg.vector_norm(avg),
                                   rtol=1e-5, atol=1e-6)
    # other weights, the stream, another recipe over two of the sources: all cached
    merger.apply(Recipe.from_dict(r.to_dict() | {"models": [
        {"model": s, "parameters": {"weight": 1.0}} for s in tiny.sources[:2]]}))
    dict(merger.stream(r))
    assert len(norm_matched) == len(names) * 3 and len(merger.context) == len(names) * 3
    # current methods never ask: a plain merge computes no statistic
    ResidentMerger().apply(recipes(tiny)["ties"])
    assert len(norm_matched) == len(names) * 3


def test_merge_context_caches_registered_statistics():
    fetched = []
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float16)

    def fetch(source, tensor):
        fetched.append((source, tensor))
        return x

    ctx = MergeContext(fetch)
    assert ctx.stat("norm", "m", "w") == 5.0 and ctx.stat("mean", "m", "w") == 1.75
    assert ctx.stat("norm", "m", "w") == 5.0
    assert fetched == [("m", "w"), ("m", "w")]  # once per statistic
    with pytest.raises(KeyError, match="unknown statistic 'gram'.*mean, norm"):
        ctx.stat("gram", "m", "w")


@pytest.mark.slow  # torch.compile of the fused merges
def test_fused_merges_are_written_straight_into_the_resident_parameters(tiny, monkeypatch):
    """Where the method can (``writes_out``), apply merges into the parameters themselves:
    the sink copies nothing, the model equals the stream's tensors, NaN still fails."""
    from mergesearch.merging import task_arithmetic
    from mergesearch.models import sinks

    monkeypatch.setattr(task_arithmetic, "FUSE_MIN_NUMEL", 1)  # every tensor compiled
    same = []
    real = sinks._same_memory
    monkeypatch.setattr(sinks, "_same_memory", lambda a, b: same.append(real(a, b)) or same[-1])
    merger = ResidentMerger()
    cases = recipes(tiny)
    for case in ("linear", "ties", "dare_ties", "tied", "task_arithmetic_lines"):
        same.clear()
        held = {n: p.detach().clone() for n, p in merger.apply(cases[case]).named_parameters()}
        assert same and all(same) == (case != "task_arithmetic_lines"), case  # LiNeS: copied
        for name, tensor in merger.stream(cases[case]):
            assert torch.equal(tensor, held[name]), (case, name)
    huge = uniform_recipe("linear", None, tiny.sources, weight=3e38)  # sums overflow
    with pytest.raises(RecipeError, match="produced NaN or inf"):
        merger.apply(huge)
