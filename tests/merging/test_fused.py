"""The compiled core gives what the eager core gives (large tensors take the compiled path)."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import get_method, sparsify, task_arithmetic

pytestmark = pytest.mark.slow  # one torch.compile per graph, ~20 s each on 2 cores


@pytest.mark.parametrize("name, params, kept_bits", [
    ("ties", {"weight": [0.7, -0.4, 1.1], "density": [0.3, 0.5, 0.9], "normalize": True},
     True),
    *[("dare_linear", {"weight": [0.5, 0.8, 1.0], "density": [0.2, 0.5, 0.7],
                       "rescale": True, "normalize": False}, kept) for kept in (True, False)],
])
def test_compiled_core_matches_eager(name, params, kept_bits, monkeypatch):
    # DARE's masks from kept bits (the CPU default) or hashed in the core (accelerators)
    monkeypatch.setattr(task_arithmetic, "_mask_bits",
                        task_arithmetic.MaskBits((1 << 24) if kept_bits else 0))
    gen = torch.Generator().manual_seed(0)
    n = task_arithmetic.FUSE_MIN_NUMEL * 2
    base = torch.randn(n // 256, 256, generator=gen)
    models = [base + 0.1 * torch.randn(base.shape, generator=gen) for _ in range(3)]
    fn = get_method(name).fn
    compiled = fn(base, models, seed=3, lambda_=0.9, **params)
    monkeypatch.setattr(task_arithmetic, "FUSE_MIN_NUMEL", 10**12)  # force the eager core
    eager = fn(base, models, seed=3, lambda_=0.9, **params)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    if name == "dare_linear":  # the same entries survive: masks come from a stateless hash
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
    monkeypatch.setattr(sparsify, "_kernels", {"scan": sparsify._scan_rows})  # eager
    for x in cases:
        want_all = (x - base).abs()
        for k in ks:
            eager = sparsify.kth_smallest_magnitude(x, k, base)
            want = torch.kthvalue(want_all, k).values
            assert compiled[x.data_ptr(), k] == eager == want


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


def test_fused_weighted_sum_is_the_linear_merge():
    """task_arithmetic.weighted_sum (offered to linear.py) merges what linear.py merges."""
    gen = torch.Generator().manual_seed(2)
    models = [torch.randn(64, 128, generator=gen) for _ in range(3)]
    linear = get_method("linear").fn
    for weight, normalize in (([0.5, 0.3, 0.2], True), ([0.7, 1.3, -0.2], False),
                              ([1.0, -1.0, 0.0], True)):  # a zero sum divides by zero in both
        fused = task_arithmetic.weighted_sum(models, weight, normalize)
        torch.testing.assert_close(fused, linear(None, models, weight=weight,
                                                 normalize=normalize),
                                   rtol=1e-6, atol=1e-6, equal_nan=True)
