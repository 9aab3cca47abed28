"""The compiled core gives what the eager core gives (large tensors take the compiled path)."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import get_method, task_arithmetic

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
