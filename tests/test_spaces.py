"""Search-space kinds: the registry, per-source init, layer paths, components, composition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import state

from mergesearch.recipe import Recipe
from mergesearch.space import SearchSpace, SpaceConfig, SpaceError, load_space
from mergesearch.spaces import space_kinds
from mergesearch.spaces.components import count_distinct_modules
from mergesearch.spaces.layer_path import recipe_ref

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"a": "/m/a", "b": "/m/b", "c": "/m/c"}


def bind(cfg, sources=SOURCES, layers: int = 3, **kw):
    return load_space(cfg, base="/m/base", sources=sources, num_layers=layers, **kw)


def hops(recipe: Recipe) -> list[tuple[str, int, float]]:
    return [(h.model, h.layer, h.scale) for h in recipe.layer_path]


# ------------------------------------------------------------------ registry
def test_kinds_are_registered_and_parameters_is_the_default():
    assert {"parameters", "layer_path", "components"} <= set(space_kinds())
    sp = bind({"method": "task_arithmetic", "parameters": {"weight": {"bounds": [0, 1]}}})
    assert isinstance(sp, SearchSpace)
    assert isinstance(bind({"kind": "layer_path"}).start, Recipe)


@pytest.mark.parametrize("kind", ["layerpath", 3])
def test_unknown_kind_names_the_known_ones(kind):
    with pytest.raises(SpaceError, match=r"space\.kind: unknown search space kind .*"
                                         r"known: components, layer_path, parameters"):
        bind({"kind": kind})


def test_a_kind_validates_its_own_keys():
    with pytest.raises(SpaceError, match=r"space\.repeat: unknown key"):
        bind({"kind": "layer_path", "repeat": 2})
    with pytest.raises(SpaceError, match=r"space\.models\[1\]: 'd' is not a source"):
        bind({"kind": "layer_path", "models": ["a", "d"]})


def test_parameter_dumps_leave_kind_out_and_every_dump_loads_back():
    cfg = SpaceConfig.load(ROOT / "search_spaces/task_arithmetic.yaml")
    assert "kind" not in cfg.model_dump(mode="json")  # fingerprints of old studies still match
    for name in ("task_arithmetic.yaml", "layer_path.yaml", "components.yaml"):
        sources = {"rev": "/m/r", "srt": "/m/s"}
        sp = bind(ROOT / "search_spaces" / name, sources=sources)
        again = bind(sp.config.model_dump(mode="json"), sources=sources)  # as Ray Tune does
        assert again.names == sp.names and again.start == sp.start, name
        assert bind(sp.config, sources=sources).names == sp.names  # a config read already


# ---------------------------------------------------------- parameter space
def ta(init, per="source", **extra):
    return {"method": "task_arithmetic",
            "parameters": {"weight": {"per": per, "bounds": [0, 1], "init": init}} | extra}


@pytest.mark.parametrize("init", [{"b": 1.0, "*": 0.0}, [0.0, 1.0, 0.0],
                                  {"a": 0.0, "b": 1.0, "c": 0.0}])
def test_init_per_source_starts_from_one_expert(init):
    sp = bind(ta(init))
    assert list(sp.x0) == [0.0, 1.0, 0.0]
    assert [m.parameters["weight"] for m in sp.start.models] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("init, per, match", [
    ({"a": 1.0}, "source", r"weight\.init: no value for b, c: name every source or add '\*'"),
    ({"d": 1.0, "*": 0}, "source", r"weight\.init: 'd' is not a source model"),
    ([1.0, 0.0], "source", r"weight\.init: 2 values for 3 sources"),
    ({"a": 2.0, "*": 0}, "source", r"weight\.init\.a: 2\.0 is outside the bounds"),
    ({"*": 0.5}, "shared", r"weight\.init: a value per source needs per: source"),
])
def test_bad_per_source_init_names_the_problem(init, per, match):
    cfg = ta(init, per) if per == "source" else {
        "method": "task_arithmetic",
        "parameters": {"weight": {"bounds": [0, 1]},
                       "lambda": {"per": "shared", "bounds": [0, 1], "init": init}}}
    match = match if per == "source" else match.replace("weight", "lambda")
    with pytest.raises(SpaceError, match=match):
        bind(cfg)


@pytest.mark.parametrize("name", ["task_arithmetic_lambda.yaml", "ties_layer_groups_lambda.yaml"])
def test_lambda_variants_decode_lambda_from_the_genome(name):
    sp = bind(ROOT / "search_spaces" / name, layers=4)
    assert sp.start.parameters["lambda"] == 1.0
    g = sp.x0.copy()
    g[sp.names.index("lambda")] = 1.7
    recipe = sp.decode(g)
    assert recipe.parameters["lambda"] == pytest.approx(1.7)
    assert recipe.resolve("lambda", "model.layers.3.mlp.up_proj.weight", 1.0) == \
        pytest.approx(1.7)
    np.testing.assert_allclose(sp.encode(recipe), g)


# ---------------------------------------------------------------- layer path
def path_space(**kw):
    return bind({"kind": "layer_path", "models": ["a", "b"]} | kw)


def test_layer_path_layout_and_start_is_model_a():
    sp = path_space(repeats=2, fix_ends=False)
    assert len(sp.dims) == 2 * 12 and sp.dims[0].kind == "binary" and sp.dims[12].kind == "real"
    assert sp.names[:4] == ["path[r0]/a@L0", "path[r0]/a@L1", "path[r0]/a@L2", "path[r0]/b@L0"]
    assert hops(sp.start) == [("/m/a", 0, 1.0), ("/m/a", 1, 1.0), ("/m/a", 2, 1.0)]
    assert sp.start.method == "passthrough"
    assert (sp.dims[12].low, sp.dims[12].high) == (0.5, 2.0)


def test_layer_path_decodes_indicators_in_layout_order_with_their_scales():
    sp = path_space(repeats=2, fix_ends=False)
    g = np.zeros(24)
    g[12:] = 1.0
    for name, scale in [("path[r0]/b@L1", 1.5), ("path[r1]/a@L2", 0.7), ("path[r0]/a@L0", 1.0)]:
        i = sp.names.index(name)
        g[i], g[12 + i] = 1.0, scale
    assert hops(sp.decode(g)) == [("/m/a", 0, 1.0), ("/m/b", 1, 1.5), ("/m/a", 2, 0.7)]


def test_fix_ends_opens_and_closes_with_model_a():
    sp = path_space(repeats=2)
    assert len(sp.names) == 2 * 11 and "path[r0]/a@L0" not in sp.names
    assert hops(sp.start) == [("/m/a", 0, 1.0), ("/m/a", 1, 1.0), ("/m/a", 2, 1.0)]
    g = np.zeros(22)
    g[11:] = 1.0
    assert hops(sp.decode(g)) == [("/m/a", 0, 1.0), ("/m/a", 2, 1.0)]  # all off: the ends
    g[sp.names.index("path[r1]/b@L0")] = 1
    assert hops(sp.decode(g)) == [("/m/a", 0, 1.0), ("/m/b", 0, 1.0), ("/m/a", 2, 1.0)]
    assert sp.describe().splitlines()[1].endswith("opens with a@L0 and closes with a@L2")


def test_an_empty_path_is_refused():
    sp = path_space(fix_ends=False)
    with pytest.raises(SpaceError, match="turns every layer slot off"):
        sp.decode(np.r_[np.zeros(6), np.ones(6)])


@pytest.mark.parametrize("fix_ends", [True, False])
def test_layer_path_encode_inverts_decode(fix_ends):
    sp = path_space(repeats=3, fix_ends=fix_ends)
    np.testing.assert_array_equal(sp.encode(sp.start), sp.x0)
    rng = np.random.default_rng(0)
    n = len(sp.dims) // 2
    for _ in range(20):
        g = np.r_[rng.integers(0, 2, n), rng.uniform(0.5, 2.0, n)]
        if not fix_ends and not g[:n].any():
            continue
        recipe = sp.decode(g)
        again = sp.encode(recipe)
        assert sp.decode(again) == recipe
        # the earliest slots that fit: a canonical genome comes back unchanged
        np.testing.assert_array_equal(sp.encode(sp.decode(again)), again)


def test_paths_the_layout_cannot_express_are_refused():
    sp = path_space(fix_ends=False)
    ref = {"a": "/m/a", "b": "/m/b"}

    def path(*hs):
        return Recipe.from_dict({"method": "passthrough", "layer_path": [
            {"model": ref[m], "layer": layer, "scale": s} for m, layer, s in hs]})

    with pytest.raises(SpaceError, match=r"layer_path\[1\] .* no slot left"):
        sp.encode(path(("b", 0, 1.0), ("a", 2, 1.0)))  # a comes before b in one repetition
    with pytest.raises(SpaceError, match=r"layer_path\[0\]\.scale 3\.0 is outside"):
        sp.encode(path(("a", 0, 3.0)))
    with pytest.raises(SpaceError, match="must open with a@L0 and close with a@L2"):
        path_space().encode(path(("a", 0, 1.0), ("b", 2, 1.0)))


def test_layer_path_options_are_checked():
    with pytest.raises(SpaceError, match=r"scale_bounds: .* must contain 1\.0"):
        path_space(scale_bounds=[1.5, 2])
    with pytest.raises(SpaceError, match="'a' is in the pool twice"):
        path_space(models=["a", "a"])
    sp = path_space(search_scales=False)
    assert len(sp.dims) == 5 and all(d.kind == "binary" for d in sp.dims)


def test_matrix_scales_scale_a_hop_by_the_layer_before_it():
    sp = path_space(repeats=2, scales="matrix")  # pool a, b: 3 layers each, M = 6
    n = 11  # slots: 2 * 6, minus the opening a@L0
    assert len(sp.dims) == n + 36 and sp.names[n] == "W[a@L0->a@L0]"
    g = sp.x0.copy()
    np.testing.assert_array_equal(g[n:], 1.0)
    assert hops(sp.decode(g)) == [("/m/a", 0, 1.0), ("/m/a", 1, 1.0), ("/m/a", 2, 1.0)]
    # path a0 -> b1 -> a1(r1) -> b1(r1) -> a2: the scale of each hop is W[previous, its layer]
    g[:n] = 0
    for name in ("path[r0]/b@L1", "path[r1]/a@L1", "path[r1]/b@L1"):
        g[sp.names.index(name)] = 1
    w = {"W[a@L0->b@L1]": 1.5, "W[b@L1->a@L1]": 0.6, "W[a@L1->b@L1]": 1.9,
         "W[b@L1->a@L2]": 0.7}  # the last: the closing hop, which runs at scale 1
    for name, value in w.items():
        g[sp.names.index(name)] = value
    assert hops(sp.decode(g)) == [("/m/a", 0, 1.0), ("/m/b", 1, 1.5), ("/m/a", 1, 0.6),
                                  ("/m/b", 1, 1.9), ("/m/a", 2, 1.0)]
    again = sp.encode(sp.decode(g))
    assert sp.decode(again) == sp.decode(g)
    assert "matrix W" in sp.describe()


def test_matrix_scales_refuse_a_path_one_matrix_cannot_give():
    sp = path_space(repeats=2, scales="matrix", fix_ends=False)

    def path(*hs):
        return Recipe.from_dict({"method": "passthrough", "layer_path": [
            {"model": f"/m/{m}", "layer": layer, "scale": s} for m, layer, s in hs]})

    # a1 follows a0 twice, at two scales
    with pytest.raises(SpaceError, match=r"layer_path\[3\]\.scale 1\.2 differs from "
                                         r"layer_path\[1\]\.scale 1\.5"):
        sp.encode(path(("a", 0, 1.0), ("a", 1, 1.5), ("a", 0, 1.0), ("a", 1, 1.2)))
    with pytest.raises(SpaceError, match="the first hop has no previous layer"):
        sp.encode(path(("a", 0, 1.3)))
    same = path(("a", 0, 1.0), ("a", 1, 1.5), ("a", 0, 0.8), ("a", 1, 1.5))
    assert hops(sp.decode(sp.encode(same))) == hops(same)


def test_a_decoded_path_merges_to_its_layer_copies(tiny):
    """The merge engine's model of a decoded path equals an HF model built here from
    the hops' layers, with the scales applied by hooks of our own."""
    from transformers import LlamaForCausalLM

    from mergesearch.models.resident import merge

    a, b = tiny.sources[0], tiny.sources[1]
    sp = load_space({"kind": "layer_path", "repeats": 2}, base=tiny.base,
                    sources={"a": a, "b": b}, num_layers=3)
    g = np.r_[np.zeros(11), np.ones(11)]
    for name, scale in [("path[r0]/b@L1", 1.5), ("path[r1]/a@L1", 0.6), ("path[r1]/b@L2", 1.0)]:
        i = sp.names.index(name)
        g[i], g[11 + i] = 1, scale
    recipe = sp.decode(g)
    path = hops(recipe)
    assert path == [(a, 0, 1.0), (b, 1, 1.5), (a, 1, 0.6), (b, 2, 1.0), (a, 2, 1.0)]

    sources = {a: state(a), b: state(b)}
    want = {}
    for name, t in sources[a].items():  # ends from a: the first and the last hop's model
        if ".layers." not in name:
            want[name] = t
    for k, (ref, layer, _) in enumerate(path):
        for name, t in sources[ref].items():
            if f".layers.{layer}." in name:
                want[name.replace(f".layers.{layer}.", f".layers.{k}.")] = t
    model = merge(recipe)
    got = model.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)

    from helpers import tiny_config

    ref_model = LlamaForCausalLM(tiny_config(num_hidden_layers=len(path))).eval()
    ref_model.load_state_dict(want)
    for layer, (_, _, scale) in zip(ref_model.model.layers, path, strict=True):
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, s=scale: ((args[0] * s, *args[1:]), kwargs)
            if args else (args, kwargs | {"hidden_states": kwargs["hidden_states"] * s}),
            with_kwargs=True)
    ids = torch.tensor([[3, 5, 7, 11, 13, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref_model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


# --------------------------------------------------------- composition (over)
PS = {"method": "task_arithmetic", "base": "/m/base",
      "models": [{"model": "/m/a", "parameters": {"weight": 0.7}},
                 {"model": "/m/b", "parameters": {"weight": 0.4}}]}


def test_a_recipe_defined_model_joins_the_pool(tmp_path):
    (tmp_path / "ps.yaml").write_text(Recipe.from_dict(PS).to_yaml())
    (tmp_path / "dfs.yaml").write_text("kind: layer_path\nover: ps.yaml\nmodels: [b]\n")
    sp = bind(tmp_path / "dfs.yaml")
    ref = recipe_ref(Recipe.from_dict(PS).to_dict())
    assert [m.name for m in sp.pool] == ["over", "b"] and sp.pool[0].ref == ref
    assert hops(sp.start) == [(ref, 0, 1.0), (ref, 1, 1.0), (ref, 2, 1.0)]  # the PS model
    assert sp.config.over == Recipe.from_dict(PS).to_dict()  # content, not the path
    g = sp.x0.copy()
    g[sp.names.index("path[r0]/b@L1")] = 1
    assert [(m, layer) for m, layer, _ in hops(sp.decode(g))] == [
        (ref, 0), (ref, 1), ("/m/b", 1), (ref, 2)]
    np.testing.assert_array_equal(sp.encode(sp.decode(g)), g)
    # the same as a named pool member; its depth is its first model's unless given
    member = bind({"kind": "layer_path", "models": [{"name": "ps", "recipe": PS, "layers": 2}]})
    assert member.pool[0].ref == ref and member.pool[0].depth == 2
    with pytest.raises(SpaceError, match=r"space\.over: .*does not exist|space\.over: .*read"):
        bind({"kind": "layer_path", "over": str(tmp_path / "missing.yaml")})


def test_a_recipe_defined_model_ref_is_the_engines(tiny):
    recipe_model = pytest.importorskip("mergesearch.models.recipe_model")
    data = Recipe.from_dict(PS).to_dict()
    assert recipe_ref(data) == recipe_model.recipe_ref(data)


# -------------------------------------------------------------- components
def comp_space(tiny, **kw):
    from mergesearch.models.checkpoint import Checkpoint

    sources = dict(zip("abc", tiny.sources, strict=True))
    cfg = {"kind": "components", "merged": {"weight": {"a": 0.5, "b": 0.3, "c": 0.8},
                                            "lambda": 0.9}} | kw
    return load_space(cfg, base=tiny.base, sources=sources, num_layers=3,
                      tensor_names=Checkpoint(tiny.base).names), sources


@pytest.mark.parametrize("rest", ["merged", "b"])
def test_component_merge_selects_each_block_exactly(tiny, rest):
    from mergesearch.models.resident import merge

    sp, sources = comp_space(tiny, rest=rest)
    assert sp.dims[0].kind == "categorical" and sp.dims[0].choices == ("a", "b", "c", "merged")
    pick = ["a", "merged", "c", "b", "merged", "a"]  # attention@L0, mlp@L0, attention@L1 ...
    recipe = sp.decode([sp.options.index(p) for p in pick])
    merged = merge(recipe).state_dict()
    base = state(tiny.base)
    models = {n: state(r) for n, r in sources.items()}
    w = {"a": 0.5, "b": 0.3, "c": 0.8}

    def task_arithmetic(name):
        return base[name] + 0.9 * sum(w[n] * (models[n][name] - base[name]) for n in w)

    for name in base:
        choice = rest
        if ".layers." in name:
            layer = int(name.split(".")[2])
            for j, block in enumerate(("self_attn", "mlp")):
                if f".{block}." in name:
                    choice = pick[2 * layer + j]
        if choice == "merged":
            torch.testing.assert_close(merged[name], task_arithmetic(name), rtol=0, atol=1e-6,
                                       msg=name)
        else:  # a copied module: bit for bit
            assert torch.equal(merged[name], models[choice][name]), name
    assert sp.decode(sp.encode(recipe)) == recipe
    np.testing.assert_array_equal(sp.encode(recipe), [sp.options.index(p) for p in pick])


def test_components_start_is_the_merge_and_options_are_checked(tiny):
    sp, _ = comp_space(tiny)
    assert all(sp.options[int(i)] == "merged" for i in sp.x0)
    assert sp.decode(sp.x0).method == "linear"
    with pytest.raises(SpaceError, match=r"space\.blocks\.mlp: 'ffn' matches no tensor .*"
                                         r"mlp, post_attention_layernorm, self_attn"):
        comp_space(tiny, blocks={"attention": "self_attn", "mlp": "ffn"})
    with pytest.raises(SpaceError, match=r"merged\.method: 'ties' is not a linear combination"):
        comp_space(tiny, merged={"method": "ties"})
    with pytest.raises(SpaceError, match=r"space\.init: 'd' is none of a, b, c, merged"):
        comp_space(tiny, init="d")
    sp, _ = comp_space(tiny, choices=["b"], init="b", merged={"method": "linear"})
    assert sp.options == ["b", "merged"] and len(sp.decode(sp.x0).models) == 3  # no base


def test_distinct_modules_count_the_merge_plus_each_expert_block(tiny):
    sp, _ = comp_space(tiny)
    merged = sp.options.index("merged")
    assert count_distinct_modules(sp.decode([merged] * 6)) == 6
    assert count_distinct_modules(sp.decode([0, merged, 2, merged, merged, 1])) == 6 + 3
    assert count_distinct_modules(sp.decode([0] * 6)) == 12
    with pytest.raises(SpaceError, match="not 'task_arithmetic'"):
        count_distinct_modules(Recipe.from_dict(PS))


def test_recipe_objectives_are_known_exactly_as_functions_of_the_genome(tiny):
    from mergesearch.evaluation import ObjectiveConfig
    from mergesearch.objectives import exact_objectives

    sp, _ = comp_space(tiny)
    objectives = [ObjectiveConfig(name="score", metric="char_accuracy"),
                  ObjectiveConfig(name="storage", source="recipe", metric="distinct_modules",
                                  direction="minimize")]
    exact = exact_objectives(sp.decode, objectives)
    assert set(exact) == {"storage"}  # the evaluator's metric is not a function of the genome
    merged = float(sp.options.index("merged"))
    for genome in ([merged] * 6, [0.0, merged, 2.0, merged, merged, 1.0], [0.0] * 6):
        assert exact["storage"](genome) == count_distinct_modules(sp.decode(genome))
    assert exact_objectives(None, objectives) == {}


# ------------------------------------------------------------ shipped files
@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_every_shipped_space_binds_to_zoo_like_models_and_merges_its_start(tiny):
    from mergesearch.models.checkpoint import Checkpoint
    from mergesearch.models.resident import merge

    names = Checkpoint(tiny.base).names
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        sources = dict(zip(["rev", "srt", "dup"], tiny.sources, strict=True))
        if "slerp" in path.name:
            sources = {"rev": tiny.sources[0]}
        sp = load_space(path, base=tiny.base, sources=sources, num_layers=3, tensor_names=names)
        assert sp.config.description, f"{path.name} needs a description"
        assert len(sp.describe().splitlines()) >= 1
        model = merge(sp.start)
        assert torch.isfinite(next(iter(model.state_dict().values()))).all(), path.name
