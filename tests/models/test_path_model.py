"""LayerPathModel: a layer path over the source layers equals a copied model, copying nothing."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from helpers import VOCAB, live_tensor_bytes, perturbed, tiny_config
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mergesearch.evaluation.scorers import greedy_generate, pad_left, score_rows
from mergesearch.mergekit_config import NotExpressible
from mergesearch.models.path_model import LayerPathModel, source_model
from mergesearch.models.resident import ModelPool, ResidentMerger
from mergesearch.recipe import Recipe, RecipeError

PAD = 1
PATH = [("A", 0, 1.0), ("A", 1, 0.8), ("A", 1, 1.0), ("B", 2, 1.2), ("A", 3, 1.0)]
PROMPTS = [[5, 9, 13, 2, 30, 7, 11], [21, 4, 33], [8, 8, 17, 25, 3]]


def _pair(**overrides) -> dict[str, LlamaForCausalLM]:
    # a wide init gives peaked logits: greedy choices far from ties
    torch.manual_seed(0)
    a = LlamaForCausalLM(tiny_config(num_hidden_layers=4, initializer_range=0.2, **overrides))
    return {"A": a.eval(), "B": perturbed(a, 1, scale=0.1).eval()}


@pytest.fixture(scope="module")
def sources() -> dict[str, LlamaForCausalLM]:
    return _pair()


def reference(sources, path) -> LlamaForCausalLM:
    """Each hop's weights copied into a fresh model of depth len(path); scales as pre-hooks."""
    first, last = sources[path[0][0]], sources[path[-1][0]]
    config = copy.deepcopy(first.config)
    config.num_hidden_layers = len(path)
    if getattr(config, "layer_types", None):  # each block keeps its source layer's kind
        config.layer_types = [sources[m].config.layer_types[layer] for m, layer, _ in path]
    ref = type(first)(config).eval()
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(first.model.embed_tokens.weight)
        ref.model.norm.weight.copy_(last.model.norm.weight)
        head = first if config.tie_word_embeddings else last
        ref.lm_head.weight.copy_(head.lm_head.weight)
    for k, (name, layer, scale) in enumerate(path):
        block = ref.model.layers[k]
        block.load_state_dict(sources[name].model.layers[layer].state_dict())
        if scale != 1.0:
            def times(module, args, kwargs, s=scale):
                return (args[0] * s, *args[1:]), kwargs
            block.register_forward_pre_hook(times, with_kwargs=True)
    ref.generation_config.eos_token_id = None
    return ref


def batch():
    ids, attn = pad_left(PROMPTS, PAD)
    return ids, attn


@torch.no_grad()
def test_repeated_layers_and_scales_match_a_copied_reference(sources):
    model = LayerPathModel(sources, PATH)
    ref = reference(sources, PATH)
    ids, attn = batch()
    got = model(input_ids=ids, attention_mask=attn).logits
    want = ref(input_ids=ids, attention_mask=attn).logits
    real = attn.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    # the scales matter: without them the logits differ
    plain = LayerPathModel(sources, [(m, layer) for m, layer, _ in PATH])
    assert not torch.allclose(plain(input_ids=ids, attention_mask=attn).logits[real],
                              want[real], atol=1e-3)
    # the evaluator's scoring call (right padding, logits_to_keep) agrees too
    lengths = torch.tensor([len(p) for p in PROMPTS])
    right = torch.full((3, 7), PAD)
    for i, p in enumerate(PROMPTS):
        right[i, :len(p)] = torch.tensor(p)
    starts = lengths - 2
    a, b = score_rows(model, right, lengths, starts), score_rows(ref, right, lengths, starts)
    torch.testing.assert_close(a.logprob, b.logprob, rtol=1e-5, atol=1e-5)
    assert a.n_hit.tolist() == b.n_hit.tolist()


@torch.no_grad()
def test_greedy_generate_with_cache_matches_reference_and_uncached_steps(sources):
    model = LayerPathModel(sources, PATH)
    model.generation_config.eos_token_id = None
    ref = reference(sources, PATH)
    steps = 8
    got = greedy_generate(model, PROMPTS, max_new_tokens=steps, eos_token_id=None,
                          pad_token_id=PAD)
    want = greedy_generate(ref, PROMPTS, max_new_tokens=steps, eos_token_id=None,
                           pad_token_id=PAD)
    assert got == want
    assert all(len(row) == steps for row in got)

    ids, attn = batch()  # the full forward, no cache, one token at a time
    for _ in range(steps):
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
    assert ids[:, -steps:].tolist() == got


@torch.no_grad()
def test_each_hop_has_its_own_cache_slot_and_sources_keep_their_indices(sources):
    model = LayerPathModel(sources, PATH)
    ids, _ = batch()
    cache = model(input_ids=ids, use_cache=True).cache
    assert len(cache.layers) == len(PATH)
    assert all(layer.keys.shape[-2] == ids.shape[1] for layer in cache.layers)
    # hops 1 and 2 run the same layer A1 on different inputs (scale 0.8, then 1.0)
    assert not torch.allclose(cache.layers[1].keys, cache.layers[2].keys)
    for m in sources.values():
        assert [block.self_attn.layer_idx for block in m.model.layers] == [0, 1, 2, 3]


def _module_storage(model: torch.nn.Module) -> tuple[int, frozenset]:
    tensors = [*model.parameters(), *model.buffers()]
    return len(tensors), frozenset((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                                   for t in tensors)


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
@torch.no_grad()
def test_fifty_paths_of_any_length_copy_no_weights(sources):
    model = LayerPathModel(sources)
    ids, attn = batch()
    # the default path is the first model's own layers: the first model itself
    torch.testing.assert_close(model(input_ids=ids, attention_mask=attn).logits,
                               sources["A"](input_ids=ids, attention_mask=attn).logits,
                               rtol=0, atol=0)
    rng = random.Random(0)
    paths = [PATH]
    while len(paths) < 50:  # distinct paths, depths 1..9 in random order
        path = [(rng.choice("AB"), rng.randrange(4), rng.choice([1.0, 0.5, 1.3]))
                for _ in range(rng.randint(1, 9))]
        if path not in paths:
            paths.append(path)
    held = _module_storage(sources["A"])[1] | _module_storage(sources["B"])[1]
    seen = []
    for i, path in enumerate(paths):
        model.set_path(path)
        model(input_ids=ids, attention_mask=attn)
        assert model.config.num_hidden_layers == len(path)
        count, storage = _module_storage(model)
        assert storage == held  # exactly the sources' tensors, no others
        if i == 0:
            first_count, first_bytes = count, live_tensor_bytes()
        assert count == first_count
        seen.append(len(path))
    assert live_tensor_bytes() == first_bytes
    assert len(set(seen)) >= 8
    # the probe would see a per-path copy of even one layer
    spare = copy.deepcopy(sources["A"].model.layers[0])
    assert live_tensor_bytes() > first_bytes
    del spare
    for path in paths[::10]:  # and the reused model is right at every depth
        model.set_path(path)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=attn).logits[attn.bool()],
                                   reference(sources, path)(input_ids=ids, attention_mask=attn)
                                   .logits[attn.bool()], rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_reloads_with_the_same_logits(sources, tmp_path, tied):
    models = _pair(tie_word_embeddings=True) if tied else sources
    path = [(m, layer) for m, layer, _ in PATH[:-1]] + [("B", 3)]  # ends on B: B's norm
    model = LayerPathModel(models, path)
    out = model.export(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == len(path)
    ids, attn = batch()
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=attn).logits,
                               model(input_ids=ids, attention_mask=attn).logits,
                               rtol=1e-5, atol=1e-5)
    recipe = json.loads((out / "mergesearch_recipe.json").read_text())
    assert [(h["model"], h["layer"]) for h in recipe["layer_path"]] == path
    # the path model's tensors are the sources' own; the export holds copies
    state = model.to_state_dict()
    assert (state["model.layers.3.mlp.up_proj.weight"].data_ptr()
            == models["B"].model.layers[2].mlp.up_proj.weight.data_ptr())
    assert ("lm_head.weight" in state) != tied


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False,
             initializer_range=0.2)
SLIDING = {  # window 3 < prompt + new tokens; Qwen2's layers 2, 3 slide, Mistral's all do
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True,
                                                  sliding_window=3, max_window_layers=2)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=3)),
}


@torch.no_grad()
@pytest.mark.parametrize("arch", SLIDING)
def test_sliding_window_layers_keep_their_kind_on_the_path(arch, tmp_path):
    torch.manual_seed(0)
    a = SLIDING[arch]().eval()
    models = {"A": a, "B": perturbed(a, 1, scale=0.1).eval()}
    path = [("A", 0, 1.0), ("B", 2, 0.9), ("B", 2, 1.0), ("A", 1, 1.0), ("A", 3, 1.1)]
    model = LayerPathModel(models, path)
    model.generation_config.eos_token_id = None
    ref = reference(models, path)
    ids, attn = batch()
    real = attn.bool()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=attn).logits[real],
                               ref(input_ids=ids, attention_mask=attn).logits[real],
                               rtol=1e-5, atol=1e-5)
    got = greedy_generate(model, PROMPTS, max_new_tokens=6, eos_token_id=None, pad_token_id=PAD)
    assert got == greedy_generate(ref, PROMPTS, max_new_tokens=6, eos_token_id=None,
                                  pad_token_id=PAD)
    model.set_path([(m, layer) for m, layer, _ in path])  # exported, the kinds stay per hop
    loaded = AutoModelForCausalLM.from_pretrained(model.export(tmp_path / "out")).eval()
    assert getattr(loaded.config, "layer_types", None) == getattr(model.config, "layer_types",
                                                                  None)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=attn).logits[real],
                               model(input_ids=ids, attention_mask=attn).logits[real],
                               rtol=1e-5, atol=1e-5)


def test_export_refuses_input_scales_other_than_one(sources, tmp_path):
    model = LayerPathModel(sources, PATH)
    with pytest.raises(NotExpressible, match=r"layer_path\[1\] \(A layer 1\): 0.8.*scale to 1"):
        model.export(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_paths_and_models_give_clear_errors(sources):
    model = LayerPathModel(sources, PATH)
    with pytest.raises(RecipeError, match=r"layer_path\[1\]: layer 4 is past the last layer of B"):
        model.set_path([("A", 0), ("B", 4)])
    with pytest.raises(RecipeError, match="unknown model 'C'"):
        model.set_path([("C", 0)])
    with pytest.raises(RecipeError, match="at least one hop"):
        model.set_path([])
    assert model.path == PATH  # a refused path changes nothing
    wide = LlamaForCausalLM(tiny_config(hidden_size=96, num_attention_heads=2))
    with pytest.raises(RecipeError, match="'W' cannot share a layer path with 'A'.*hidden_size"):
        LayerPathModel({"A": sources["A"], "W": wide})


@torch.no_grad()
def test_source_models_from_a_pool_use_the_pool_tensors(tiny):
    pool = ModelPool("cpu")
    refs = tiny.sources[:2]
    models = {ref: source_model(pool, ref, torch.float32) for ref in refs}
    for ref, m in models.items():
        for name, p in m.named_parameters():
            assert p.data_ptr() == pool.tensor(ref, name).data_ptr(), name
    model = LayerPathModel(models, [(refs[1], 2), (refs[0], 0, 0.7), (refs[0], 0)])
    loaded = {ref: AutoModelForCausalLM.from_pretrained(ref).eval() for ref in refs}
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    want = LayerPathModel(loaded, model.path)(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_same_logits_as_the_resident_mergers_copied_path(tiny, tied):
    a, b = tiny.tied_sources if tied else tiny.sources[:2]
    hops = [(a, 2, 1.0), (b, 0, 0.7), (b, 0, 1.0), (a, 1, 1.3), (b, 2, 1.0)]  # a ... b
    merger = ResidentMerger()
    merger._zero_copy_paths = False  # the copying implementation (merge() runs a path model)
    copied = merger.apply(Recipe(method="passthrough", layer_path=[
        {"model": m, "layer": i, "scale": s} for m, i, s in hops]))
    assert not isinstance(copied, LayerPathModel)
    pool = ModelPool("cpu")
    model = LayerPathModel({ref: source_model(pool, ref, torch.float32) for ref in (a, b)}, hops)
    ids, attn = batch()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=attn).logits[attn.bool()],
                               copied(input_ids=ids, attention_mask=attn).logits[attn.bool()],
                               rtol=1e-5, atol=1e-5)
