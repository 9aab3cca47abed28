"""Evo-Merging's merge rule (``evo_lora``) against tensors computed by hand with numpy:
the task-vector rule, the LoRA factor rule (A-only, both, none), sign flips, alpha = 0
and 1, and the same through the merge engine over real peft adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import perturbed, save, tiny_config
from peft import LoraConfig, get_peft_model
from safetensors.numpy import load_file
from transformers import LlamaForCausalLM

import mergesearch.merging.evo  # noqa: F401  (registers evo_lora until merging/__init__ does)
from mergesearch.merging import get_method
from mergesearch.merging.context import LoraFactors, MergeContext, TensorContext
from mergesearch.merging.evo import merge_factors, top_fraction
from mergesearch.models.lora import LoraCheckpoint
from mergesearch.models.resident import ResidentMerger
from mergesearch.recipe import Recipe

EVO = get_method("evo_lora")


def np_top(x: np.ndarray, alpha: float) -> np.ndarray:
    """Keep the int(alpha * n) largest magnitudes (no ties in random floats)."""
    k = int(alpha * x.size)
    out = np.zeros_like(x)
    if k:
        flat = np.abs(x).ravel()
        keep = np.argsort(-flat, kind="stable")[:k]
        out.ravel()[keep] = x.ravel()[keep]
    return out


def rand(*shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


ALPHAS = [0.0, 0.3, 1.0]
BETAS = [0.8, -1.2, 0.5]


# -- the task-vector rule (full fine-tunes) ------------------------------------------------

def test_task_vector_rule_by_hand():
    base = rand(7, 9, seed=0)
    models = [base + rand(7, 9, seed=s) for s in (1, 2, 3)]
    want = base + sum(b * np_top(m - base, a)
                      for m, a, b in zip(models, ALPHAS, BETAS, strict=True))
    got = EVO.fn(torch.tensor(base), [torch.tensor(m) for m in models], weight=BETAS,
                 density=ALPHAS, seed=0)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    # alpha = 0 drops a source whatever its beta; alpha = 1 with beta = -1 subtracts it
    got = EVO.fn(torch.tensor(base), [torch.tensor(m) for m in models[:2]],
                 weight=[5.0, -1.0], density=[0.0, 1.0])
    np.testing.assert_allclose(got.numpy(), 2 * base - models[1], rtol=0, atol=1e-12)


def test_top_fraction_keeps_ties_and_edges():
    x = torch.tensor([[0.1, -3.0, 2.0], [-2.0, 0.5, 0.0]])
    assert torch.equal(top_fraction(x, 1.0), x)
    assert torch.equal(top_fraction(x, 0.0), torch.zeros_like(x))
    # 2 of 6 kept: -3 and both entries tied at |2|
    assert torch.equal(top_fraction(x, 2 / 6),
                       torch.tensor([[0.0, -3.0, 2.0], [-2.0, 0.0, 0.0]]))


# -- the LoRA factor rule ------------------------------------------------------------------

def np_factor_rule(base, fs, alphas, betas, prune_a=True, prune_b=False):
    """A_m = sum beta_i TopK(A_i), B_m = sum beta_i s_i B_i (ranks zero-padded)."""
    rank = max(a.shape[0] for a, _, _ in fs)
    a_m = np.zeros((rank, fs[0][0].shape[1]))
    b_m = np.zeros((fs[0][1].shape[0], rank))
    for (a, b, s), alpha, beta in zip(fs, alphas, betas, strict=True):
        r = a.shape[0]
        a_m[:r] += beta * (np_top(a, alpha) if prune_a else a)
        b_m[:, :r] += beta * s * (np_top(b, alpha) if prune_b else b)
    return base + b_m @ a_m


def factor_inputs():
    base = rand(6, 10, seed=10)
    fs = [(rand(2, 10, seed=11), rand(6, 2, seed=12), 2.0),
          (rand(4, 10, seed=13), rand(6, 4, seed=14), 0.5),  # another rank and scaling
          (rand(2, 10, seed=15), rand(6, 2, seed=16), 1.0)]
    return base, fs


@pytest.mark.parametrize("prune", ["a", "both", "none"])
def test_factor_rule_by_hand(prune):
    base, fs = factor_inputs()
    prune_a, prune_b = prune in ("a", "both"), prune == "both"
    want = np_factor_rule(base, fs, ALPHAS, BETAS, prune_a, prune_b)
    factors = [LoraFactors(torch.tensor(a), torch.tensor(b), s) for a, b, s in fs]
    got = merge_factors(torch.tensor(base), factors, weight=BETAS, density=ALPHAS,
                        prune_a=prune_a, prune_b=prune_b)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_factor_rule_signs_and_edges():
    base, fs = factor_inputs()
    (a, b, s), (a2, b2, s2) = fs[0], fs[1]
    one = [LoraFactors(torch.tensor(a), torch.tensor(b), s)]
    two = one + [LoraFactors(torch.tensor(a2), torch.tensor(b2), s2)]
    t = torch.tensor(base)
    # one source: beta and -beta give the same product (its own term is beta**2 B A)
    pos = merge_factors(t, one, weight=[0.7], density=[1.0])
    neg = merge_factors(t, one, weight=[-0.7], density=[1.0])
    np.testing.assert_allclose(neg.numpy(), pos.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(pos.numpy(), base + 0.49 * s * b @ a, rtol=0, atol=1e-12)
    # two sources, one flipped: only the cross terms change sign
    got = merge_factors(t, two, weight=[1.0, -1.0], density=[1.0, 1.0])
    b2p = np.hstack([s * b, np.zeros((6, 2))]) - s2 * b2
    a2p = np.vstack([a, np.zeros((2, 10))]) - a2
    np.testing.assert_allclose(got.numpy(), base + b2p @ a2p, rtol=0, atol=1e-12)
    # alpha = 0 on A: the source's A is gone, but its B still multiplies the others' A
    got = merge_factors(t, two, weight=[1.0, 1.0], density=[0.0, 1.0])
    want = base + (np.hstack([s * b, np.zeros((6, 2))]) + s2 * b2) @ a2
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    # every alpha 0: nothing of any A survives, the base comes back
    got = merge_factors(t, two, weight=[1.0, -1.0], density=[0.0, 0.0])
    assert torch.equal(got, t)


def test_factor_rule_transposed_rank_zero_and_refusals():
    base, fs = factor_inputs()
    (a, b, s) = fs[0]
    t = torch.tensor(base.T.copy())  # an embedding: delta = (B @ A).T
    fac = LoraFactors(torch.tensor(a), torch.tensor(b), s, transpose=True)
    got = merge_factors(t, [fac, LoraFactors(None, None)], weight=[-0.5, 3.0],
                        density=[0.4, 0.1])
    np.testing.assert_allclose(got.numpy(), base.T + (0.25 * s * b @ np_top(a, 0.4)).T,
                               rtol=0, atol=1e-12)
    plain = LoraFactors(torch.tensor(a), torch.tensor(b), s)
    assert merge_factors(t, [fac, plain], weight=[1, 1], density=[1, 1]) is None  # mixed
    assert merge_factors(torch.tensor(base[:5]), [plain], weight=[1], density=[1]) is None


def test_method_uses_factors_only_when_every_source_has_them():
    base, fs = factor_inputs()
    factors = {f"m{i}": LoraFactors(torch.tensor(a), torch.tensor(b), s)
               for i, (a, b, s) in enumerate(fs)}
    full = {m: torch.tensor(base) + f.scaling * f.b @ f.a for m, f in factors.items()}
    full["ft"] = torch.tensor(base + rand(6, 10, seed=20))
    ctx = MergeContext(lambda m, n: full[m], lambda m, n: factors.get(m))
    t = torch.tensor(base)

    def run(models):
        tc = TensorContext(ctx, "w", ("base", "w"), tuple((m, "w") for m in models))
        return EVO.fn(t, [full[m] for m in models], weight=BETAS, density=ALPHAS,
                      context=tc, seed=0)

    np.testing.assert_allclose(run(["m0", "m1", "m2"]).numpy(),
                               np_factor_rule(base, fs, ALPHAS, BETAS), rtol=0, atol=1e-10)
    taus = [full[m].numpy() - base for m in ("m0", "m1", "ft")]  # a full model: task vectors
    want = base + sum(b * np_top(x, a) for x, a, b in zip(taus, ALPHAS, BETAS, strict=True))
    np.testing.assert_allclose(run(["m0", "m1", "ft"]).numpy(), want, rtol=0, atol=1e-10)


# -- through the merge engine, over peft adapters ------------------------------------------

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("evo_lora")
    torch.manual_seed(0)
    base = save(LlamaForCausalLM(tiny_config()), root / "base")
    out = []
    for i, (r, alpha, targets) in enumerate([(2, 4, ["q_proj", "v_proj"]),
                                             (4, 4, ["q_proj"])]):
        model = LlamaForCausalLM.from_pretrained(base)
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha,
                                                      target_modules=targets,
                                                      init_lora_weights=False))
        peft_model.save_pretrained(root / f"lora{i}")
        out.append(str(root / f"lora{i}"))
    full = save(perturbed(LlamaForCausalLM.from_pretrained(base), 7), root / "full")
    return base, out, full


def adapter_factors(path: str, module: str):
    tensors = load_file(f"{path}/adapter_model.safetensors")
    key = f"base_model.model.{module}"
    a, b = tensors.get(f"{key}.lora_A.weight"), tensors.get(f"{key}.lora_B.weight")
    return (None, None) if a is None else (a.astype(np.float64), b.astype(np.float64))


def test_engine_merges_adapter_factors(adapters):
    base, (lora0, lora1), full = adapters
    alphas, betas = [0.5, 0.25], [1.3, -0.6]
    scalings = [4 / 2, 4 / 4]
    recipe = Recipe.from_dict({
        "method": "evo_lora", "base": base,
        "models": [{"model": m, "parameters": {"weight": b, "density": a}}
                   for m, a, b in zip((lora0, lora1), alphas, betas, strict=True)]})
    merged = dict(ResidentMerger().stream(recipe))
    base_w = {k: v.astype(np.float64)
              for k, v in load_file(f"{base}/model.safetensors").items()}
    for module in ("model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        fs = [(a, b, s) for (a, b), s in zip((adapter_factors(lora0, module),
                                               adapter_factors(lora1, module)), scalings,
                                                 strict=True)
              if a is not None]
        used = [i for i, p in enumerate((lora0, lora1)) if adapter_factors(p, module)[0]
                is not None]
        want = np_factor_rule(base_w[f"{module}.weight"], fs, [alphas[i] for i in used],
                              [betas[i] for i in used])
        np.testing.assert_allclose(merged[f"{module}.weight"].numpy(), want, rtol=0,
                                   atol=1e-5, err_msg=module)
    name = "model.layers.0.mlp.up_proj.weight"  # no adapter touches it: the base's
    np.testing.assert_array_equal(merged[name].numpy(), base_w[name])

    # with a full fine-tune in the pool, q_proj falls back to the task-vector rule
    recipe = Recipe.from_dict(recipe.to_dict() | {"models": [
        {"model": lora0, "parameters": {"weight": 1.3, "density": 0.5}},
        {"model": full, "parameters": {"weight": -0.6, "density": 0.25}}]})
    merged = dict(ResidentMerger().stream(recipe))
    name = "model.layers.1.self_attn.q_proj.weight"
    lora_w = LoraCheckpoint(lora0, base=base).tensor(name).double().numpy()
    full_w = load_file(f"{full}/model.safetensors")[name].astype(np.float64)
    want = base_w[name] + 1.3 * np_top(lora_w - base_w[name], 0.5) \
        - 0.6 * np_top(full_w - base_w[name], 0.25)
    np.testing.assert_allclose(merged[name].numpy(), want, rtol=0, atol=1e-5)


def test_lora_checkpoint_factors(adapters):
    base, (lora0, _), _ = adapters
    ckpt = LoraCheckpoint(lora0, base=base)
    f = ckpt.factors("model.layers.0.self_attn.q_proj.weight")
    a, b = adapter_factors(lora0, "model.layers.0.self_attn.q_proj")
    assert (f.rank, f.scaling, f.transpose) == (2, 2.0, False)
    np.testing.assert_array_equal(f.a.numpy(), a)
    np.testing.assert_array_equal(f.b.numpy(), b)
    assert ckpt.factors("model.layers.0.mlp.up_proj.weight").rank == 0
