"""The ``regions`` merge method (M2N2's children) against tensors computed by hand with
numpy: entries over global flattened ranges that cross tensor boundaries, the same model
in several entries, seeded noise terms regenerated identically, normalisation, and the
whole path through the merge engine on the digits MLPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergesearch.merging.regions  # noqa: F401  (registers regions until merging/__init__ does)
from mergesearch.merging import get_method
from mergesearch.merging.regions import noise
from mergesearch.models.resident import _seed, merge
from mergesearch.recipe import Recipe, RecipeError

REGIONS = get_method("regions")
LOADER = "mergesearch.zoo.digits:load"
NAMES = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]


def test_entries_add_their_ranges_of_the_tensor():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    # the tensor sits at [100, 120) of the global order
    out = REGIONS.fn(None, [torch.tensor(a), torch.tensor(b), torch.tensor(a)],
                     weight=[0.5, 2.0, -1.0], start=[0, 107, 118], end=[110, 130, 500],
                     noise_term=[0, 0, 0], offset=100.0, normalize=False)
    flat = np.zeros(20)
    flat[:10] += 0.5 * a.ravel()[:10]
    flat[7:] += 2.0 * b.ravel()[7:]
    flat[18:] += -1.0 * a.ravel()[18:]
    np.testing.assert_allclose(out.numpy(), flat.reshape(4, 5), rtol=1e-12)


def test_normalize_divides_by_the_weights_covering_each_element():
    x, y = torch.arange(6.0), torch.full((6,), 10.0)
    out = REGIONS.fn(None, [x, y], weight=[1.0, 3.0], start=[0, 2], end=[6, 6],
                     noise_term=[0, 0], offset=0.0, normalize=True)
    want = np.concatenate([np.arange(2.0), (np.arange(2.0, 6.0) + 30.0) / 4])
    np.testing.assert_allclose(out.numpy(), want)


def test_noise_terms_are_seeded_by_term_and_tensor():
    x = torch.zeros(3, 4)
    kw = dict(weight=[0.1], start=[0], end=[12], noise_term=[7], offset=0.0, normalize=False)
    first = REGIONS.fn(None, [x], seed=11, **kw)
    assert torch.equal(first, REGIONS.fn(None, [x], seed=11, **kw))
    assert not torch.equal(first, REGIONS.fn(None, [x], seed=12, **kw))
    gen = torch.Generator().manual_seed((7 * 0x9E3779B1 + 11) % 2**63)
    np.testing.assert_allclose(first.numpy().ravel(),
                               0.1 * torch.randn(12, generator=gen).numpy(), rtol=1e-6)
    assert 0.8 < float(noise(7, 11, 4096).std()) < 1.2


def test_a_recipe_through_the_engine_equals_numpy():
    """Two sources and a noise term over regions that cut inside layers.0.weight and
    layers.1.weight, merged by the engine, against the same sum done by hand."""
    from mergesearch.zoo.digits import load

    states = [load(f"scratch:{k}")[1] for k in (0, 1)]
    sizes = [states[0][n].numel() for n in NAMES]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    recipe = Recipe.from_dict({
        "method": "regions",
        "models": [
            {"model": "scratch:0", "parameters": {"weight": 0.7, "end": 5000}},
            {"model": "scratch:1", "parameters": {"weight": 0.4, "start": 5000,
                                                  "end": 17000}},
            {"model": "scratch:0", "parameters": {"weight": -0.2, "start": 17000}},
            {"model": "scratch:0", "parameters": {"weight": 0.01, "start": 16000,
                                                  "noise_term": 3}},
        ],
        "parameters": {"normalize": False,
                       "offset": [{"filter": n, "value": float(o)}
                                  for n, o in zip(NAMES, offsets, strict=False)]}})
    merged = merge(recipe, loader=LOADER).state_dict()
    src = [np.concatenate([s[n].numpy().ravel() for n in NAMES]) for s in states]
    want = np.zeros(offsets[-1])
    want[:5000] += 0.7 * src[0][:5000]
    want[5000:17000] += 0.4 * src[1][5000:17000]
    want[17000:] += -0.2 * src[0][17000:]
    for name, lo, hi in zip(NAMES, offsets, offsets[1:], strict=False):
        gen = torch.Generator().manual_seed((3 * 0x9E3779B1 + _seed(0, name)) % 2**63)
        eps = torch.randn(int(hi - lo), generator=gen).numpy().astype(np.float64)
        a = max(lo, 16000)
        if a < hi:
            want[a:hi] += 0.01 * eps[a - lo:]
    got = np.concatenate([merged[n].numpy().ravel() for n in NAMES])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_missing_offset_names_the_tensor():
    recipe = Recipe.from_dict({"method": "regions", "models": [{"model": "scratch:0"}],
                               "parameters": {"offset": [{"filter": "layers.0.weight",
                                                          "value": 0.0}]}})
    with pytest.raises(RecipeError, match="layers.0.bias"):
        merge(recipe, loader=LOADER)
