"""Linear merge (model soup): a weighted average of the models."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergesearch.merging.base import MergeMethod, Param, register
from mergesearch.merging.task_arithmetic import weighted_sum


def linear(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    normalize: bool = True,
    seed: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i w_i theta_i``, divided by ``sum_i w_i`` when ``normalize``.

    Bit for bit mergekit's linear merge; large tensors take one compiled pass
    (:func:`~mergesearch.merging.task_arithmetic.weighted_sum`), into ``out`` when given.
    """
    return weighted_sum(models, weight, normalize, out)


LINEAR = register(
    MergeMethod(
        name="linear",
        fn=linear,
        params=(
            Param("weight", per_model=True, doc="weight of this model"),
            Param("normalize", True, kind=bool, doc="divide by the sum of weights"),
        ),
        needs_base=False,
        writes_out=True,
        doc="weighted average of the models",
    )
)
