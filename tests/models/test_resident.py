"""The resident merger: correct tensors, in place, with clear errors before any write."""

from __future__ import annotations

import pytest
import torch
from helpers import state

from mergesearch.models.checkpoint import Checkpoint, ModelLoadError
from mergesearch.models.resident import ResidentMerger, merge
from mergesearch.recipe import Recipe, RecipeError, uniform_recipe

LAYERS = 3


def test_task_arithmetic_with_gradient_and_filter_matches_hand_computation(tiny):
    recipe = Recipe(
        method="task_arithmetic",
        base=tiny.base,
        models=[
            {"model": tiny.sources[0], "parameters": {"weight": [0.2, 1.0]}},
            {"model": tiny.sources[1], "parameters": {
                "weight": [{"filter": "mlp", "value": 0.7}, {"value": -0.3}]}},
        ],
        parameters={"lambda": 0.9},
    )
    model = merge(recipe)
    base, a, b = state(tiny.base), state(tiny.sources[0]), state(tiny.sources[1])
    merged = model.state_dict()
    for name in base:
        index = int(name.split(".")[2]) if ".layers." in name else None
        t = 0.0 if index is None else index / (LAYERS - 1)
        w_a = 0.2 + 0.8 * t
        w_b = 0.7 if "mlp" in name else -0.3
        want = base[name] + 0.9 * (w_a * (a[name] - base[name]) + w_b * (b[name] - base[name]))
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6, msg=name)


def test_parameters_are_overwritten_in_place(tiny):
    merger = ResidentMerger()
    first = merger.apply(uniform_recipe("linear", None, tiny.sources, weight=1.0))
    pointers = {n: p.data_ptr() for n, p in first.named_parameters()}
    before = {n: p.detach().clone() for n, p in first.named_parameters()}
    second = merger.apply(uniform_recipe("ties", tiny.base, tiny.sources, weight=1.0, density=0.3))
    assert second is first
    assert {n: p.data_ptr() for n, p in second.named_parameters()} == pointers
    assert any(not torch.equal(before[n], p) for n, p in second.named_parameters())


def test_same_recipe_twice_gives_identical_weights_and_seed_matters(tiny):
    merger = ResidentMerger()
    recipe = uniform_recipe("dare_ties", tiny.base, tiny.sources, weight=0.5, density=0.4)
    one = {n: p.detach().clone() for n, p in merger.apply(recipe).named_parameters()}
    two = {n: p.detach().clone() for n, p in merger.apply(recipe).named_parameters()}
    other = merger.apply(recipe.model_copy(update={"seed": 7}))
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert any(not torch.equal(one[n], p) for n, p in other.named_parameters())


def test_tied_embeddings_stay_tied(tiny):
    model = merge(uniform_recipe("task_arithmetic", tiny.tied_base, tiny.tied_sources, weight=0.5))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    base, a, b = (state(p) for p in (tiny.tied_base, *tiny.tied_sources))
    key = "model.embed_tokens.weight"
    want = base[key] + 0.5 * (a[key] - base[key]) + 0.5 * (b[key] - base[key])
    torch.testing.assert_close(model.lm_head.weight.detach(), want, rtol=0, atol=1e-6)


def test_untied_lm_head_is_merged_on_its_own(tiny):
    model = merge(uniform_recipe("linear", None, tiny.sources[:2], weight=1.0))
    a, b = state(tiny.sources[0]), state(tiny.sources[1])
    torch.testing.assert_close(model.lm_head.weight.detach(),
                               (a["lm_head.weight"] + b["lm_head.weight"]) / 2)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_vocab_mismatch_is_an_error_unless_recipe_says_base(tiny):
    recipe = uniform_recipe("task_arithmetic", tiny.base, [tiny.big_vocab], weight=1.0)
    with pytest.raises(RecipeError, match="vocabulary sizes differ.*vocab: base"):
        merge(recipe)
    model = merge(recipe.model_copy(update={"vocab": "base"}))
    # big_vocab has base's weights on the shared rows, so the merge is the base itself
    base = state(tiny.base)
    assert model.model.embed_tokens.weight.shape[0] == base["model.embed_tokens.weight"].shape[0]
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, base[name], msg=name)


def test_shape_mismatch_names_the_tensor_and_model(tiny):
    with pytest.raises(RecipeError, match=r"shape mismatch for .*wide.*cannot be merged"):
        merge(uniform_recipe("linear", None, [tiny.base, tiny.wide], weight=1.0))


def test_missing_model_is_a_clear_error(tiny, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="not found"):
        merge(uniform_recipe("linear", None, [tiny.base, missing], weight=1.0))


def test_pickle_checkpoint_refused_unless_allowed(tiny):
    recipe = uniform_recipe("linear", None, [tiny.base, tiny.pickle_only], weight=1.0)
    with pytest.raises(ModelLoadError, match="pickle.*allow_pickle"):
        merge(recipe)
    model = merge(recipe, allow_pickle=True)
    pickled = torch.load(f"{tiny.pickle_only}/pytorch_model.bin", weights_only=True)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(model.state_dict()[name],
                               (state(tiny.base)[name] + pickled[name]) / 2)


@pytest.mark.parametrize("copied", [True, False], ids=["copied", "path_model"])
def test_layer_path_stacks_layers_and_scales_inputs(tiny, copied):
    hops = [(tiny.base, 0), (tiny.deep, 4), (tiny.deep, 1), (tiny.base, 2)]
    recipe = Recipe(method="passthrough",
                    layer_path=[{"model": m, "layer": i} for m, i in hops])
    merger = ResidentMerger()
    merger._zero_copy_paths = not copied
    model = merger.apply(recipe)
    assert model.config.num_hidden_layers == 4
    sd = model.state_dict()
    for k, (path, layer) in enumerate(hops):
        src = state(path)
        for name, value in src.items():
            if f"layers.{layer}." in name:
                assert torch.equal(sd[name.replace(f"layers.{layer}.", f"layers.{k}.")], value)
    base = state(tiny.base)
    assert torch.equal(sd["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(sd["lm_head.weight"], base["lm_head.weight"])
    if not copied:  # the scales on a path model: tests/models/test_resident_paths.py
        return

    # Scale 0.5 on hop 1 must multiply that layer's input x.  RMSNorm hides a
    # scale from the attention branch, so the residual stream shows it: the
    # input of the post-attention norm becomes 0.5 x + attn(norm(x)) instead of
    # x + attn(norm(x)), i.e. it moves by exactly -0.5 x.
    def capture(store: dict, key: str):
        def hook(module, args, kwargs):
            store[key] = args[0] if args else kwargs["hidden_states"]
        return hook

    ids = torch.tensor([[1, 5, 7, 9]])
    layer = model.model.layers[1]
    plain: dict = {}
    handles = [layer.register_forward_pre_hook(capture(plain, "x"), with_kwargs=True),
               layer.post_attention_layernorm.register_forward_pre_hook(
                   capture(plain, "mid"), with_kwargs=True)]
    with torch.no_grad():
        plain_logits = model(ids).logits
    for h in handles:
        h.remove()
    scaled_recipe = recipe.model_copy(deep=True)
    scaled_recipe.layer_path[1].scale = 0.5
    assert merger.apply(scaled_recipe) is model  # same depth: weights overwritten in place
    scaled: dict = {}
    handle = layer.post_attention_layernorm.register_forward_pre_hook(capture(scaled, "mid"),
                                                                      with_kwargs=True)
    with torch.no_grad():
        scaled_logits = model(ids).logits
    handle.remove()
    assert not torch.allclose(plain_logits, scaled_logits)
    torch.testing.assert_close(scaled["mid"], plain["mid"] - 0.5 * plain["x"],
                               rtol=1e-4, atol=1e-4)
    # back to scale 1: the hook is gone
    merger.apply(recipe)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain_logits)


def test_layer_index_out_of_range_is_an_error(tiny):
    recipe = Recipe(method="passthrough", layer_path=[{"model": tiny.base, "layer": 0},
                                                      {"model": tiny.base, "layer": 3}])
    with pytest.raises(RecipeError, match=r"layer 3 is past the last layer .*3 layers"):
        merge(recipe)


def test_checkpoint_reads_safetensors_lazily(tiny):
    ckpt = Checkpoint(tiny.base)
    assert "lm_head.weight" in ckpt
    assert ckpt.num_layers == LAYERS
    with pytest.raises(ModelLoadError, match="no tensor"):
        ckpt.tensor("nope")


def test_lines_scales_each_layer_task_vector(tiny):
    plain = uniform_recipe("task_arithmetic", tiny.base, tiny.sources[:2], weight=0.6)
    lined = Recipe.from_dict(plain.to_dict() | {"lines": {"alpha": 0.2, "beta": 0.6}})
    merger = ResidentMerger()
    merged = {k: v.clone() for k, v in merger.apply(plain).state_dict().items()}
    scaled = merger.apply(lined).state_dict()
    base = state(tiny.base)
    for name in base:
        if ".layers." in name:
            depth = int(name.split(".")[2]) / (LAYERS - 1)
        else:  # embeddings are shallowest, final norm and head deepest (our choice)
            depth = 0.0 if "embed" in name else 1.0
        want = base[name] + (0.2 + 0.6 * depth) * (merged[name] - base[name])
        torch.testing.assert_close(scaled[name], want, rtol=0, atol=1e-6, msg=name)


def test_global_slerp_uses_one_angle_for_the_whole_model(tiny):
    recipe = Recipe(method="global_slerp", base=tiny.sources[0],
                    models=[{"model": tiny.sources[1]}], parameters={"t": 0.3})
    a, b = state(tiny.sources[0]), state(tiny.sources[1])
    names = sorted(a)
    va = torch.cat([a[n].reshape(-1) for n in names]).double()
    vb = torch.cat([b[n].reshape(-1) for n in names]).double()
    omega = torch.acos(va @ vb / (va.norm() * vb.norm()))
    ca = torch.sin(0.7 * omega) / torch.sin(omega)
    cb = torch.sin(0.3 * omega) / torch.sin(omega)
    merged = merge(recipe).state_dict()
    for n in names:
        want = (ca * a[n].double() + cb * b[n].double()).float()
        torch.testing.assert_close(merged[n], want, rtol=1e-5, atol=1e-6, msg=n)


def _broken(src: str, path, edit) -> str:
    """A copy of checkpoint ``src`` with ``edit(model)`` applied to its weights."""
    from helpers import save
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        edit(model)
    return save(model, path)


def _poison(model) -> None:
    w = model.model.layers[0].mlp.up_proj.weight
    w[0, 0] = w[3, 1] = float("nan")
    w[5, 2] = float("-inf")


@pytest.mark.parametrize("method, extra", [("linear", {}), ("task_arithmetic", {}),
                                           ("dare_ties", {"density": 0.05})])
def test_non_finite_source_fails_the_plan_naming_model_and_tensor(tiny, tmp_path, method,
                                                                  extra):
    """Refused once, when the models are planned (a worker's start-up), for every method:
    dare_ties would otherwise drop the NaN entry and 'succeed' on a broken model."""
    bad = _broken(tiny.sources[0], tmp_path / "nan", _poison)
    base = None if method == "linear" else tiny.base
    recipe = uniform_recipe(method, base, [bad, tiny.sources[1]], weight=1.0, **extra)
    merger = ResidentMerger()
    message = (rf"model '{bad}' has non-finite values in 'model.layers.0.mlp.up_proj.weight' "
               r"\(2 NaN, 1 inf\): fix or drop")
    with pytest.raises(ModelLoadError, match=message):
        merger.plan(recipe)
    with pytest.raises(ModelLoadError, match=message):
        merger.apply(recipe)


def test_non_finite_base_is_named(tiny, tmp_path):
    bad = _broken(tiny.base, tmp_path / "inf_base",
                  lambda m: m.model.norm.weight.fill_(float("inf")))
    with pytest.raises(ModelLoadError, match=rf"model '{bad}' .* 'model.norm.weight' "
                                             r"\(0 NaN, 64 inf\)"):
        merge(uniform_recipe("ties", bad, tiny.sources[:2], weight=1.0, density=0.5))


def test_weights_are_checked_once_per_tensor_not_per_candidate(tiny, monkeypatch):
    from mergesearch.models import resident

    seen = []
    check = resident.check_finite
    monkeypatch.setattr(resident, "check_finite",
                        lambda ref, name, x: (seen.append((ref, name)), check(ref, name, x)))
    merger = ResidentMerger()
    recipe = uniform_recipe("dare_ties", tiny.base, tiny.sources[:2], weight=0.5, density=0.4)
    merger.apply(recipe)
    tensors = len(state(tiny.base))
    assert len(seen) == len(set(seen)) == 3 * tensors
    merger.apply(recipe.model_copy(update={"seed": 3}))
    merger.apply(uniform_recipe("ties", tiny.base, tiny.sources[:2], weight=1.0, density=0.3))
    assert len(seen) == 3 * tensors


def test_config_claiming_more_layers_than_tensors_names_that_model(tiny, tmp_path):
    import json
    import shutil

    bad = tmp_path / "deep_config"
    shutil.copytree(tiny.base, bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = LAYERS + 1
    (bad / "config.json").write_text(json.dumps(config))
    want = rf"model '{bad}': config says {LAYERS + 1} layers, tensors have {LAYERS}"
    with pytest.raises(ModelLoadError, match=want):  # as the base: not blamed on a source
        merge(uniform_recipe("task_arithmetic", str(bad), tiny.sources[:2], weight=0.5))
    with pytest.raises(ModelLoadError, match=want):  # as a source
        merge(uniform_recipe("task_arithmetic", tiny.base, [tiny.sources[0], str(bad)],
                             weight=0.5))


def test_one_merger_switches_between_methods_with_and_without_a_base(tiny):
    """The plan cache knows whether the method reads the base tensors."""
    merger = ResidentMerger()
    base, a, b = state(tiny.base), state(tiny.sources[0]), state(tiny.sources[1])
    linear = uniform_recipe("linear", tiny.base, tiny.sources[:2], weight=1.0)
    arithmetic = uniform_recipe("task_arithmetic", tiny.base, tiny.sources[:2], weight=0.5)
    for _ in range(2):
        merged = merger.apply(linear).state_dict()
        for name in base:
            torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, msg=name)
        merged = merger.apply(arithmetic).state_dict()
        for name in base:
            want = base[name] + 0.5 * (a[name] - base[name]) + 0.5 * (b[name] - base[name])
            torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6, msg=name)
