"""What a merge method is: a pure tensor function plus a short spec of its parameters."""

from __future__ import annotations

import keyword
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

MergeFn = Callable[..., torch.Tensor]
"""``fn(base, models, *, seed, **params) -> merged``.

``base`` is the base tensor (or ``None`` for methods without one), ``models``
the source tensors, all of one shape and already in the compute dtype.
Per-model parameters arrive as one float per model, method-wide ones as
scalars, both already resolved for this tensor.  ``seed`` (an int derived from
the recipe seed and the tensor name) drives any randomness.  A method with
``context=True`` also gets ``context=``, a
:class:`~mergesearch.merging.context.TensorContext` answering cached per-source
statistics (norms, means, Gram matrices ...) of the tensor being merged.  A method
with ``writes_out=True`` also takes ``out=``: a tensor of the merged shape and compute
dtype, sharing no memory with the inputs, that the result may be written into (the
returned tensor is the result; it is ``out``'s memory only where the method could write
there).
"""

PrepareFn = Callable[[Iterable[tuple[torch.Tensor | None, list[torch.Tensor]]]], dict[str, Any]]
"""Optional whole-model pass run before the per-tensor merge (e.g. a global SLERP angle).

It sees every (base, models) tensor group once and returns extra keyword
arguments for the merge function.
"""


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method."""

    name: str
    default: float | bool | None = None  # None: required
    per_model: bool = False
    kind: type = float
    low: float | None = None
    high: float | None = None
    doc: str = ""

    @property
    def arg(self) -> str:
        """Keyword argument name in the merge function (``lambda`` -> ``lambda_``)."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    def check(self, value: Any, where: str) -> None:
        """Raise ValueError naming ``where`` if ``value`` does not fit this parameter."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected true or false, got {value!r}")
            return
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise ValueError(f"{where}={value:g} is outside [{lo}, {hi}]")


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method."""

    name: str
    fn: MergeFn
    params: tuple[Param, ...] = ()
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    task_vectors: bool = False  # merges task vectors (so LiNeS scaling applies)
    stochastic: bool = False  # draws random masks from the seed
    prepare: PrepareFn | None = None
    context: bool = False  # fn takes ``context=`` (per-source statistics, cached)
    doc: str = ""
    mergekit: bool = True  # mergekit 0.1.5 has a method of this name and meaning
    writes_out: bool = False  # fn takes ``out=`` (see MergeFn): no copy into the destination
    # Checks across parameters, run on every value a model's settings can take:
    # check({param: [values...]}, where) raises ValueError naming ``where``.
    check: Callable[[dict[str, list], str], None] | None = None
    _by_name: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})

    def param(self, name: str) -> Param:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"method {self.name!r} has no parameter {name!r}") from None


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (its name must be new)."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; the error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown merge method {name!r} (known: {known})") from None


def methods() -> dict[str, MergeMethod]:
    """All registered methods by name."""
    return dict(sorted(_REGISTRY.items()))


def compile_enabled() -> bool:
    """Whether merges may use ``torch.compile``; ``MERGESEARCH_COMPILE=0`` turns it off."""
    return os.environ.get("MERGESEARCH_COMPILE", "1") != "0"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges run in float32, or float64 when the inputs already are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_nonfinite = WeakTensorKeyDictionary()  # merged tensor -> its count of NaN and inf entries


def note_nonfinite(merged: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Record ``count``, the NaN and inf entries of ``merged`` (a 0-dim tensor computed in
    the pass that wrote it), for :func:`all_finite`; returns ``merged``."""
    _nonfinite[merged] = count
    return merged


def all_finite(merged: torch.Tensor) -> bool:
    """Whether ``merged`` holds no NaN or inf.

    A tensor straight from a compiled merge pass answers from the count that pass made
    (:func:`note_nonfinite`): nothing is read again.  Any other tensor is checked by the
    finiteness of its float32 sum: a NaN or inf entry always makes the sum NaN or inf, so
    a finite sum settles it in one reduction, about 30x faster than ``isfinite`` on CPU
    (no boolean tensor is written).  A sum that is not finite may be an overflow of huge
    finite values, so only then is every entry checked.
    """
    count = _nonfinite.pop(merged, None)
    if count is not None:
        return not bool(count)
    if not merged.is_floating_point():
        return True
    total = merged.sum(dtype=torch.float64 if merged.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(merged).all())
