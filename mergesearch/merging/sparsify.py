"""Sparsification of task vectors: which entries of each delta survive.

Magnitude-based methods reduce to a band of kept magnitudes ``[lo, hi]``,
found exactly here and applied in the fused core of
:mod:`.task_arithmetic`.  DELLA's rank-based random drop is applied here.

Random drops (DARE, DELLA) draw from a counter-based hash of (seed, entry
index), not from a torch generator: a mask is the same on any device, eager or
compiled, and whatever else used torch's random state before.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer; int64 arithmetic masked to 32 bits works on any device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_bits(index: torch.Tensor, seed: torch.Tensor | int) -> torch.Tensor:
    """32 pseudo-random bits per entry from (seed, index): a stateless hash.

    ``seed`` should already be well mixed (see :func:`mix_seed`).  Two rounds
    of ``lowbias32``; the first operation widens the (possibly 32-bit) index.
    """
    x = (index ^ seed) & _MASK32
    return _lowbias32(_lowbias32(x) ^ 0x5BD1E995)


def mix_seed(seed: int) -> int:
    """A 32-bit stream key from any integer seed (host side)."""
    x = seed & _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16) ^ ((seed >> 32) & _MASK32)


def model_key(seed: int, i: int) -> int:
    """The hash key of model ``i``'s random mask for a tensor seed (DARE and DELLA)."""
    return mix_seed(seed * 1_000_003 + i * 7919)


def uniform(shape: torch.Size | tuple[int, ...], key: int, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    """Uniform numbers in [0, 1) on a 2**-24 grid, one per entry of a row-major ``shape``.

    24 bits fit a float32 mantissa, so the conversion is exact on every device.
    """
    index = torch.arange(math.prod(shape), device=device).view(shape)
    return (uniform_bits(index, key) >> 8).to(dtype) * 2.0**-24


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flat tensor, exactly.

    ``torch.kthvalue`` on a large tensor costs many memory passes on CPU and
    sorts on CUDA.  For large tensors we first bracket the answer between two
    order statistics of a strided sample, count the entries below the bracket,
    and run ``kthvalue`` only on the few entries inside it.  The sample only
    decides the speed: when the bracket misses, the plain ``kthvalue`` runs.
    """
    n = values.numel()
    if n < 1 << 15:
        return torch.kthvalue(values, k).values
    sample = values[:: n // min(1 << 14, n // 32)]
    m = sample.numel()
    margin = int(4 * m**0.5) + 1  # ~4 standard deviations of the sample rank
    j = int(k * m / n)
    if j - margin < 0 or j + margin >= m:
        return torch.kthvalue(values, k).values
    ordered = torch.sort(sample).values
    lo, hi = ordered[j - margin], ordered[j + margin]
    below = int(torch.count_nonzero(values < lo))
    band = values[(values >= lo) & (values <= hi)]
    if not below < k <= below + band.numel():
        return torch.kthvalue(values, k).values
    return torch.kthvalue(band, k - below).values


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor (k >= 1)."""
    return kth_smallest(values, values.numel() - k + 1)


def magnitude_band(mag: torch.Tensor, density: float) -> tuple[float, float]:
    """The magnitudes TIES keeps: the ``density`` fraction largest of a flat ``|tau|``.

    At least one entry survives when ``density > 0`` (as in mergekit); entries
    tied with the cut-off magnitude are all kept.
    """
    if density >= 1:
        return 0.0, math.inf
    if density <= 0 or mag.numel() == 0:
        return math.inf, math.inf
    k = max(1, int(density * mag.numel()))
    return float(_kth_largest(mag, k)), math.inf


def outlier_band(mag: torch.Tensor, density: float, gamma: float) -> tuple[float, float]:
    """The magnitudes Model Breadcrumbs keeps (flat ``|tau|``).

    ``int(density * n)`` entries: those just below the ``int(gamma * n)``
    largest magnitudes (the top shrinks when both cannot fit).
    """
    if density >= 1:
        return 0.0, math.inf
    n = mag.numel()
    keep = int(density * n)
    if keep <= 0:
        return math.inf, math.inf
    n_bottom = max(0, n - keep - int(gamma * n))
    return float(kth_smallest(mag, n_bottom + 1)), float(kth_smallest(mag, n_bottom + keep))


def magprune(tau: torch.Tensor, density: float, epsilon: float, key: int,
             rescale: bool) -> torch.Tensor:
    """DELLA MAGPRUNE: keep probabilities rise linearly with magnitude rank.

    Within each row (the whole tensor for 1-D) the entry of rank r (0 =
    smallest of n, ties in index order) is kept with probability ``density -
    epsilon + 2 * epsilon * r / (n - 1)``; with ``rescale`` survivors are
    divided by their probability (the paper's unbiased rescaling).  Entry k
    (row-major) is kept when ``uniform(shape, key)[k]`` is below its probability.
    """
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(
            f"della needs 0 < density - epsilon and density + epsilon < 1, "
            f"got density={density:g}, epsilon={epsilon:g}"
        )
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    # a stable sort, so tied magnitudes rank alike on every device
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(tau.dtype)
    rank_norm = ranks / max(n - 1, 1)
    prob = (density - epsilon) + 2 * epsilon * rank_norm
    keep = uniform(rows.shape, key, tau.device, tau.dtype) < prob
    kept = rows * keep
    if rescale:
        kept = kept / prob
    return kept.reshape(tau.shape)
