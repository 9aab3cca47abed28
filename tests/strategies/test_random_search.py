"""Random search: uniform within the bounds."""

from __future__ import annotations

import numpy as np

from mergesearch.strategies import RandomSearch

from .test_cmaes import SCALES


def test_uniform_within_the_bounds() -> None:
    s = RandomSearch(SCALES, {"include_init": False}, seed=0)
    x = np.array([c.genome for c in s.ask(4000)])
    u = (x - SCALES.low) / (SCALES.high - SCALES.low)
    assert np.all((u >= 0) & (u <= 1))
    assert np.allclose(u.mean(axis=0), 0.5, atol=0.02)
    assert np.allclose(u.var(axis=0), 1 / 12, atol=0.005)
    assert np.all(u.min(axis=0) < 0.01) and np.all(u.max(axis=0) > 0.99)
