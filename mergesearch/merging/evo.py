"""Evo-Merging's merge rule (black-box merging, 2025): sparsity-based denoising and
sign-aware scaling, on LoRA factors where every source has them.

Per source ``i``: ``density`` (alpha_i, the kept fraction) and ``weight`` (beta_i, a
scale that may be negative).  For a tensor that every source changes through LoRA
factors (``scaling_i * B_i @ A_i``), the factors are merged, not the full updates:

    A_m = sum_i beta_i TopK_alpha_i(A_i),   B_m = sum_i beta_i s_i B_i,   delta W = B_m A_m

(the paper's asymmetric rule: only A is pruned; ``prune_b: true`` prunes B as well,
``prune_a: false`` neither).  Each adapter's scaling ``s_i`` (alpha / r) is folded into
its B, so adapters of different scalings and ranks (zero-padded) merge alike; a source
that leaves the tensor alone is rank 0 and adds nothing.  Note what the product does to
a sign: a single source's own term ``beta_i**2 B_i A_i`` keeps its sign, only the cross
terms ``beta_i beta_j B_i A_j`` flip.

Every other tensor (full fine-tunes, a source without factors there, factors whose
shapes or orientation do not line up) takes the same idea on task vectors:
``base + sum_i beta_i TopK_alpha_i(tau_i)``, which is exactly our ``breadcrumbs``
with ``gamma = 0`` and ``normalize: false`` (no sign election): that function does it.

TopK keeps the ``int(alpha * n)`` largest magnitudes of the whole matrix (ties at the
cut-off kept), so alpha = 0 keeps nothing and alpha = 1 everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergesearch.merging import sparsify
from mergesearch.merging.base import MergeMethod, Param, register
from mergesearch.merging.context import LoraFactors, TensorContext
from mergesearch.merging.task_arithmetic import BREADCRUMBS


def top_fraction(x: torch.Tensor, density: float) -> torch.Tensor:
    """``x`` with all but its ``int(density * numel)`` largest magnitudes zeroed (entries
    tied with the cut-off are kept)."""
    if density >= 1:
        return x
    lo, hi = sparsify.outlier_band(x.abs().reshape(-1), density, 0.0)
    a = x.abs()
    return torch.where((a >= lo) & (a <= hi), x, torch.zeros_like(x))


def task_vector_rule(base: torch.Tensor, models: Sequence[torch.Tensor], *,
                     weight: Sequence[float], density: Sequence[float],
                     seed: int = 0) -> torch.Tensor:
    """``base + sum_i weight_i * TopK_density_i(models_i - base)``: breadcrumbs with
    ``gamma = 0``, unnormalised."""
    n = len(models)
    return BREADCRUMBS.fn(base, list(models), weight=list(weight), density=list(density),
                          gamma=[0.0] * n, normalize=False, lambda_=1.0, seed=seed)


def merge_factors(base: torch.Tensor, factors: Sequence[LoraFactors], *,
                  weight: Sequence[float], density: Sequence[float],
                  prune_a: bool = True, prune_b: bool = False) -> torch.Tensor | None:
    """``base + B_m @ A_m`` (transposed where the adapters are) from each source's factors,
    or None when they cannot be merged factor-wise (orientations differ, or the product's
    shape is not the base's)."""
    used = [(f, w, d) for f, w, d in zip(factors, weight, density, strict=True) if f.rank]
    if not used:
        return base.clone()
    if len({f.transpose for f, _, _ in used}) > 1:
        return None
    transpose = used[0][0].transpose
    out_dim, in_dim = used[0][0].b.shape[0], used[0][0].a.shape[1]
    shape = (in_dim, out_dim) if transpose else (out_dim, in_dim)
    if tuple(base.shape) != shape or any(
            f.b.shape[0] != out_dim or f.a.shape[1] != in_dim for f, _, _ in used):
        return None
    rank = max(f.rank for f, _, _ in used)
    a_m = base.new_zeros((rank, in_dim))
    b_m = base.new_zeros((out_dim, rank))
    for f, w, d in used:
        a = top_fraction(f.a, d) if prune_a else f.a
        b = top_fraction(f.b, d) if prune_b else f.b
        a_m[: f.rank] += w * a
        b_m[:, : f.rank] += (w * f.scaling) * b
    delta = b_m @ a_m
    return base + (delta.T if transpose else delta)


def evo_merge(base: torch.Tensor, models: Sequence[torch.Tensor], *,
              weight: Sequence[float], density: Sequence[float], prune_a: bool = True,
              prune_b: bool = False, context: TensorContext | None = None,
              seed: int = 0) -> torch.Tensor:
    """Factor-wise where every source is a LoRA update of this tensor, else on task
    vectors (see the module docstring)."""
    if context is not None:
        factors = [context.factors(i) for i in range(len(models))]
        if all(f is not None for f in factors):
            merged = merge_factors(base, factors, weight=weight, density=density,
                                   prune_a=prune_a, prune_b=prune_b)
            if merged is not None:
                return merged
    return task_vector_rule(base, models, weight=weight, density=density, seed=seed)


EVO_LORA = register(
    MergeMethod(
        name="evo_lora",
        fn=evo_merge,
        params=(
            Param("weight", per_model=True, doc="beta: scale of this source (negative flips)"),
            Param("density", 1.0, per_model=True, low=0.0, high=1.0,
                  doc="alpha: fraction of this source's A (or task vector) kept"),
            Param("prune_a", True, kind=bool, doc="prune LoRA A factors to the density"),
            Param("prune_b", False, kind=bool, doc="prune LoRA B factors to the density too"),
        ),
        task_vectors=True,
        context=True,
        mergekit=False,
        doc="Evo-Merging: top-alpha of each LoRA A (or task vector), scaled by beta, "
            "A and B summed apart",
    )
)
