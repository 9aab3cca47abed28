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


_INT32_MIN = -(1 << 31)


def _srl32(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int32 bits (``>>`` on int32 is arithmetic)."""
    return (x >> shift) & ((1 << (32 - shift)) - 1)


def _lowbias32_int32(x: torch.Tensor) -> torch.Tensor:
    """:func:`_lowbias32` on int32 bits: multiplies wrap modulo 2**32 as the mask does."""
    x = x ^ _srl32(x, 16)
    x = x * 0x7FEB352D
    x = x ^ _srl32(x, 15)
    x = x * (0x846CA68B - (1 << 32))  # the same 32 bits, as an int32
    return x ^ _srl32(x, 16)


def as_int32(value: int) -> int:
    """The low 32 bits of ``value`` read as a signed 32-bit integer."""
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def signed_bits(index: torch.Tensor, key: torch.Tensor | int) -> torch.Tensor:
    """``uniform_bits(index, key) - 2**31`` as int32, computed in int32 arithmetic.

    ``index`` is int32 (the entry index modulo 2**32, as ``Tensor.to(torch.int32)``
    wraps it), ``key`` the stream key as int32 (:func:`as_int32`).  Half the lanes'
    width of the int64 form: the same bits at about half the cost.  ``hash < k`` is
    ``signed_bits <= k - 1 - 2**31`` for ``1 <= k <= 2**32``.
    """
    x = _lowbias32_int32(_lowbias32_int32(index ^ key) ^ 0x5BD1E995)
    return x ^ _INT32_MIN  # flipping the top bit subtracts 2**31 from the unsigned hash


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


# ------------------------------------------------------- exact select by counting
SELECT_MIN_NUMEL = 1 << 16
"""Magnitude tensors at least this large are selected by counting (smaller: ``kthvalue``)."""

_SAMPLE = 1 << 16  # at most this many entries in the strided sample placing the band
_ROW = 32  # entries per row of the scan (shorter rows compile to slower loops)
_MARGIN = 2.5  # sample standard deviations on each side of the k-th value's sample rank
_WIDE = 4  # the band counted after a miss is this many times as wide


def _magnitudes(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    return (x if base is None else x - base).abs()


def _scan_rows(x: torch.Tensor, base: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a ``(rows, _ROW)`` view of the magnitudes ``|x - base|``: how many are
    below ``lo``, how many lie in ``[lo, hi]``, and the largest and smallest of those
    (-1 and +inf when none).

    Row reductions only, in floats (exact counts up to 2**24 per row): the kind the CPU
    compiler fuses into one vectorised pass.  A row with one or two magnitudes inside
    hands them over directly, so only the few rows with more are read again.
    """
    a = _magnitudes(x, base)
    inside = (a >= lo) & (a <= hi)
    return (torch.where(a < lo, 1.0, 0.0).sum(dim=-1),
            torch.where(inside, 1.0, 0.0).sum(dim=-1),
            torch.where(inside, a, -1.0).amax(dim=-1),
            torch.where(inside, a, math.inf).amin(dim=-1))


def _scan_rows_multi(xs: list[torch.Tensor], base: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`_scan_rows` of several models against one base in one pass (model ``i``'s
    band is ``[lo[i], hi[i]]``): the base is read once, not once per model.  Returns the
    four row tensors of each model in turn."""
    out = []
    for i, x in enumerate(xs):
        out.extend(_scan_rows(x, base, lo[i], hi[i]))
    return tuple(out)


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
    the sample's order statistics place a band ``[lo, hi]`` around the k-th value (about
    five standard deviations of its sample rank wide; the stride visits every column,
    :func:`sample_step`); one compiled pass over ``x`` and ``base`` (:func:`_scan_rows`)
    counts, per row, the magnitudes below and inside the band and keeps the largest and
    smallest inside; a partition (numpy's on the CPU, a sort elsewhere) then runs on the
    few magnitudes inside, from those row extremes and the few rows holding more than two.
    When the k-th value is outside the band (the sample misled), a pass counts again on
    the side that holds it, out to a band four times as wide and to the end only if that
    misses too: the sample only ever decides the speed.  With NaN the answer is
    ``torch.kthvalue``'s own (NaN counts as the largest).
    """
    return kth_smallest_magnitudes([x], [k], base)[0]


def kth_smallest_magnitudes(xs: list[torch.Tensor], ks: list[int],
                            base: torch.Tensor | None = None) -> list[torch.Tensor]:
    """:func:`kth_smallest_magnitude` of each ``xs[i]`` (all shaped as ``base``) for
    ``ks[i]``, the same values; with a base, the first counting pass of every model is one
    pass (:func:`_scan_rows_multi`), which reads the base once instead of once per model."""
    if len(xs) != len(ks):
        raise ValueError(f"{len(xs)} tensors but {len(ks)} ranks")
    for x, k in zip(xs, ks, strict=True):
        if not 1 <= k <= x.numel():
            raise ValueError(f"k must be in [1, {x.numel()}], got {k}")
    if base is None or len(xs) == 1:  # nothing shared to read once
        return [_kth_from(x.reshape(-1), k, None if base is None else base.reshape(-1), x)
                for x, k in zip(xs, ks, strict=True)]
    bflat = base.reshape(-1)
    flats = [x.reshape(-1) for x in xs]
    if bflat.numel() < SELECT_MIN_NUMEL:
        return [torch.kthvalue(_magnitudes(f, bflat), k).values
                for f, k in zip(flats, ks, strict=True)]
    step = sample_step(bflat.numel(), _columns(base))
    bsample = bflat[::step].contiguous()  # the base's part of every model's sample
    bands = [_place_band(f, bsample, k, step) for f, k in zip(flats, ks, strict=True)]
    firsts = _bands(flats, bflat, bands, xs[0])
    return [_kth_in_band(f, bflat, k, band, first, x)
            for f, k, band, first, x in zip(flats, ks, bands, firsts, xs, strict=True)]


def _kth_from(flat: torch.Tensor, k: int, bflat: torch.Tensor | None,
              like: torch.Tensor) -> torch.Tensor:
    if flat.numel() < SELECT_MIN_NUMEL:
        return torch.kthvalue(_magnitudes(flat, bflat), k).values
    step = sample_step(flat.numel(), _columns(like))
    band = _place_band(flat, None if bflat is None else bflat[::step], k, step)
    return _kth_in_band(flat, bflat, k, band, _band(flat, bflat, *band[:2], like), like)


def _columns(x: torch.Tensor) -> int:
    """The row length of a matrix-shaped tensor (1 for a vector: no columns to cover)."""
    return x.shape[-1] if x.dim() > 1 else 1


def sample_step(n: int, columns: int = 1) -> int:
    """The stride of the sample that places a band in ``n`` entries of rows ``columns``
    long: about ``min(_SAMPLE, 16 sqrt(n))`` entries (sorting them costs less than it
    saves), the stride made coprime to the row length so that the sample visits every
    column.  A stride sharing a factor with it would see only a few columns (96 on 768-wide
    rows sees 8 of them); where columns differ in scale, as in trained weights, the band
    would then miss the k-th value most of the time and the counting pass run again.
    """
    step = max(1, n // min(_SAMPLE, 16 * math.isqrt(n)))
    while math.gcd(step, columns) != 1:
        step += 1
    return step


def _place_band(flat: torch.Tensor, bsample: torch.Tensor | None, k: int,
                step: int) -> tuple[float, float, float, float]:
    """A band ``[lo, hi]`` of magnitudes likely to hold the k-th, and a band four times as
    wide for when it misses, from the sample of every ``step``-th entry
    (:func:`sample_step`; ``bsample`` is the base's, taken once for all models):
    ``(lo, hi, lo_wide, hi_wide)``, infinite past the sample."""
    n = flat.numel()
    sample = _magnitudes(flat[::step], bsample)
    m = sample.numel()
    j = (k - 0.5) * m / n  # the k-th value's expected place in the sample
    margin = _MARGIN * math.sqrt(max(j * (m - j) / m, 1.0)) + 2
    at = [math.floor(j - margin), math.ceil(j + margin),
          math.floor(j - _WIDE * margin), math.ceil(j + _WIDE * margin)]
    places = sorted({p for p in at if 0 <= p < m})
    stats = dict(zip(places, _order_statistics(sample, places).tolist() if places else [],
                     strict=True))
    lo, hi, lo_wide, hi_wide = (stats.get(p, -math.inf if p < 0 else math.inf) for p in at)
    return lo, hi, lo_wide, hi_wide


def _kth_in_band(flat: torch.Tensor, bflat: torch.Tensor | None, k: int,
                 band: tuple[float, float, float, float], first: tuple[int, torch.Tensor],
                 like: torch.Tensor) -> torch.Tensor:
    """The k-th magnitude, given the count below ``band`` and the magnitudes inside it
    (``first``).  When the band missed, the side that holds the k-th is counted again, out
    to the wide band's edge first and to the end only if that misses too: a miss costs a
    pass, not a partition of half the tensor."""
    inf, dtype = math.inf, like.dtype
    lo, hi, lo_wide, hi_wide = band
    below, inside = first
    if k <= below:  # below the band (so lo > -inf)
        upper = _next_below(lo, dtype)
        for lower in ([lo_wide] if lo_wide > -inf else []) + [-inf]:
            if lower > upper:  # the wide band ends where the band does
                continue
            below, inside = _band(flat, bflat, lower, upper, like)
            if below < k:  # always at -inf: nothing is counted below it
                break
            upper = _next_below(lower, dtype)
    elif k > below + inside.numel():  # above it
        if hi == inf:  # past every number: NaN
            return torch.kthvalue(_magnitudes(flat, bflat), k).values
        below += inside.numel()
        lower = _next_above(hi, dtype)
        for upper in ([hi_wide] if hi_wide < inf else []) + [inf]:
            if upper < lower:
                continue
            under, inside = _band(flat, bflat, lower, upper, like)
            if under != below or k <= below + inside.numel():
                break
            below += inside.numel()
            lower = _next_above(upper, dtype)
        if under != below or k > below + inside.numel():  # NaN counted nowhere
            return torch.kthvalue(_magnitudes(flat, bflat), k).values
    # the band holds no NaN: a partition (several times faster than kthvalue on the CPU)
    return _order_statistics(inside, [k - below - 1])[0]


def _next_below(v: float, dtype: torch.dtype) -> float:
    t = torch.tensor(v, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)))


def _next_above(v: float, dtype: torch.dtype) -> float:
    t = torch.tensor(v, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)))


def _band(flat: torch.Tensor, bflat: torch.Tensor | None, lo: float, hi: float,
          like: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How many magnitudes are below ``lo``, and those in ``[lo, hi]`` (flat, any order).

    ``lo`` and ``hi`` are values of the magnitudes' dtype (or infinite), so comparing in
    that dtype is exact.
    """
    n = flat.numel()
    bounds = torch.tensor([lo, hi], dtype=flat.dtype, device=flat.device)
    lo_t, hi_t = bounds[0], bounds[1]
    rows = n // _ROW * _ROW
    below, parts = 0, []
    if rows:
        xr = flat[:rows].view(-1, _ROW)
        br = None if bflat is None else bflat[:rows].view(-1, _ROW)
        scan = partial(_run, "scan", _scan_rows) if _compiled_ok(like) else _scan_rows
        below, parts = _rows_inside(xr, br, lo_t, hi_t, *scan(xr, br, lo_t, hi_t))
    return _tail(flat, bflat, rows, lo_t, hi_t, below, parts)


def _bands(flats: list[torch.Tensor], bflat: torch.Tensor,
           bands: list[tuple[float, float, float, float]],
           like: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """:func:`_band` of each model for its own band, the rows of all counted in one pass."""
    n = bflat.numel()
    bounds = torch.tensor([b[:2] for b in bands], dtype=bflat.dtype,
                          device=bflat.device)  # (models, 2)
    rows = n // _ROW * _ROW
    xrs = [f[:rows].view(-1, _ROW) for f in flats]
    br = bflat[:rows].view(-1, _ROW)
    scan = (partial(_run, "scan_multi", _scan_rows_multi) if _compiled_ok(like)
            else _scan_rows_multi)
    scanned = scan(xrs, br, bounds[:, 0], bounds[:, 1]) if rows else ()
    out = []
    for i, f in enumerate(flats):
        lo_t, hi_t = bounds[i, 0], bounds[i, 1]
        below, parts = 0, []
        if rows:
            below, parts = _rows_inside(xrs[i], br, lo_t, hi_t, *scanned[4 * i: 4 * i + 4])
        out.append(_tail(f, bflat, rows, lo_t, hi_t, below, parts))
    return out


def _rows_inside(xr: torch.Tensor, br: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor,
                 under: torch.Tensor, count: torch.Tensor, top: torch.Tensor,
                 bottom: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """From a scan's rows: the count below the band and the magnitudes inside it (a row
    with one inside hands over its largest, with two its largest and smallest; rows with
    more are read again).  The row bookkeeping runs in numpy on the CPU (faster masks)."""
    if count.device.type == "cpu":
        import numpy as np

        c = count.numpy()
        below = int(under.numpy().sum(dtype=np.float64))
        def where(mask):
            return torch.from_numpy(np.flatnonzero(mask))

        parts = [top.index_select(0, where((c == 1) | (c == 2))),
                 bottom.index_select(0, where(c == 2))]
        many = where(c > 2)
    else:
        below = int(under.sum(dtype=torch.float64))
        parts = [top[(count == 1) | (count == 2)], bottom[count == 2]]
        many = (count > 2).nonzero().view(-1)
    if many.numel():
        parts.append(_inside(xr.index_select(0, many),
                             None if br is None else br.index_select(0, many), lo, hi))
    return below, parts


def _tail(flat: torch.Tensor, bflat: torch.Tensor | None, rows: int, lo: torch.Tensor,
          hi: torch.Tensor, below: int, parts: list[torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Add the entries past the last whole row to a band's count and magnitudes."""
    if rows < flat.numel():
        a = _magnitudes(flat[rows:], None if bflat is None else bflat[rows:])
        below += int((a < lo).sum())
        parts.append(a[(a >= lo) & (a <= hi)])
    return below, torch.cat(parts)


def _inside(x: torch.Tensor, base: torch.Tensor | None, lo: torch.Tensor,
            hi: torch.Tensor) -> torch.Tensor:
    """The magnitudes of these entries in ``[lo, hi]``, flat."""
    a = _magnitudes(x, base).reshape(-1)
    return a[(a >= lo) & (a <= hi)]


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


def magnitude_bands(models: list[torch.Tensor], densities: list[float],
                    base: torch.Tensor) -> list[tuple[float, float]]:
    """:func:`magnitude_band` of each model against one base, the cut-offs found together
    (:func:`kth_smallest_magnitudes`: the base read once per counting pass)."""
    bands = [magnitude_band(m, d, base) if d >= 1 or d <= 0 or m.numel() == 0 else None
             for m, d in zip(models, densities, strict=True)]
    todo = [i for i, b in enumerate(bands) if b is None]
    ks = [models[i].numel() - max(1, int(densities[i] * models[i].numel())) + 1 for i in todo]
    for i, v in zip(todo, kth_smallest_magnitudes([models[i] for i in todo], ks, base),
                    strict=True):
        bands[i] = (float(v), math.inf)
    return bands


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
