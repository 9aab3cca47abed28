"""Merge methods: pure tensor functions behind a registry, plus layer helpers.

Nothing here knows about recipes, checkpoints or models; adding a method is
one small module that calls :func:`register`.
"""

from mergesearch.merging import (  # noqa: F401
    bmm,
    evo,
    linear,
    passthrough,
    regions,
    slerp,
    task_arithmetic,
)
from mergesearch.merging.base import (
    MergeMethod,
    Param,
    all_finite,
    compute_dtype,
    get_method,
    methods,
    register,
)

__all__ = ["MergeMethod", "Param", "all_finite", "compute_dtype", "get_method", "methods",
           "register"]
