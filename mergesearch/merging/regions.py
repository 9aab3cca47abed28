"""Per-region linear combination: each model entry adds ``weight * x`` over one region.

The merge M2N2's children are made of (:mod:`mergesearch.strategies.m2n2`).  All tensors
of the model are laid end to end in one flattened order; the recipe gives each tensor its
``offset`` in that order (a method-wide setting with one ``{filter, value}`` entry per
tensor).  Each entry of ``models`` then contributes ``weight`` times its model's values on
the global range ``[start, end)``: a region may be a few elements, some tensor rows, whole
tensors or whole layers, all the same to the method.  The same model may appear in several
entries (one per region where its coefficient differs).

An entry whose ``noise`` is a positive integer ``k`` contributes seeded Gaussian noise
instead of its model's values: ``N(0, 1)`` drawn on the CPU from ``(k, tensor seed)``
(the tensor seed derives from the recipe seed and the tensor name), so a mutation is a
few numbers in the recipe and the worker regenerates it, identically everywhere.  Its
model field only has to name one of the recipe's models (it is not read).

With ``normalize`` (the default) each element is divided by the summed weights of the
model entries (noise entries excluded) covering it, so a plain list of models with equal
weights is their average; M2N2 sets it false (SLERP coefficients do not sum to one).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from mergesearch.merging.base import MergeMethod, Param, register

#: ``end`` when not given: past the end of any model (an exact float64 integer)
EVERYWHERE = float(2**53)


#: noise tensors kept between merges (a child's noise terms recur in its descendants),
#: at most this many elements in all (float32: 4 bytes each)
NOISE_CACHE_ELEMENTS = 2**26
_noise_cache: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()
_noise_cached = 0


def noise(k: int, seed: int, numel: int) -> torch.Tensor:
    """The ``k``-th noise term of a tensor with seed ``seed``: ``numel`` N(0, 1) draws, float32,
    CPU (the same on every machine torch runs on).  Recently drawn terms are cached (least
    recently used out first); treat the result as read-only."""
    global _noise_cached
    key = (int(k), int(seed), int(numel))
    hit = _noise_cache.get(key)
    if hit is not None:
        _noise_cache.move_to_end(key)
        return hit
    gen = torch.Generator().manual_seed((int(k) * 0x9E3779B1 + int(seed)) % 2**63)
    out = torch.randn(numel, generator=gen, dtype=torch.float32)
    if numel <= NOISE_CACHE_ELEMENTS:
        _noise_cache[key] = out
        _noise_cached += numel
        while _noise_cached > NOISE_CACHE_ELEMENTS:
            _, old = _noise_cache.popitem(last=False)
            _noise_cached -= old.numel()
    return out


def regions(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    start: Sequence[float],
    end: Sequence[float],
    noise_term: Sequence[float],
    offset: float,
    normalize: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """``sum_i weight_i * x_i`` over each entry's ``[start_i, end_i)`` of the global order, the
    tensor occupying ``[offset, offset + numel)``."""
    ref = models[0]
    n = ref.numel()
    lo0 = int(offset)
    out = torch.zeros(n, dtype=ref.dtype, device=ref.device)
    cover = torch.zeros(n, dtype=ref.dtype, device=ref.device) if normalize else None
    drawn: dict[int, torch.Tensor] = {}
    for x, w, s, e, k in zip(models, weight, start, end, noise_term, strict=True):
        lo, hi = max(int(s) - lo0, 0), min(int(e) - lo0, n)
        if lo >= hi or w == 0:
            continue
        k = int(k)
        if k > 0:
            if k not in drawn:
                drawn[k] = noise(k, seed, n).to(ref.device, ref.dtype)
            out[lo:hi].add_(drawn[k][lo:hi], alpha=w)
            continue
        out[lo:hi].add_(x.reshape(-1)[lo:hi], alpha=w)
        if cover is not None:
            cover[lo:hi] += w
    if cover is not None:
        out = torch.where(cover != 0, out / torch.where(cover != 0, cover, 1), out)
    return out.reshape(ref.shape)


REGIONS = register(
    MergeMethod(
        name="regions",
        fn=regions,
        params=(
            Param("weight", 1.0, per_model=True, doc="coefficient of this entry"),
            Param("start", 0.0, per_model=True, low=0.0,
                  doc="first global flattened index of the entry's region"),
            Param("end", EVERYWHERE, per_model=True, low=0.0,
                  doc="one past the last global flattened index of the region"),
            Param("noise_term", 0.0, per_model=True, low=0.0,
                  doc="0: the model's values; k > 0: seeded N(0, 1) noise term k instead"),
            Param("offset", low=0.0,
                  doc="where the tensor starts in the global flattened order (per tensor, "
                      "by filter; a scalar 0 puts every tensor at 0: per-tensor ranges)"),
            Param("normalize", True, kind=bool,
                  doc="divide each element by the summed weights of the model entries "
                      "covering it"),
        ),
        needs_base=False,
        stochastic=True,
        mergekit=False,
        doc="per-region linear combination of models and seeded noise terms (M2N2 children)",
    )
)
