"""Passthrough: each output tensor is copied from one model.

Used with a recipe's ``layer_path``, which says which layer of which model
fills each output layer (see :mod:`mergesearch.merging.layers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergesearch.merging.base import MergeMethod, register


def passthrough(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    seed: int = 0,
) -> torch.Tensor:
    """The single input tensor, unchanged."""
    (only,) = models
    return only


PASSTHROUGH = register(
    MergeMethod(
        name="passthrough",
        fn=passthrough,
        needs_base=False,
        min_models=0,
        doc="stack layers from several models along a layer path (data-flow merge)",
    )
)
