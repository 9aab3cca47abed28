"""The compiled core gives what the eager core gives (large tensors take the compiled path)."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import all_finite, get_method, sparsify, task_arithmetic
from mergesearch.merging import base as base_module

pytestmark = pytest.mark.slow  # one torch.compile per graph, ~20 s each on 2 cores


@pytest.mark.parametrize("name, params, kept_bits", [
    ("ties", {"weight": [0.7, -0.4, 1.1], "density": [0.3, 0.5, 0.9], "normalize": True},
     True),
    *[("dare_linear", {"weight": [0.5, 0.8, 1.0], "density": [0.2, 0.5, 0.7],
                       "rescale": True, "normalize": False}, kept) for kept in (True, False)],
    ("dare_ties", {"weight": [0.5, -0.8, 1.0], "density": [0.2, 0.0, 0.7], "rescale": True,
                   "normalize": False}, False),
])
def test_compiled_core_matches_eager(name, params, kept_bits, monkeypatch):
    # DARE's masks from kept bits (the CPU default) or hashed in the core (accelerators)
    monkeypatch.setattr(task_arithmetic, "_mask_bits",
                        task_arithmetic.MaskBits((1 << 24) if kept_bits else 0))
    gen = torch.Generator().manual_seed(0)
    n = task_arithmetic.FUSE_MIN_NUMEL * 2
    base = torch.randn(n // 256, 259, generator=gen)  # not a multiple of the vector width
    models = [base + 0.1 * torch.randn(base.shape, generator=gen) for _ in range(3)]
    fn = get_method(name).fn
    compiled = fn(base, models, seed=3, lambda_=0.9, **params)
    monkeypatch.setattr(task_arithmetic, "FUSE_MIN_NUMEL", 10**12)  # force the eager core
    eager = fn(base, models, seed=3, lambda_=0.9, **params)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    if name.startswith("dare"):  # the same entries survive: masks come from a stateless hash
        assert torch.equal(compiled == base, eager == base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_select_matches_eager_and_kthvalue(dtype, monkeypatch):
    """The counting select's compiled scan finds the same cut-offs as its eager scan and as
    torch.kthvalue, ties, zeros and a sample blind to the spread included."""
    gen = torch.Generator().manual_seed(4)
    n = (1 << 18) + 5
    base = torch.randn(n, generator=gen, dtype=dtype)
    cases = [base + 0.1 * torch.randn(n, generator=gen, dtype=dtype),
             base + torch.randint(-3, 4, (n,), generator=gen).to(dtype) * 0.5,  # ties, zeros
             base.clone()]
    cases[2][1::97] += 1.0  # off the sample's stride: the sample sees no change at all
    ks = [1, 2, n // 7, n // 2, n - n // 100, n]
    compiled = {}
    for x in cases:
        for k in ks:
            compiled[x.data_ptr(), k] = sparsify.kth_smallest_magnitude(x, k, base)
    together = sparsify.kth_smallest_magnitudes(cases, ks[:3], base)  # one compiled pass
    monkeypatch.setattr(sparsify, "_kernels", {"scan": sparsify._scan_rows,
                                               "scan_multi": sparsify._scan_rows_multi})
    for x in cases:
        want_all = (x - base).abs()
        for k in ks:
            eager = sparsify.kth_smallest_magnitude(x, k, base)
            want = torch.kthvalue(want_all, k).values
            assert compiled[x.data_ptr(), k] == eager == want
    assert together == sparsify.kth_smallest_magnitudes(cases, ks[:3], base)
    assert together == [compiled[x.data_ptr(), k] for x, k in zip(cases, ks[:3], strict=True)]


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties"])
def test_compiled_merges_write_into_out_and_count_nonfinite_entries(name):
    """With ``out=`` the one compiled pass stores the merge there (the same bits as without);
    the same pass counts NaN and inf, which all_finite reads instead of the tensor."""
    method = get_method(name)
    assert method.writes_out
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(task_arithmetic.FUSE_MIN_NUMEL // 64, 128, generator=gen)
    models = [base + 0.1 * torch.randn(base.shape, generator=gen) for _ in range(3)]
    params = {"weight": [0.5, 0.3, 0.2]}
    params |= {p.arg: p.default for p in method.params if not p.per_model}
    if name in ("ties", "dare_ties"):
        params["density"] = [0.5, 0.7, 1.0]
    b = None if name == "linear" else base
    plain = method.fn(b, models, seed=4, **params)
    assert plain in base_module._nonfinite  # counted by the compiled pass
    out = torch.full_like(base, float("nan"))
    into = method.fn(b, models, seed=4, out=out, **params)
    assert into.data_ptr() == out.data_ptr() and torch.equal(into, plain)
    assert all_finite(plain) and all_finite(into)
    assert into not in base_module._nonfinite  # a count is read once
    # (a NaN loses TIES's sign election, as in the eager core: only infinities survive it)
    for bad in [float("inf"), -float("inf")] + [float("nan")] * (name in ("linear",
                                                                        "task_arithmetic")):
        broken = [m.clone() for m in models]
        broken[2][5, 7] = bad  # density 1 for the third model: the entry survives
        merged = method.fn(b, broken, seed=4, out=out, **params)
        assert merged in base_module._nonfinite and not all_finite(merged)
    assert all_finite(torch.ones(3)) and not all_finite(torch.tensor([1.0, float("nan")]))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_is_exact_when_the_sum_overflows(dtype):
    """A tensor no compiled pass counted is settled by its sum when that is finite; a sum
    that overflows (huge finite entries) is not taken as NaN or inf: every entry is read."""
    big = torch.finfo(dtype).max / 2
    huge = torch.full((1000,), big, dtype=dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    # float16's sum is taken in float32 and does not overflow; the others' does
    assert bool(torch.isfinite(huge.sum(dtype=wide))) == (dtype == torch.float16)
    assert all_finite(huge) and all_finite(-huge)
    assert all_finite(torch.randn(64, 64).to(dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for x in (huge.clone(), torch.randn(64, 64).to(dtype)):
            x.view(-1)[17] = bad
            assert not all_finite(x), (dtype, bad)
    assert all_finite(torch.arange(10))  # integers are finite

def test_merged_tensors_in_recycled_buffers_stay_intact_while_held(monkeypatch):
    """The compiled core writes into recycled CPU buffers only when nothing holds them."""
    monkeypatch.setattr(task_arithmetic, "_output_buffers", task_arithmetic.OutputBuffers(1 << 24))
    gen = torch.Generator().manual_seed(1)
    n = task_arithmetic.FUSE_MIN_NUMEL * 2
    base = torch.randn(n // 256, 256, generator=gen)
    models = [base + 0.1 * torch.randn(base.shape, generator=gen) for _ in range(3)]
    fn = get_method("ties").fn
    params = dict(weight=[0.7, -0.4, 1.1], normalize=True, lambda_=0.9, seed=0)
    held = [fn(base, models, density=[d] * 3, **params) for d in (0.2, 0.5, 0.8)]
    copies = [h.clone() for h in held]
    again = [fn(base, models, density=[d] * 3, **params) for d in (0.2, 0.5, 0.8)]
    for h, c, a in zip(held, copies, again, strict=True):
        assert torch.equal(h, c) and torch.equal(a, c)  # nothing held was overwritten
    ptrs = {h.data_ptr() for h in held} | {a.data_ptr() for a in again}
    assert len(ptrs) == 6  # two held buffers, the rest fresh
    del held, again
    out = fn(base, models, density=[0.5] * 3, **params)
    assert out.data_ptr() in ptrs and torch.equal(out, copies[1])  # a free buffer, reused


LINEAR_CASES = [([0.5, 0.3, 0.2], True), ([0.7, 1.3, -0.2], False), ([0.3, 1.0, 0.6], True),
                ([1.0, -1.0, 0.0], True)]  # the last divides by zero, as mergekit does


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32) if x.dtype == torch.float32 else x.view(torch.int16)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_fused_weighted_sum_is_the_linear_merge_bit_for_bit(stored):
    """The compiled weighted_sum (linear.py's large tensors) rounds as the in-place adds,
    for float32 sources and bfloat16 ones computed in float32 (as the merger does)."""
    gen = torch.Generator().manual_seed(2)
    models = [torch.randn(96, 128, generator=gen).to(stored).float() for _ in range(3)]
    for weight, normalize in LINEAR_CASES:
        fused = task_arithmetic.weighted_sum(models, weight, normalize)
        assert task_arithmetic._compiled_sum  # the compiled pass ran, not the fallback
        eager = task_arithmetic.eager_weighted_sum(models, weight, normalize)
        assert torch.equal(_bits(fused), _bits(eager))
        assert torch.equal(_bits(fused.to(stored)), _bits(eager.to(stored)))
        linear = get_method("linear").fn(None, models, weight=weight, normalize=normalize)
        assert torch.equal(_bits(linear), _bits(eager))


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_linear_is_mergekits_linear_merge_bit_for_bit(stored):
    """mergekit's own kernel on the stored tensors gives the same bits (float32 and bf16)."""
    mk = pytest.importorskip("mergekit.merge_methods.linear")
    from mergekit.merge_methods.base import TensorBatch

    gen = torch.Generator().manual_seed(5)
    stored_models = [torch.randn(96, 128, generator=gen).to(stored) for _ in range(3)]
    for weight, normalize in LINEAR_CASES[:3]:
        ours = get_method("linear").fn(None, [m.float() for m in stored_models],
                                       weight=weight, normalize=normalize).to(stored)
        per_row = torch.tensor([weight] * 96, dtype=torch.float64)
        theirs = mk.linear_merge.implementation(TensorBatch(stored_models), weight=per_row,
                                                normalize=normalize)
        assert torch.equal(_bits(ours), _bits(theirs))
