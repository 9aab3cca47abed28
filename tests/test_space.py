"""Search spaces: genome <-> recipe, granularity, transforms, validation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesearch.space import SearchSpace, SpaceConfig, SpaceError, load_space

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"a": "/m/a", "b": "/m/b", "c": "/m/c"}


def space(params: dict, method: str = "task_arithmetic", layers: int = 6, **kw) -> SearchSpace:
    cfg = {"method": method, "parameters": params} | kw
    return load_space(cfg, base="/m/base", sources=SOURCES, num_layers=layers)


def random_genome(sp: SearchSpace, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([rng.uniform(d.low, d.high) for d in sp.dims])


def value(recipe, param: str, source: int, tensor: str, layers: int = 6):
    """What the merge engine will use for one tensor (the same resolution path)."""
    from mergesearch.merging.layers import gradient_position

    return recipe.resolve(param, tensor, gradient_position(tensor, layers), source)


def test_global_weights_one_dim_per_source():
    sp = space({"weight": {"bounds": [0, 1], "init": 0.3}})
    assert sp.names == ["weight[a]", "weight[b]", "weight[c]"]
    assert list(sp.x0) == [0.3, 0.3, 0.3]
    recipe = sp.decode([0.1, 0.2, 0.9])
    assert [m.model for m in recipe.models] == list(SOURCES.values())
    assert [m.parameters["weight"] for m in recipe.models] == [0.1, 0.2, 0.9]
    assert recipe.base == "/m/base" and recipe.method == "task_arithmetic"


def test_layer_groups_place_each_value_on_its_layers():
    sp = space({"weight": {"granularity": {"groups": 4}, "bounds": [0, 1]}}, layers=6)
    assert sp.names[:2] == ["weight[a]@L0-3", "weight[a]@L4-5"]
    g = random_genome(sp)
    recipe = sp.decode(g)
    for i in range(3):
        for layer in range(6):
            want = g[2 * i + (0 if layer < 4 else 1)]
            got = value(recipe, "weight", i, f"model.layers.{layer}.mlp.up_proj.weight")
            assert got == pytest.approx(want)
        # outside the blocks: the mean of the source's group values
        assert value(recipe, "weight", i, "model.embed_tokens.weight") == pytest.approx(
            (g[2 * i] + g[2 * i + 1]) / 2)


def test_layer_ten_is_not_layer_one():
    sp = space({"weight": {"granularity": "layer", "bounds": [0, 1]}}, layers=12)
    g = np.linspace(0, 1, len(sp.dims))
    recipe = sp.decode(g)
    assert value(recipe, "weight", 0, "model.layers.10.mlp.w", 12) == pytest.approx(g[10])
    assert value(recipe, "weight", 0, "model.layers.1.mlp.w", 12) == pytest.approx(g[1])


def test_modules_and_groups_combine():
    sp = space({"density": {"granularity": {"groups": 3, "modules": ["self_attn", "mlp"]},
                            "bounds": [0.1, 1]},
                "weight": {"bounds": [0, 1]}}, method="ties")
    assert "density[b]@L3-5/mlp" in sp.names
    g = random_genome(sp, 1)
    recipe = sp.decode(g)
    idx = sp.names.index("density[b]@L3-5/mlp")
    assert value(recipe, "density", 1, "model.layers.4.mlp.down_proj.weight") == pytest.approx(
        g[idx])
    idx = sp.names.index("density[b]@L0-2/self_attn")
    assert value(recipe, "density", 1, "model.layers.2.self_attn.q_proj.weight") == \
        pytest.approx(g[idx])


@pytest.mark.parametrize("transforms", [[], ["abs"], ["normalize"], ["softmax"],
                                        ["abs", "normalize"], ["clamp"]])
def test_encode_inverts_decode(transforms):
    sp = space({"weight": {"granularity": {"groups": 2}, "bounds": [-2, 2],
                           "transform": transforms}})
    recipe = sp.decode(random_genome(sp, 3))
    again = sp.decode(sp.encode(recipe))
    for m0, m1 in zip(recipe.models, again.models, strict=True):
        for c0, c1 in zip(m0.parameters["weight"], m1.parameters["weight"], strict=True):
            assert c0.filter == c1.filter and c0.value == pytest.approx(c1.value, abs=1e-9)


def test_encode_of_in_bounds_genome_is_identity():
    sp = space({"weight": {"granularity": {"groups": 2}, "bounds": [0, 1]},
                "lambda": {"per": "shared", "bounds": [0.5, 2]}})
    g = random_genome(sp, 4)
    np.testing.assert_allclose(sp.encode(sp.decode(g)), g)


def test_normalize_and_softmax_act_across_sources():
    sp = space({"weight": {"bounds": [0, 5], "transform": "normalise"}})
    ws = [m.parameters["weight"] for m in sp.decode([1, 1, 2]).models]
    assert ws == pytest.approx([0.25, 0.25, 0.5])
    sp = space({"weight": {"bounds": [-5, 5], "transform": ["softmax"]}})
    ws = [m.parameters["weight"] for m in sp.decode([0, 0, np.log(2)]).models]
    assert ws == pytest.approx([0.25, 0.25, 0.5])


def test_clamp_uses_the_method_range():
    sp = space({"density": {"bounds": [-1, 2], "transform": ["clamp"]},
                "weight": {"bounds": [0, 1]}}, method="ties")
    dens = [m.parameters["density"] for m in sp.decode([-0.5, 0.4, 1.7] + [0.5] * 3).models]
    assert dens == [0.0, 0.4, 1.0]


def test_fixed_and_recipe_fields_pass_through():
    sp = space({"weight": {"bounds": [0, 1]}}, fixed={"normalize": True},
               recipe={"dtype": "bfloat16"})
    recipe = sp.decode(sp.x0)
    assert recipe.parameters["normalize"] is True and recipe.dtype == "bfloat16"


def test_shipped_spaces_load_and_decode():
    """The parameter spaces (the other kinds: tests/test_spaces.py)."""
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        if "kind:" in path.read_text():
            continue
        cfg = SpaceConfig.load(path)
        sources = {"a": "/m/a"} if cfg.method == "slerp" else SOURCES
        sp = SearchSpace(cfg, base="/m/base", sources=sources, num_layers=4)
        assert sp.decode(sp.x0).method == cfg.method, path
        assert cfg.description, f"{path.name} needs a description"


@pytest.mark.parametrize("params, method, match", [
    ({"weight": {"bounds": [1, 0]}}, "task_arithmetic", "low 1.0 must be below"),
    ({"weight": {"bounds": [0, 1], "init": 2}}, "task_arithmetic", "init: 2.0 is outside"),
    ({"wieght": {"bounds": [0, 1]}}, "task_arithmetic", "no parameter 'wieght'"),
    ({"lambda": {"bounds": [0, 1]}}, "task_arithmetic", "method-wide: use per: shared"),
    ({"normalize": {"per": "shared", "bounds": [0, 1]}}, "task_arithmetic", "switch"),
    ({"weight": {"bounds": [0, 1], "transform": ["sqrt"]}}, "task_arithmetic",
     "unknown transform 'sqrt'"),
    ({"lambda": {"per": "shared", "bounds": [0, 1], "transform": ["softmax"]}},
     "task_arithmetic", "needs per: source"),
    ({"weight": {"bounds": [0, 1], "granularity": {"groups": 9}}}, "task_arithmetic",
     "groups of 9 layers"),
    ({"weight": {"bounds": [0, 1], "granularity": {"layers": 2}}}, "task_arithmetic",
     "unknown key"),
    ({"weight": {"bounds": [0, 1]}}, "nope", "nope"),
    ({"t": {"per": "shared", "bounds": [0, 1]}}, "slerp", "cannot merge 3 source"),
    ({"density": {"bounds": [0, 1.5]}, "weight": {"bounds": [0, 1]}}, "ties",
     "exceeds the valid range"),
    ({"weight": {"bounds": [0, math.inf]}}, "task_arithmetic",
     r"parameters\.weight\.bounds: \[0\.0, inf\] must be finite"),
    ({"weight": {"bounds": [-math.inf, 1]}}, "task_arithmetic", r"weight\.bounds: .* finite"),
    ({"weight": {"bounds": [math.nan, 1]}}, "task_arithmetic", r"weight\.bounds: .* finite"),
    ({"weight": {"bounds": [0, 1], "init": math.nan}}, "task_arithmetic",
     r"weight\.init: nan must be a finite number"),
])
def test_bad_spaces_name_the_problem(params, method, match):
    with pytest.raises(SpaceError, match=match):
        space(params, method=method)


def test_missing_space_file():
    with pytest.raises(SpaceError, match="does not exist"):
        SpaceConfig.load("/no/such/space.yaml")


def test_infinite_bounds_in_yaml_are_one_line_naming_the_field(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("method: task_arithmetic\nparameters:\n  weight: {bounds: [0, .inf]}\n")
    with pytest.raises(SpaceError) as err:
        SpaceConfig.load(path)
    message = str(err.value)
    assert "\n" not in message and "parameters.weight.bounds" in message and "inf" in message


# ------------------------------------------------------------ module filters
MODULES = {"weight": {"granularity": {"groups": 1, "modules": ["self_attn", "mlp"]},
                      "bounds": [0, 1]}}


def _layer_tensors(layers: int) -> list[str]:
    parts = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "input_layernorm",
             "post_attention_layernorm"]
    return ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{p}.weight" for i in range(layers) for p in parts]


@pytest.mark.parametrize("groups", [1, 4])
def test_tensors_no_module_matches_take_their_layer_groups_mean(groups):
    params = {"weight": MODULES["weight"] | {"granularity": {"groups": groups,
                                                             "modules": ["self_attn", "mlp"]}}}
    sp = load_space({"method": "task_arithmetic", "parameters": params}, base="/m/base",
                    sources=SOURCES, num_layers=6, tensor_names=_layer_tensors(6))
    g = random_genome(sp, 5)
    recipe = sp.decode(g)
    for i, who in enumerate(SOURCES):
        mine = [v for n, v in zip(sp.names, g, strict=True) if n.startswith(f"weight[{who}]")]
        for layer in range(6):
            label = f"@L{layer}" if groups == 1 else ("@L0-3" if layer < 4 else "@L4-5")
            attn = g[sp.names.index(f"weight[{who}]{label}/self_attn")]
            mlp = g[sp.names.index(f"weight[{who}]{label}/mlp")]
            assert value(recipe, "weight", i, f"model.layers.{layer}.mlp.up_proj.weight") == \
                pytest.approx(mlp)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                got = value(recipe, "weight", i, f"model.layers.{layer}.{norm}.weight")
                assert got == pytest.approx((attn + mlp) / 2), (who, layer, norm)
        for outside in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            assert value(recipe, "weight", i, outside) == pytest.approx(np.mean(mine))
    again = sp.decode(sp.encode(recipe))
    assert again.models == recipe.models


def test_module_granularity_merges_layer_norms_with_their_layer(tiny):
    """Merge tiny checkpoints and compare every tensor with a hand computation."""
    from helpers import state

    from mergesearch.models.checkpoint import Checkpoint
    from mergesearch.models.resident import merge

    sources = {"a": tiny.sources[0], "b": tiny.sources[1]}
    sp = load_space({"method": "task_arithmetic", "parameters": MODULES}, base=tiny.base,
                    sources=sources, num_layers=3, tensor_names=Checkpoint(tiny.base).names)
    g = np.linspace(0.1, 0.9, len(sp.dims))  # layer 0: 0.1 .. ; never the global mean
    merged = merge(sp.decode(g)).state_dict()
    base = state(tiny.base)
    models = {who: state(ref) for who, ref in sources.items()}
    for name, b in base.items():
        want = b.clone()
        for who, sd in models.items():
            mine = {n: v for n, v in zip(sp.names, g, strict=True)
                    if n.startswith(f"weight[{who}]")}
            if ".layers." in name:
                layer = int(name.split(".")[2])
                attn, mlp = mine[f"weight[{who}]@L{layer}/self_attn"], \
                    mine[f"weight[{who}]@L{layer}/mlp"]
                w = attn if ".self_attn." in name else mlp if ".mlp." in name else (attn + mlp) / 2
            else:
                w = float(np.mean(list(mine.values())))
            want += w * (sd[name] - b)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6, msg=name)


def test_a_module_filter_matching_no_tensor_is_refused():
    params = {"weight": {"granularity": {"groups": 1, "modules": ["self_atn"]}, "bounds": [0, 1]}}
    with pytest.raises(SpaceError, match=r"modules: 'self_atn' matches no tensor .*"
                                         r"self_attn, mlp, input_layernorm"):
        space_with_names(params)
    # the filter follows the layer index once layers vary: 'q_proj' is 'self_attn.q_proj'
    params["weight"]["granularity"]["modules"] = ["q_proj"]
    with pytest.raises(SpaceError, match="'q_proj' matches no tensor"):
        space_with_names(params)
    params["weight"]["granularity"] = {"modules": ["q_proj"]}  # a plain substring: fine
    assert space_with_names(params).names == ["weight[a]/q_proj", "weight[b]/q_proj",
                                              "weight[c]/q_proj"]


def space_with_names(params: dict) -> SearchSpace:
    return load_space({"method": "task_arithmetic", "parameters": params}, base="/m/base",
                      sources=SOURCES, num_layers=6, tensor_names=_layer_tensors(6))
