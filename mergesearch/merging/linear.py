"""Linear merge (model soup): a weighted average of the models."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergesearch.merging.base import MergeMethod, Param, register


def linear(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    normalize: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """``sum_i w_i theta_i``, divided by ``sum_i w_i`` when ``normalize``."""
    out = torch.zeros_like(models[0])
    for tensor, w in zip(models, weight, strict=True):
        out.add_(tensor, alpha=w)
    if normalize:
        out.div_(sum(weight))
    return out


LINEAR = register(
    MergeMethod(
        name="linear",
        fn=linear,
        params=(
            Param("weight", per_model=True, doc="weight of this model"),
            Param("normalize", True, kind=bool, doc="divide by the sum of weights"),
        ),
        needs_base=False,
        doc="weighted average of the models",
    )
)
