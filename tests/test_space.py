"""Search spaces: genome <-> recipe, granularity, transforms, validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
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
])
def test_bad_spaces_name_the_problem(params, method, match):
    with pytest.raises(SpaceError, match=match):
        space(params, method=method)


def test_missing_space_file():
    with pytest.raises(SpaceError, match="does not exist"):
        SpaceConfig.load("/no/such/space.yaml")
