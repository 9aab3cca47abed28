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
    step = sparsify.sample_step(n)
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
    step = sparsify.sample_step(n)
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


@pytest.mark.parametrize("shape", [(3072, 768), (768, 3072), (32000, 768), (4096, 11008)])
def test_the_sample_visits_every_column(shape):
    n, cols = shape[0] * shape[1], shape[1]
    step = sparsify.sample_step(n, cols)
    assert sparsify.sample_step(n) <= step < sparsify.sample_step(n) + cols
    seen = torch.unique(torch.arange(0, n, step) % cols)
    assert seen.numel() == cols


def test_one_counting_pass_when_columns_differ_in_scale(monkeypatch):
    """Trained weights' columns differ in scale.  A sample on a stride that shares a factor
    with the row length sees a few columns only and misplaces the band (the committed
    stride of 96 on 768-wide rows missed in 26 of 30 such tensors); the coprime stride
    places it right, so the count is not run a second time."""
    calls = []
    band = sparsify._band
    monkeypatch.setattr(sparsify, "_band", lambda *a: calls.append(1) or band(*a))
    misses = 0
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        scale = torch.exp(0.5 * torch.randn(768, generator=gen))
        base = torch.randn(3072, 768, generator=gen)
        x = base + torch.randn(3072, 768, generator=gen) * scale
        k = x.numel() // 2
        calls.clear()
        same(sparsify.kth_smallest_magnitude(x, k, base), expected(x, k, base), seed)
        misses += len(calls) - 1
    assert misses <= 1


@pytest.mark.parametrize("data", ["normal", "ties"])
@pytest.mark.parametrize("wide_holds", [True, False])
@pytest.mark.parametrize("side", ["below", "above"])
def test_a_missed_band_is_counted_again_out_to_the_wide_band_first(side, wide_holds, data,
                                                                   monkeypatch):
    """Bands placed by hand beside the k-th value: the second count stops at the wide
    band's edge when that holds it (2 passes), and goes to the end when not (3 passes)."""
    n = 100_000
    gen = torch.Generator().manual_seed(21)
    base = torch.randn(n, generator=gen)
    step = (torch.randn(n, generator=gen) if data == "normal"
            else torch.randint(-5000, 5000, (n,), generator=gen) * 1e-3)
    x = base + step
    ordered = torch.sort((x - base).abs()).values
    k = n // 2

    def at(rank):
        return float(ordered[rank - 1])

    if side == "above":  # the k-th is above [lo, hi]
        band = (at(k - 300), at(k - 200), at(k - 1000), at(k + 500) if wide_holds else at(k - 100))
    else:
        band = (at(k + 200), at(k + 300), at(k - 500) if wide_holds else at(k + 100), at(k + 1000))
    monkeypatch.setattr(sparsify, "_place_band", lambda *args: band)
    calls = []
    count = sparsify._band
    monkeypatch.setattr(sparsify, "_band", lambda *a: calls.append(a[2:4]) or count(*a))
    same(sparsify.kth_smallest_magnitude(x, k, base), expected(x, k, base), (side, wide_holds))
    assert len(calls) == (2 if wide_holds else 3), calls
    if not wide_holds:  # the last count runs to the end on that side
        assert calls[-1][0 if side == "below" else 1] in (-float("inf"), float("inf"))
