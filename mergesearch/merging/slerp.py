"""Spherical interpolation between a base and one other model.

``slerp`` follows mergekit 0.1.5: each tensor, flattened, gets its own
angle; nearly parallel tensors (|cos| > 0.9995) fall back to linear
interpolation.  ``global_slerp`` is the M2N2 variant: one angle for the whole
model, computed over all parameters flattened together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from mergesearch.merging.base import MergeMethod, Param, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    t: float,
    seed: int = 0,
) -> torch.Tensor:
    """Per-tensor SLERP from ``base`` (t = 0) to ``models[0]`` (t = 1)."""
    (other,) = models
    a, b = base.reshape(-1), other.reshape(-1)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    dot = ((a / norm_a) @ (b / norm_b)).clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        return (1 - t) * base + t * other
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    coef_a = torch.sin((1 - t) * theta) / sin_theta
    coef_b = torch.sin(t * theta) / sin_theta
    return coef_a * base + coef_b * other


def global_angle(groups: Iterable[tuple[torch.Tensor | None, list[torch.Tensor]]]) -> dict:
    """Omega = arccos(<A/|A|, B/|B|>) over every parameter of both models."""
    dot = norm_a = norm_b = 0.0
    for base, (other,) in groups:
        a, b = base.reshape(-1).double(), other.reshape(-1).double()
        dot += float(a @ b)
        norm_a += float(a @ a)
        norm_b += float(b @ b)
    cos = dot / max(math.sqrt(norm_a * norm_b), EPS)
    return {"omega": math.acos(min(1.0, max(-1.0, cos)))}


def slerp_with_angle(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    t: float,
    omega: float,
    seed: int = 0,
) -> torch.Tensor:
    """``(sin((1-t) Omega) A + sin(t Omega) B) / sin Omega``; linear when sin Omega <= 1e-6."""
    (other,) = models
    s = math.sin(omega)
    if s <= 1e-6:
        return (1 - t) * base + t * other
    return (math.sin((1 - t) * omega) / s) * base + (math.sin(t * omega) / s) * other


T = Param("t", low=0.0, high=1.0, doc="interpolation position: 0 = base, 1 = the other model")

SLERP = register(
    MergeMethod(
        name="slerp",
        fn=slerp,
        params=(T,),
        min_models=1,
        max_models=1,
        doc="per-tensor spherical interpolation between the base and one model",
    )
)
GLOBAL_SLERP = register(
    MergeMethod(
        name="global_slerp",
        fn=slerp_with_angle,
        params=(T,),
        min_models=1,
        max_models=1,
        prepare=global_angle,
        mergekit=False,
        doc="spherical interpolation with one angle for the whole model (M2N2)",
    )
)
