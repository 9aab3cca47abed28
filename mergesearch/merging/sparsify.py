"""Sparsification of task vectors: which entries of each delta survive.

Each function takes a delta ``tau`` (float32/float64) and returns the kept
delta (same shape, dropped entries zero).  Deterministic ones select by
magnitude; random ones draw from the ``generator`` they are given.
"""

from __future__ import annotations

import torch

_SAMPLE = 1 << 14


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flat tensor, exactly.

    ``torch.kthvalue`` on a large tensor costs many memory passes on CPU and
    sorts on CUDA.  For large tensors we first bracket the answer between two
    order statistics of a strided sample, count the entries below the bracket,
    and run ``kthvalue`` only on the few entries inside it.  The sample only
    decides the speed: when the bracket misses, the plain ``kthvalue`` runs.
    """
    n = values.numel()
    if n <= 16 * _SAMPLE:
        return torch.kthvalue(values, k).values
    sample = values[:: n // _SAMPLE]
    m = sample.numel()
    margin = int(4 * m**0.5) + 1  # ~4 standard deviations of the sample rank
    j = k * m / n
    lo_rank, hi_rank = int(j) - margin, int(j) + margin
    if lo_rank < 1 or hi_rank > m:
        return torch.kthvalue(values, k).values
    lo = torch.kthvalue(sample, lo_rank).values
    hi = torch.kthvalue(sample, hi_rank).values
    below = int(torch.count_nonzero(values < lo))
    band = values[(values >= lo) & (values <= hi)]
    if not below < k <= below + band.numel():
        return torch.kthvalue(values, k).values
    return torch.kthvalue(band, k - below).values


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor (k >= 1)."""
    return kth_smallest(values, values.numel() - k + 1)


def magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trimming: keep the ``density`` fraction of entries largest in magnitude.

    At least one entry survives when ``density > 0`` (as in mergekit).  Entries
    tied with the threshold magnitude are all kept.
    """
    if density >= 1:
        return tau
    if density <= 0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    k = max(1, int(density * tau.numel()))
    mag = tau.abs()
    threshold = _kth_largest(mag.reshape(-1), k)
    return tau * (mag >= threshold)


def outliers(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction and the smallest entries.

    Keeps ``int(density * n)`` entries: those just below the ``int(gamma * n)``
    largest magnitudes (the top shrinks when both cannot fit).
    """
    if density >= 1:
        return tau
    n = tau.numel()
    keep = int(density * n)
    if keep <= 0:
        return torch.zeros_like(tau)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    mag = tau.abs()
    flat = mag.reshape(-1)
    low = kth_smallest(flat, n_bottom + 1)
    high = kth_smallest(flat, n_bottom + keep)
    return tau * ((mag >= low) & (mag <= high))


def random(tau: torch.Tensor, density: float, generator: torch.Generator | None,
           rescale: bool) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density``.

    With ``rescale`` the survivors are divided by ``density`` so the delta is
    unchanged in expectation (the DARE paper; mergekit instead matches the L1
    norm of the delta, which is the same in expectation).
    """
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    keep = torch.rand(tau.shape, generator=generator, device=tau.device, dtype=tau.dtype)
    keep = keep < density
    kept = tau * keep
    return kept / density if rescale else kept


def magprune(tau: torch.Tensor, density: float, epsilon: float,
             generator: torch.Generator | None, rescale: bool) -> torch.Tensor:
    """DELLA MAGPRUNE: keep probabilities rise linearly with magnitude rank.

    Within each row (the whole tensor for 1-D) the entry of rank r (0 =
    smallest of n) is kept with probability ``density - epsilon + 2 * epsilon
    * r / (n - 1)``; with ``rescale`` survivors are divided by their
    probability (the paper's unbiased rescaling).
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
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(tau.dtype)
    rank_norm = ranks / max(n - 1, 1)
    prob = (density - epsilon) + 2 * epsilon * rank_norm
    keep = torch.rand(rows.shape, generator=generator, device=tau.device, dtype=tau.dtype) < prob
    kept = rows * keep
    if rescale:
        kept = kept / prob
    return kept.reshape(tau.shape)
