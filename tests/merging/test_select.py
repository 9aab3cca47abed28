"""The exact select by counting (sparsify.kth_smallest_magnitude) against torch.kthvalue.

Every case compares with ``torch.kthvalue`` of the flat magnitudes (the sort-based
order statistic): the same value, bit for bit, on inputs built to break a sampled
select (ties, zeros, signed zeros, subnormals, inf, NaN, a sample that sees only
zeros, tiny and larger tensors, four dtypes).  The counting kernels run eagerly here;
tests/merging/test_fused.py checks the compiled ones give the same.
"""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import sparsify
from mergesearch.merging.task_arithmetic import OutputBuffers

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def eager_kernels(monkeypatch):
    monkeypatch.setattr(sparsify, "_kernels", {"scan": sparsify._scan_rows,
                                               "scan_multi": sparsify._scan_rows_multi})


def expected(x, k, base=None):
    a = (x if base is None else x - base).abs().reshape(-1)
    return torch.kthvalue(a, k).values


def same(got, want, case=""):
    assert got.dtype == want.dtype
    if torch.isnan(want):
        assert torch.isnan(got), case
    else:
        assert got == want, (case, got, want)
        assert torch.equal(got.abs(), want.abs())  # +0 and -0 both read as +0 magnitudes


def ranks(n):
    return sorted(k for k in {1, 2, 3, n // 1000, n // 10, n // 2, n - n // 10, n - 2, n}
                  if 1 <= k <= n)


def cases(n, dtype, gen):
    """(name, x, base) pairs of n entries."""
    normal = torch.randn(n, generator=gen, dtype=torch.float64)
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    ties = torch.randint(-4, 5, (n,), generator=gen).double() * 0.25
    zeros = torch.where(torch.rand(n, generator=gen) < 0.9, 0.0, normal)
    signed_zeros = torch.where(torch.rand(n, generator=gen) < 0.5, -0.0, 0.0)
    signed_zeros[::7] = normal[::7]
    tiny = torch.finfo(dtype).tiny
    subnormal = normal * tiny * 0.3  # mostly below the smallest normal
    subnormal[::5] = normal[::5] * tiny * 4
    huge = normal * torch.finfo(dtype).max / 8
    blind = normal.clone()  # every sampled entry is zero, the rest is not
    step = max(1, n // min(sparsify._SAMPLE, 16 * int(n**0.5)))
    blind[::step] = 0.0
    out = [("normal", normal, base), ("ties", ties, None), ("zeros", zeros, None),
           ("signed zeros", signed_zeros, None), ("subnormal", subnormal, None),
           ("huge", huge, -huge.flip(0)), ("blind sample", blind, None),
           ("ties near base", base + ties * 1e-3, base)]
    return [(name, x.to(dtype), None if b is None else b.to(dtype)) for name, x, b in out]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 1000, 4099])
def test_tiny_tensors_through_the_counting_path(dtype, n, monkeypatch):
    monkeypatch.setattr(sparsify, "SELECT_MIN_NUMEL", 1)  # no kthvalue shortcut
    gen = torch.Generator().manual_seed(n)
    for name, x, base in cases(n, dtype, gen):
        for k in ranks(n):
            same(sparsify.kth_smallest_magnitude(x, k, base), expected(x, k, base), (name, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_tensors_with_the_default_settings(dtype):
    n = (1 << 16) + 77  # past SELECT_MIN_NUMEL, not a multiple of the row length
    gen = torch.Generator().manual_seed(5)
    for name, x, base in cases(n, dtype, gen):
        for k in ranks(n):
            same(sparsify.kth_smallest_magnitude(x, k, base), expected(x, k, base), (name, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inf_and_nan(dtype, monkeypatch):
    monkeypatch.setattr(sparsify, "SELECT_MIN_NUMEL", 1)
    gen = torch.Generator().manual_seed(9)
    n = 5000
    x = torch.randn(n, generator=gen, dtype=dtype)
    with_inf = x.clone()
    with_inf[::97] = float("inf")
    with_inf[::89] = -float("inf")
    for k in ranks(n):
        same(sparsify.kth_smallest_magnitude(with_inf, k), expected(with_inf, k))
    with_nan = x.clone()
    with_nan[::101] = float("nan")  # kthvalue counts NaN as the largest
    for k in ranks(n):
        same(sparsify.kth_smallest_magnitude(with_nan, k), expected(with_nan, k))


def test_a_shaped_tensor_counts_all_its_entries():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(300, 257, generator=gen)
    x = base + torch.randn(300, 257, generator=gen)
    for k in ranks(x.numel()):
        same(sparsify.kth_smallest_magnitude(x, k, base), expected(x, k, base), k)
        same(sparsify.kth_smallest_magnitude(x.t(), k, base.t()), expected(x, k, base))
    with pytest.raises(ValueError):
        sparsify.kth_smallest_magnitude(x, 0, base)


@pytest.mark.parametrize("density", [1e-6, 0.01, 0.3, 0.5, 0.999])
def test_bands_equal_the_sort_based_cut_offs(density):
    """TIES and Breadcrumbs cut-offs: the k-th largest / ranks of a full sort."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(200_000, generator=gen)
    x = base + torch.randint(-50, 50, (200_000,), generator=gen) * 1e-3  # ties everywhere
    ordered = torch.sort((x - base).abs()).values
    n = x.numel()
    k = max(1, int(density * n))
    assert sparsify.magnitude_band(x, density, base) == (float(ordered[n - k]), float("inf"))
    keep, top = int(density * n), int(0.01 * n)
    bottom = max(0, n - keep - top)
    if keep:
        assert sparsify.outlier_band(x, density, 0.01, base) == (
            float(ordered[bottom]), float(ordered[bottom + keep - 1]))
    # without a base the argument holds the magnitudes themselves (as before)
    mag = (x - base).abs()
    assert sparsify.magnitude_band(mag, density) == sparsify.magnitude_band(x, density, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [33, (1 << 16) + 77])
def test_several_models_against_one_base_select_as_one_each(dtype, n, monkeypatch):
    """kth_smallest_magnitudes (one counting pass over every model) gives each model's own
    kthvalue: different ranks, a model equal to the base, one whose sample sees nothing."""
    if n < sparsify.SELECT_MIN_NUMEL:
        monkeypatch.setattr(sparsify, "SELECT_MIN_NUMEL", 1)  # no kthvalue shortcut
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(n, generator=gen)
    blind = base + torch.randn(n, generator=gen)
    step = max(1, n // min(sparsify._SAMPLE, 16 * int(n**0.5)))
    blind[::step] = base[::step]  # the sample sees only zeros: the first band misses
    models = [base + 0.1 * torch.randn(n, generator=gen), base.clone(), blind,
              base + torch.randint(-3, 4, (n,), generator=gen) * 0.25]
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    for ks in ([1, n, n // 2, n - 2], [n // 3, 2, n - n // 10, n // 2 + 1]):
        got = sparsify.kth_smallest_magnitudes(models, ks, base)
        for x, k, g in zip(models, ks, got, strict=True):
            same(g, expected(x, k, base), k)
    with pytest.raises(ValueError):
        sparsify.kth_smallest_magnitudes(models, [1, 2], base)
    with pytest.raises(ValueError):
        sparsify.kth_smallest_magnitudes(models, [1, 2, 3, n + 1], base)
    densities = [0.3, 1.0, 0.0, 0.5]
    assert sparsify.magnitude_bands(models, densities, base) == [
        sparsify.magnitude_band(x, d, base) for x, d in zip(models, densities, strict=True)]


def test_output_buffers_never_hand_out_memory_in_use():
    buffers = OutputBuffers(1 << 20)
    like = torch.zeros(10, 20)
    a = buffers.take(like)
    b = buffers.take(like)  # a is held: the second buffer
    assert a.shape == like.shape and a.data_ptr() != b.data_ptr()
    assert buffers.take(like) is None  # both held, no third: the caller allocates
    a.fill_(1.0)
    view = a[3]  # a view holds the memory too
    ptr = a.data_ptr()
    del a
    assert buffers.take(like) is None
    del view
    again = buffers.take(like)
    assert again.data_ptr() == ptr  # free again: reused
    assert buffers.take(torch.zeros(10, 20, dtype=torch.float64)) is not None  # own sizes
    assert OutputBuffers(100).take(like) is None  # over the budget
    assert OutputBuffers(0).take(like) is None
