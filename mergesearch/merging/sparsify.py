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
from functools import partial

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
    """The k-th smallest entry (1-based) of a flat tensor, exactly (``torch.kthvalue``'s).

    Non-negative tensors (magnitudes) go through :func:`kth_smallest_magnitude`;
    others are bracketed with a sorted strided sample, counted and finished with
    ``kthvalue`` on the entries inside the bracket (the plain ``kthvalue`` when the
    bracket misses: the sample only decides the speed).
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


# ------------------------------------------------------- exact select by counting
SELECT_MIN_NUMEL = 1 << 16
"""Magnitude tensors at least this large are selected by counting (smaller: ``kthvalue``)."""

_SAMPLE = 1 << 16  # at most this many entries in the strided sample placing the thresholds
_THRESHOLDS = 6  # thresholds counted in the one counting pass
_ROW = 32  # entries per row of the flagging pass: the gather reads only flagged rows


def _magnitudes(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    return (x if base is None else x - base).abs()


def _count_below(x: torch.Tensor, base: torch.Tensor | None,
                 thresholds: torch.Tensor) -> torch.Tensor:
    """For each threshold t, the number of magnitudes ``|x - base| < t``; then the NaN count.

    One pass of reductions (int32, so at most 2**31 entries), no temporaries when compiled.
    """
    a = _magnitudes(x, base)
    counts = [(a < thresholds[j]).to(torch.int32).sum(dtype=torch.int32)
              for j in range(_THRESHOLDS)]
    counts.append((a != a).to(torch.int32).sum(dtype=torch.int32))
    return torch.stack(counts)


def _flag_rows(x: torch.Tensor, base: torch.Tensor | None, lo: torch.Tensor,
               hi: torch.Tensor) -> torch.Tensor:
    """Rows of a ``(rows, _ROW)`` view holding a magnitude in ``[lo, hi]``: 1.0, else 0.0.

    A float max per row: the reduction the CPU compiler vectorises best.
    """
    a = _magnitudes(x, base)
    return torch.where((a >= lo) & (a <= hi), 1.0, 0.0).amax(dim=-1)


_kernels: dict[str, object] = {}


def _kernel(name: str, fn):
    """``torch.compile`` of a select kernel, or the eager function (compiling off or failed)."""
    from mergesearch.merging.base import compile_enabled

    if name not in _kernels:
        _kernels[name] = torch.compile(fn, dynamic=True) if compile_enabled() else fn
    return _kernels[name]


def _run(name: str, fn, *args):
    kernel = _kernel(name, fn)
    if kernel is not fn:
        try:
            return kernel(*args)
        except Exception as err:  # no C++ compiler, unsupported backend, ...
            import logging

            logging.getLogger(__name__).warning(
                "torch.compile of the select failed (%s); counting eagerly from now on", err)
            _kernels[name] = fn
    return fn(*args)


def _order_statistics(sample: torch.Tensor, places: list[int]) -> torch.Tensor:
    """The sample's entries of the given 0-based ranks (ascending), in its dtype.

    On the CPU a numpy partition (a few times faster than ``torch.sort`` there); elsewhere
    a sort.  Half types are exact in float32, so the values are the sample's own.
    """
    if sample.device.type == "cpu":
        import numpy as np

        exact = sample if sample.dtype in (torch.float32, torch.float64) else sample.float()
        values = np.partition(exact.numpy(), places)[places]
        return torch.from_numpy(values).to(sample.dtype)
    return torch.sort(sample).values[torch.tensor(places, device=sample.device)]


def _compiled_ok(x: torch.Tensor) -> bool:
    """Compiled kernels compute in the input dtype only for float32 and float64 (the merge
    dtypes); half types are counted eagerly, so they round exactly as the eager core does."""
    return x.dtype in (torch.float32, torch.float64)


def kth_smallest_magnitude(x: torch.Tensor, k: int,
                           base: torch.Tensor | None = None) -> torch.Tensor:
    """The k-th smallest (1-based) of the magnitudes ``|x - base|`` (``|x|`` without a base),
    over all entries, exactly: what ``torch.kthvalue`` of the flat magnitudes returns.

    Nothing is sorted but a strided sample, and the magnitudes are never written out:

    1. the sorted sample places :data:`_THRESHOLDS` thresholds around the k-th value
       (a band of about eight sample standard deviations of its rank);
    2. one counting pass (compiled reductions) gives the exact number of magnitudes
       below each threshold, so the k-th value lies in a known interval between two
       thresholds (or below the first, or above the last) with a known count below it;
    3. a flagging pass marks the rows of :data:`_ROW` entries holding a magnitude in that
       interval; only those rows are read again, and ``kthvalue`` runs on the few entries
       inside the interval.

    The sample only decides the speed (a missed band widens the interval, never the
    answer).  With NaN among the magnitudes the answer is ``torch.kthvalue``'s (NaN
    counts as the largest), computed by ``torch.kthvalue`` itself.
    """
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    flat = x.reshape(-1)
    bflat = None if base is None else base.reshape(-1)
    if n < SELECT_MIN_NUMEL or n >= 1 << 31:
        return torch.kthvalue(_magnitudes(flat, bflat), k).values
    step = max(1, n // min(_SAMPLE, 16 * math.isqrt(n)))  # sorting costs less than it saves
    sample = _magnitudes(flat[::step], None if bflat is None else bflat[::step])
    m = sample.numel()
    j = (k - 0.5) * m / n  # the k-th value's expected place in the sample
    margin = 4 * math.sqrt(max(j * (m - j) / m, 1.0)) + 2
    places = [round(max(j - margin, 0) + (min(j + margin, m - 1) - max(j - margin, 0)) * i
                    / (_THRESHOLDS - 1)) for i in range(_THRESHOLDS)]
    thresholds = _order_statistics(sample, places)
    compiled = _compiled_ok(x)
    count = partial(_run, "count", _count_below) if compiled else _count_below
    counts = count(flat, bflat, thresholds).tolist()
    if counts[-1]:  # NaN: kthvalue's own order
        return torch.kthvalue(_magnitudes(flat, bflat), k).values
    # the k-th value is in [edges[q], edges[q + 1]) with below[q] magnitudes under it
    below = [0, *counts[:-1], n]
    q = sum(1 for c in below[1:-1] if c < k)  # the last edge with fewer than k below
    inf = torch.full((1,), math.inf, dtype=thresholds.dtype, device=thresholds.device)
    edges = torch.cat([-inf, thresholds, inf])
    # closed at the top: just below the next threshold, or +inf itself above the last
    band = edges[q:q + 2].clone()
    if q < _THRESHOLDS:
        band[1:] = torch.nextafter(band[1:], -inf)
    lo, hi = band[0], band[1]
    rows = n // _ROW * _ROW
    parts = []
    if rows:
        xr = flat[:rows].view(-1, _ROW)
        br = None if bflat is None else bflat[:rows].view(-1, _ROW)
        flag = partial(_run, "flag", _flag_rows) if compiled else _flag_rows
        hit = flag(xr, br, lo, hi).nonzero().view(-1)
        parts.append(_magnitudes(xr.index_select(0, hit),
                                 None if br is None else br.index_select(0, hit)).view(-1))
    if rows < n:
        parts.append(_magnitudes(flat[rows:], None if bflat is None else bflat[rows:]))
    a = torch.cat(parts)
    inside = a[(a >= lo) & (a <= hi)]
    if inside.numel() != below[q + 1] - below[q]:  # cannot happen with exact counts
        return torch.kthvalue(_magnitudes(flat, bflat), k).values
    return torch.kthvalue(inside, k - below[q]).values


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor (k >= 1)."""
    return kth_smallest(values, values.numel() - k + 1)


def magnitude_band(mag: torch.Tensor, density: float,
                   base: torch.Tensor | None = None) -> tuple[float, float]:
    """The magnitudes TIES keeps: the ``density`` fraction largest of ``|mag - base|``
    (``mag`` holds the magnitudes themselves without a base).

    At least one entry survives when ``density > 0`` (as in mergekit); entries
    tied with the cut-off magnitude are all kept.
    """
    if density >= 1:
        return 0.0, math.inf
    n = mag.numel()
    if density <= 0 or n == 0:
        return math.inf, math.inf
    k = max(1, int(density * n))
    return float(kth_smallest_magnitude(mag, n - k + 1, base)), math.inf


def outlier_band(mag: torch.Tensor, density: float, gamma: float,
                 base: torch.Tensor | None = None) -> tuple[float, float]:
    """The magnitudes Model Breadcrumbs keeps (of ``|mag - base|``, or of ``mag`` itself).

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
    return (float(kth_smallest_magnitude(mag, n_bottom + 1, base)),
            float(kth_smallest_magnitude(mag, n_bottom + keep, base)))


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
