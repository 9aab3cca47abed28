"""DARE's kept mask bits (CPU) merge exactly what hashing every entry on every merge does."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import get_method, sparsify, task_arithmetic
from mergesearch.merging.task_arithmetic import MaskBits


def merge(name, base, models, cache: MaskBits, monkeypatch, **params):
    monkeypatch.setattr(task_arithmetic, "_mask_bits", cache)
    return get_method(name).fn(base, models, seed=5, lambda_=0.8, **params)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("density", [[0.3, 0.6, 0.9], [0.0, 1.0, 1e-6], [0.0, 0.0, 0.0],
                                     [1.0, 1.0, 1.0]])
def test_kept_bits_merge_bit_for_bit_what_hashing_does(name, density, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(37, 53, generator=gen)
    models = [base + 0.1 * torch.randn(base.shape, generator=gen) for _ in range(3)]
    models[1][0, 0] = float("nan")  # a dropped NaN stays dropped both ways, if dropped
    params = dict(weight=[0.7, -0.4, 1.1], density=density, rescale=True, normalize=False)
    hashed = merge(name, base, models, MaskBits(0), monkeypatch, **params)
    cache = MaskBits(1 << 20)
    kept = merge(name, base, models, cache, monkeypatch, **params)
    assert cache.used == 3 * base.numel() * 4  # one int32 per entry per model
    again = merge(name, base, models, cache, monkeypatch, **params)  # from the kept bits
    assert cache.used == 3 * base.numel() * 4
    for out in (kept, again):
        assert torch.equal(torch.isnan(out), torch.isnan(hashed))
        torch.testing.assert_close(out, hashed, rtol=0, atol=0, equal_nan=True)


def test_the_budget_caps_what_is_kept_and_the_rest_is_hashed(monkeypatch):
    base = torch.zeros(100)
    models = [torch.ones(100), -torch.ones(100)]
    cache = MaskBits(4 * 150)  # room for one model's bits of this tensor, not two
    out = merge("dare_ties", base, models, cache, monkeypatch, weight=[1.0, 0.5],
                density=[0.5, 0.5], rescale=False, normalize=False)
    assert cache.used == 4 * 100  # the first model's bits kept, the second's did not fit
    ref = merge("dare_ties", base, models, MaskBits(0), monkeypatch, weight=[1.0, 0.5],
                density=[0.5, 0.5], rescale=False, normalize=False)
    assert torch.equal(out, ref)


def test_int32_hash_is_the_uint32_hash_minus_two_to_the_31():
    """The int32 form the core and the kept bits use gives the 32-bit hash's bits, for
    indices past 2**31 and 2**32 (taken modulo 2**32, as the hash reads them) too."""
    index = torch.cat([torch.arange(5000), torch.arange(2**31 - 40, 2**31 + 40),
                       torch.arange(2**32 - 40, 2**32 + 40),
                       torch.arange(3 * 2**32, 3 * 2**32 + 40)])
    for seed in (0, 7, 2**33 + 5):
        key = sparsify.model_key(seed, 1)
        want = sparsify.uniform_bits(index, key) - 2**31
        got = sparsify.signed_bits(index.to(torch.int32), sparsify.as_int32(key))
        assert got.dtype == torch.int32 and torch.equal(got.long(), want)
