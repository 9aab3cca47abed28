"""Properties every registered merge method must have, plus the layer helpers.

The method suite is parametrised over ``mergesearch.merging.methods()``, so a
newly registered method is covered without touching this file.  Keyword
arguments are built from each method's ``params`` specs only.
"""

from __future__ import annotations

import inspect
import keyword

import pytest
import torch

from mergesearch.merging import methods
from mergesearch.merging.layers import (
    Source,
    assemble_path,
    gradient_position,
    is_pre,
    layer_index,
    lines_scale,
    with_layer,
)
from mergesearch.recipe import Recipe

METHODS = methods()
NAMES = sorted(METHODS)
SHAPES = [(6, 5), (11,), (4, 3, 2), ()]

# The merge function of passthrough copies one tensor per call (the recipe's
# layer_path picks which); the registry's min/max_models count recipe models.
FN_INPUTS = {"passthrough": 1}


def n_inputs(method) -> int:
    if method.name in FN_INPUTS:
        return FN_INPUTS[method.name]
    if method.max_models is not None:
        return method.max_models
    return max(3, method.min_models)


def value_for(param, variant: str):
    """A valid value from the spec: the default, or mid-range when required.

    The "interior" variant moves defaults sitting on a bound (density = 1) to the
    middle of the range, so sparsifying and random paths run too.
    """
    if param.kind is bool:
        return param.default if param.default is not None else True
    bounded = param.low is not None and param.high is not None
    mid = (param.low + param.high) / 2 if bounded else 1.0
    if param.default is None:
        return mid
    if variant == "interior" and bounded and param.default in (param.low, param.high):
        return mid
    return param.default


def build_kwargs(method, base, models, variant: str) -> dict:
    n = len(models)
    kw = {}
    for p in method.params:
        v = value_for(p, variant)
        kw[p.arg] = [v] * n if p.per_model else v
    if method.prepare is not None:
        kw |= method.prepare([(base, list(models))])
    return kw


def inputs(method, shape, dtype=torch.float32, seed=0, identical=False):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=dtype)
    n = n_inputs(method)
    if identical:
        models = [base.clone() for _ in range(n)]
    else:
        models = [base + torch.randn(shape, generator=gen, dtype=dtype) for _ in range(n)]
    return (base if method.needs_base else None), models, base


def run(method, base, models, variant, seed=0):
    kw = build_kwargs(method, base, models, variant)
    return method.fn(base, models, seed=seed, **kw)


CASES = [(name, variant) for name in NAMES for variant in ("defaults", "interior")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name, variant", CASES)
def test_shape_dtype_finite(name, variant, shape, dtype):
    method = METHODS[name]
    base, models, _ = inputs(method, shape, dtype)
    out = run(method, base, models, variant)
    assert out.shape == torch.Size(shape)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name, variant", CASES)
def test_deterministic_for_a_seed(name, variant, shape):
    method = METHODS[name]
    base, models, _ = inputs(method, shape)
    assert torch.equal(run(method, base, models, variant, seed=5),
                       run(method, base, models, variant, seed=5))
    if not method.stochastic:  # and the generator is not used at all
        assert torch.equal(run(method, base, models, variant, seed=5),
                           run(method, base, models, variant, seed=6))


@pytest.mark.parametrize("name, variant", CASES)
def test_does_not_modify_inputs(name, variant):
    method = METHODS[name]
    base, models, _ = inputs(method, (6, 5))
    saved = [t.clone() for t in ([base] if base is not None else []) + models]
    run(method, base, models, variant)
    for before, after in zip(saved, ([base] if base is not None else []) + models, strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name, variant", CASES)
def test_identical_models_give_the_tensor_back(name, variant, shape, dtype):
    method = METHODS[name]
    base, models, x = inputs(method, shape, dtype, identical=True)
    out = run(method, base, models, variant)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, x, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_param_specs(name):
    method = METHODS[name]
    names = [p.name for p in method.params]
    assert len(names) == len(set(names)), names
    args = [p.arg for p in method.params]
    assert all(a.isidentifier() and not keyword.iskeyword(a) for a in args), args
    for p in method.params:
        if p.low is not None and p.high is not None:
            assert p.low <= p.high, p
        if p.default is None:
            continue
        if p.kind is bool:
            assert isinstance(p.default, bool), p
        else:
            assert not isinstance(p.default, bool), p
            assert p.low is None or p.default >= p.low, p
            assert p.high is None or p.default <= p.high, p
        p.check(p.default, where=name)  # does not raise
    # every parameter (and whatever prepare adds) is a keyword of the merge function
    sig = inspect.signature(method.fn)
    accepts_any = any(q.kind is q.VAR_KEYWORD for q in sig.parameters.values())
    assert accepts_any or "seed" in sig.parameters
    if not accepts_any:
        assert set(args) <= set(sig.parameters), (args, list(sig.parameters))


@pytest.mark.parametrize("name", NAMES)
def test_flags_are_consistent(name):
    method = METHODS[name]
    assert method.name == name
    assert method.min_models >= 0
    assert method.max_models is None or method.max_models >= max(1, method.min_models)
    if method.task_vectors:  # task vectors are differences from the base
        assert method.needs_base


@pytest.mark.parametrize("name", NAMES)
def test_spec_values_make_a_valid_recipe(name):
    """Values chosen from the specs pass recipe validation and resolve back unchanged."""
    method = METHODS[name]
    n = 1 if method.max_models == 1 else max(2, method.min_models)
    data = {"method": name, "models": [{"model": f"m{i}"} for i in range(n)], "parameters": {}}
    if method.needs_base:
        data["base"] = "base"
    if name == "passthrough":
        data["layer_path"] = [{"model": "m0", "layer": 0}]
    for p in method.params:
        data["parameters"][p.name] = value_for(p, "interior")
    recipe = Recipe.from_dict(data)
    for p in method.params:
        got = recipe.resolve(p.name, "model.layers.0.mlp.up_proj.weight", 0.5,
                             0 if p.per_model else None)
        assert got == value_for(p, "interior")


# ===================================================================== layers
@pytest.mark.parametrize(
    "name, index",
    [
        ("model.layers.3.mlp.down_proj.weight", 3),
        ("model.layers.12.self_attn.q_proj.weight", 12),
        ("transformer.h.11.attn.c_attn.weight", 11),
        ("h.0.ln_1.weight", 0),
        ("model.blocks.7.attn.weight", 7),
        ("bert.encoder.layer.5.attention.self.query.weight", 5),
        ("gpt_neox.layers.2.attention.dense.weight", 2),
        ("model.embed_tokens.weight", None),
        ("model.norm.weight", None),
        ("lm_head.weight", None),
        ("transformer.wte.weight", None),
        ("model.sublayers.3.weight", None),  # 'layers' must be a whole path part
        ("model.mesh.2.weight", None),  # so must 'h'
        ("model.layers.x.weight", None),
    ],
)
def test_layer_index(name, index):
    assert layer_index(name) == index


@pytest.mark.parametrize(
    "name, index, expected",
    [
        ("model.layers.3.mlp.down_proj.weight", 7, "model.layers.7.mlp.down_proj.weight"),
        ("model.layers.12.input_layernorm.weight", 0, "model.layers.0.input_layernorm.weight"),
        ("transformer.h.0.attn.c_attn.bias", 10, "transformer.h.10.attn.c_attn.bias"),
        ("model.blocks.2.x.layers.1.y", 5, "model.blocks.5.x.layers.1.y"),  # first only
        ("lm_head.weight", 4, "lm_head.weight"),
    ],
)
def test_with_layer(name, index, expected):
    assert with_layer(name, index) == expected
    if layer_index(name) is not None:
        assert layer_index(with_layer(name, index)) == index


@pytest.mark.parametrize(
    "name, pre",
    [
        ("model.embed_tokens.weight", True),
        ("transformer.wte.weight", True),
        ("transformer.wpe.weight", True),
        ("bert.embeddings.word_embeddings.weight", True),
        ("gpt_neox.embed_in.weight", True),
        ("model.norm.weight", False),
        ("transformer.ln_f.weight", False),
        ("lm_head.weight", False),
        ("model.layers.0.embed_proj.weight", False),  # inside a block is neither pre nor post
        ("model.layers.0.mlp.up_proj.weight", False),
    ],
)
def test_is_pre(name, pre):
    assert is_pre(name) is pre


def test_is_pre_gpt_neox_output_head():
    assert is_pre("embed_out.weight") is False


@pytest.mark.parametrize(
    "name, layers, expected",
    [
        ("model.layers.0.mlp.weight", 5, 0.0),
        ("model.layers.2.mlp.weight", 5, 0.5),
        ("model.layers.4.mlp.weight", 5, 1.0),
        ("model.layers.1.mlp.weight", 4, 1 / 3),
        ("model.layers.0.mlp.weight", 1, 1.0),  # a single block sits at 1, as in mergekit
        ("model.embed_tokens.weight", 5, 0.0),
        ("model.norm.weight", 5, 0.0),
        ("lm_head.weight", 1, 0.0),
    ],
)
def test_gradient_position(name, layers, expected):
    assert gradient_position(name, layers) == pytest.approx(expected)


@pytest.mark.parametrize(
    "name, layers, expected",
    [
        ("model.layers.0.mlp.weight", 5, 0.5),
        ("model.layers.2.mlp.weight", 5, 0.5 + 0.8 * 0.5),
        ("model.layers.4.mlp.weight", 5, 1.3),
        ("model.layers.0.mlp.weight", 1, 1.3),
        ("model.embed_tokens.weight", 5, 0.5),  # embeddings: the shallowest scale
        ("transformer.wte.weight", 5, 0.5),
        ("model.norm.weight", 5, 1.3),  # final norm and head: the deepest
        ("lm_head.weight", 5, 1.3),
    ],
)
def test_lines_scale(name, layers, expected):
    assert lines_scale(name, layers, alpha=0.5, beta=0.8) == pytest.approx(expected)


LLAMA3 = [
    "model.embed_tokens.weight",
    *[f"model.layers.{i}.{part}" for i in range(3)
      for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")],
    "model.norm.weight",
    "lm_head.weight",
]


def test_assemble_path():
    hops = [("A", 0), ("B", 5), ("B", 1)]
    plan = assemble_path(LLAMA3, hops)
    assert set(plan) == set(LLAMA3)
    assert plan["model.embed_tokens.weight"] == Source("A", "model.embed_tokens.weight")
    assert plan["model.norm.weight"] == Source("B", "model.norm.weight")
    assert plan["lm_head.weight"] == Source("B", "lm_head.weight")
    assert plan["model.layers.0.mlp.up_proj.weight"] == Source("A",
                                                               "model.layers.0.mlp.up_proj.weight")
    assert plan["model.layers.1.self_attn.q_proj.weight"] == Source(
        "B", "model.layers.5.self_attn.q_proj.weight")
    assert plan["model.layers.2.input_layernorm.weight"] == Source(
        "B", "model.layers.1.input_layernorm.weight")


def test_assemble_path_single_model_repeats_layers():
    names = ["transformer.wte.weight", "transformer.h.0.attn.weight", "transformer.h.1.attn.weight",
             "transformer.ln_f.weight"]
    plan = assemble_path(names, [("M", 0), ("M", 0)])
    assert plan["transformer.h.1.attn.weight"] == Source("M", "transformer.h.0.attn.weight")
    assert plan["transformer.wte.weight"] == Source("M", "transformer.wte.weight")
    assert plan["transformer.ln_f.weight"] == Source("M", "transformer.ln_f.weight")


def test_assemble_path_gpt_neox_head_from_last_hop():
    names = ["gpt_neox.embed_in.weight", "gpt_neox.layers.0.attention.dense.weight",
             "gpt_neox.layers.1.attention.dense.weight", "gpt_neox.final_layer_norm.weight",
             "embed_out.weight"]
    plan = assemble_path(names, [("A", 0), ("B", 3)])
    assert plan["gpt_neox.embed_in.weight"].model == "A"
    assert plan["gpt_neox.final_layer_norm.weight"].model == "B"
    assert plan["embed_out.weight"].model == "B"
    assert lines_scale("embed_out.weight", 2, alpha=0.5, beta=0.8) == pytest.approx(1.3)
