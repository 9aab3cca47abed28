"""Per-source statistics a merge method may ask for, computed once and cached.

Some methods need more than the tensors being merged: a norm or a mean of each
source tensor, or (BMM-style) a Gram matrix.  A :class:`MergeContext` answers
``stat(statistic, source, tensor)`` for any registered statistic, computing it
on first use from the source's stored tensor and caching it, so a worker that
merges thousands of candidates over the same sources computes each statistic
once.  A method asks for it by setting ``MergeMethod.context=True``: its
function then receives ``context=``, a :class:`TensorContext` for the tensor
being merged (which sources it comes from), e.g.::

    def norm_matched(base, models, *, weight, context, seed=0):
        norms = [context.stat("norm", i) for i in range(len(models))]
        ...

New statistics are registered with :func:`register_statistic`; a statistic is
``fn(tensor) -> value`` (a float, a tensor: anything), the tensor in the
compute dtype (float32, float64 for float64 sources) where the pool holds it.
Nothing here knows about checkpoints: the context is given a ``fetch(source,
tensor)`` function (the resident merger passes its pool's), and optionally a
``factors(source, tensor)`` function answering a LoRA source's two factors
(:class:`LoraFactors`) instead of the full tensor they make, for methods that
merge adapters factor-wise (``TensorContext.factors``).

Statistics that are not a function of the one tensor (the Gram matrix of the inputs
a linear module sees when its source model runs on calibration data, which BMM and
RegMean need) come from a *provider* given to one context:
``context.provide("input_gram", fn)``, ``fn(source, tensor) -> value``.  The worker
that owns the context attaches it (:mod:`mergesearch.execution.calibration`) and
keeps what it collects; a method asks for it with the same ``stat`` call, and
:meth:`TensorContext.provides` says whether this context can answer it at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mergesearch.merging.base import compute_dtype

Statistic = Callable[[torch.Tensor], Any]
_STATISTICS: dict[str, Statistic] = {}


def register_statistic(name: str) -> Callable[[Statistic], Statistic]:
    """Decorator: ``fn(tensor) -> value`` computes the per-source statistic ``name``."""
    def decorate(fn: Statistic) -> Statistic:
        if name in _STATISTICS and _STATISTICS[name] is not fn:
            raise ValueError(f"statistic {name!r} is already registered")
        _STATISTICS[name] = fn
        return fn
    return decorate


def statistics() -> list[str]:
    """The registered statistics (sorted)."""
    return sorted(_STATISTICS)


@register_statistic("norm")
def norm(x: torch.Tensor) -> float:
    """The L2 (Frobenius) norm of the tensor."""
    return float(torch.linalg.vector_norm(x))


@register_statistic("mean")
def mean(x: torch.Tensor) -> float:
    """The mean of the tensor's entries."""
    return float(x.mean())


@dataclass(frozen=True)
class LoraFactors:
    """A LoRA source's update to one tensor as its factors: ``scaling * B @ A``, transposed
    when ``transpose`` (embeddings, ``fan_in_fan_out``).  ``a`` is ``(r, in)``, ``b``
    ``(out, r)``; both None (rank 0) when the adapter leaves the tensor alone."""

    a: torch.Tensor | None
    b: torch.Tensor | None
    scaling: float = 1.0
    transpose: bool = False

    @property
    def rank(self) -> int:
        return 0 if self.a is None else int(self.a.shape[0])

    def to(self, *args, **kwargs) -> LoraFactors:
        """Both factors moved or cast as ``Tensor.to`` would (rank 0 stays as it is)."""
        if self.a is None:
            return self
        return LoraFactors(self.a.to(*args, **kwargs), self.b.to(*args, **kwargs),
                           self.scaling, self.transpose)


FactorsFn = Callable[[str, str], "LoraFactors | None"]
Provider = Callable[[str, str], Any]
"""``fn(source, tensor) -> value``: a statistic one context answers from outside the tensor."""


class MergeContext:
    """Statistics of source tensors, each computed on first request and then cached.

    ``fetch(source, tensor)`` returns a source's stored tensor (read-only).  One
    context lives as long as its sources do (a worker's merger keeps one), so the
    cache is never stale: sources do not change under a worker.  ``factors(source,
    tensor)`` (optional) answers a source's :class:`LoraFactors` for a tensor, or None
    when the source is not a LoRA adapter there; answers are cached too.  Providers
    (:meth:`provide`) answer statistics of their own name, ahead of the registered ones.
    """

    def __init__(self, fetch: Callable[[str, str], torch.Tensor],
                 factors: FactorsFn | None = None):
        self._fetch = fetch
        self._factors_fn = factors
        self._cache: dict[tuple[str, str, str], Any] = {}
        self._factors: dict[tuple[str, str], LoraFactors | None] = {}
        self._providers: dict[str, Provider] = {}

    def provide(self, statistic: str, fn: Provider) -> None:
        """Answer ``statistic`` with ``fn(source, tensor)`` in this context (replacing an
        earlier provider of that name, and forgetting what it answered)."""
        self._providers[statistic] = fn
        self._cache = {k: v for k, v in self._cache.items() if k[0] != statistic}

    def provides(self, statistic: str) -> bool:
        """Whether ``stat(statistic, ...)`` can be answered here."""
        return statistic in self._providers or statistic in _STATISTICS

    def factors(self, source: str, tensor: str) -> LoraFactors | None:
        """The LoRA factors of ``source``'s update to ``tensor`` (None: not a LoRA update,
        or no ``factors`` function was given)."""
        key = (source, tensor)
        if key not in self._factors:
            found = None if self._factors_fn is None else self._factors_fn(source, tensor)
            if found is not None and found.a is not None:  # in the merge's compute dtype
                found = found.to(compute_dtype(found.a.dtype))
            self._factors[key] = found
        return self._factors[key]

    def stat(self, statistic: str, source: str, tensor: str) -> Any:
        """Statistic ``statistic`` of tensor ``tensor`` of model ``source``."""
        key = (statistic, source, tensor)
        if key not in self._cache and statistic in self._providers:
            with torch.no_grad():
                self._cache[key] = self._providers[statistic](source, tensor)
        if key not in self._cache:
            try:
                fn = _STATISTICS[statistic]
            except KeyError:
                known = sorted({*statistics(), *self._providers})
                raise KeyError(f"unknown statistic {statistic!r} (known: "
                               f"{', '.join(known)})") from None
            x = self._fetch(source, tensor)
            with torch.no_grad():
                self._cache[key] = fn(x.to(compute_dtype(x.dtype)))
        return self._cache[key]

    def __len__(self) -> int:
        """How many statistics are cached."""
        return len(self._cache)


@dataclass(frozen=True)
class TensorContext:
    """The context as one merged tensor sees it: where its base and models come from.

    ``base`` and ``models`` are ``(source model, tensor name)`` pairs in the order
    of the merge function's ``base`` and ``models`` arguments (``base`` is None for
    a merge without one).
    """

    context: MergeContext
    name: str  # the output tensor
    base: tuple[str, str] | None
    models: tuple[tuple[str, str], ...]

    def stat(self, statistic: str, which: int | Literal["base"]) -> Any:
        """Statistic of the ``which``-th model's tensor (``"base"``: the base's)."""
        if which == "base":
            if self.base is None:
                raise ValueError(f"{self.name!r} is merged without a base")
            return self.context.stat(statistic, *self.base)
        return self.context.stat(statistic, *self.models[which])

    def provides(self, statistic: str) -> bool:
        """Whether the context can answer ``statistic`` (a registered or provided one)."""
        return self.context.provides(statistic)

    def factors(self, which: int) -> LoraFactors | None:
        """The ``which``-th model's LoRA factors for this tensor (None: not a LoRA update)."""
        return self.context.factors(*self.models[which])
