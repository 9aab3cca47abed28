"""DARE's kept mask bits (CPU) merge exactly what hashing every entry on every merge does."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import get_method, task_arithmetic
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
