"""Task-vector merges: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA.

All share one shape: sparsify each task vector ``tau_i = theta_i - theta_base``,
weight it, optionally keep only entries that agree with an elected sign
(TIES consensus), sum, optionally normalise by the summed weights, scale by
``lambda`` and add to the base.  Defaults follow mergekit 0.1.5 so recipes mean
the same in both tools.

Speed: magnitude cut-offs are found first (:mod:`.sparsify`: exact, by counting in one
compiled pass over every model and the base, nothing sorted but a sample); then one
elementwise *core* does everything else.  On large tensors the core runs
through ``torch.compile``, which fuses it into one pass over memory instead of
a dozen (see benchmarks/RESULTS.md); on the CPU it writes into recycled buffers
(:class:`OutputBuffers`), so no fresh memory is faulted in per merged tensor, or straight
into the destination the caller names (``out=``: the resident model's parameter, so the
merge is the only write); the same pass counts the NaN and inf results, so the merger's
finiteness check (:func:`~mergesearch.merging.base.all_finite`) reads nothing again.
DARE's and DELLA's random masks come from a counter-based hash of (seed, entry index)
(:func:`.sparsify.uniform_bits`), so they are the same eager or compiled, on any device;
the core hashes in int32 arithmetic (:func:`.sparsify.signed_bits`: the same bits, twice
the vector lanes of int64).  The linear merge is one compiled pass as well
(:func:`weighted_sum`), built from fused multiply-adds so that it rounds exactly as the
in-place adds (and mergekit) do.  On the CPU DARE's bits can also be computed once per
(tensor seed, model, size) and kept (:class:`MaskBits`, up to a memory budget): a search
over densities and weights with a fixed seed re-merges the same tensors thousands of
times, and only the cut-off changes.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from functools import partial

import torch

from mergesearch.merging import sparsify
from mergesearch.merging.base import (
    MergeMethod,
    Param,
    compile_enabled,
    note_nonfinite,
    register,
)
from mergesearch.merging.sparsify import as_int32, signed_bits

log = logging.getLogger(__name__)

_OFFSET = 1 << 31  # cached bits are stored as int32: the 32-bit hash minus 2**31

FUSE_MIN_NUMEL = 1 << 12
"""Tensors at least this large go through the compiled core (smaller: eager)."""

def _core(
    base: torch.Tensor,
    inputs: list[torch.Tensor],
    weight: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    keep_below: torch.Tensor,
    scale: torch.Tensor,
    seeds: torch.Tensor,
    lambda_: torch.Tensor,
    mode: str,
    consensus: bool,
    normalize: bool,
    bits: list[torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    check: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparsify, weight, elect, sum, normalise, scale and add: elementwise only.

    ``mode``: ``"none"`` (inputs are models), ``"band"`` (keep lo <= |tau| <= hi),
    ``"random"`` (keep where model ``i``'s hash minus 2**31, as int32
    (:func:`.sparsify.signed_bits` under the int32 key ``seeds[i]``), is at most
    ``keep_below[i]``, times ``scale``), ``"bits"`` (the same with those int32 bits
    precomputed, ``bits[i]``),
    ``"deltas"`` (inputs are already sparsified task vectors).  ``out``: written with the
    result and returned (compiled, the one pass stores straight into it).  ``check``: also
    return the number of non-finite results (:func:`_finish`).
    """
    index = None
    if mode == "random":  # entry indices modulo 2**32, as int32 (the hash reads 32 bits)
        index = torch.arange(base.numel(), device=base.device).to(torch.int32).view(base.shape)
    deltas = []
    for i, x in enumerate(inputs):
        d = x if mode == "deltas" else x - base
        if mode == "band":
            a = d.abs()
            d = torch.where((a >= lo[i]) & (a <= hi[i]), d, 0.0)
        elif mode == "random":
            d = torch.where(signed_bits(index, seeds[i]) <= keep_below[i], d * scale[i], 0.0)
        elif mode == "bits":
            d = torch.where(bits[i] <= keep_below[i], d * scale[i], 0.0)
        deltas.append(d * weight[i])
    total = deltas[0]
    for d in deltas[1:]:
        total = total + d
    if consensus:
        positive = total >= 0
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for i, d in enumerate(deltas):
            agree = torch.where(positive, d > 0, d < 0)
            mixed = mixed + torch.where(agree, d, 0.0)
            divisor = divisor + torch.where(agree, weight[i], 0.0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = total
        divisor = weight.sum()
        divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return _finish(base + mixed * lambda_, out, check)


def _finish(merged: torch.Tensor, out: torch.Tensor | None, check: bool
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``merged`` (copied into ``out`` when given), with its count of NaN and inf entries
    when ``check``: compiled, a reduction in the same pass as the store, so the merger's
    finiteness check (:func:`~mergesearch.merging.base.all_finite`) reads nothing again."""
    result = merged if out is None else out.copy_(merged)
    if not check:
        return result
    return result, torch.where(torch.isfinite(merged), 0.0, 1.0).sum()


_compiled = None


def _compiled_core():
    """``torch.compile`` of the core, or None when compiling is off or fails."""
    global _compiled
    if _compiled is None:
        if not compile_enabled():
            _compiled = False
        else:
            import torch._dynamo

            # one graph per (number of models, mode, consensus, normalize)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                        64)
            _compiled = torch.compile(_core, dynamic=True)
    return _compiled or None


def run_core(base: torch.Tensor, inputs: list[torch.Tensor], out: torch.Tensor | None = None,
             **kwargs) -> torch.Tensor:
    """The core, compiled for large tensors; eager on small ones or if compiling fails.

    Compiled, the result goes into ``out`` when given (see :class:`MergeMethod`'s
    ``writes_out``), else on the CPU into a recycled buffer (:class:`OutputBuffers`) when
    one is free: no fresh memory to fault in per merged tensor.  The compiled pass also
    counts the non-finite results (:func:`~mergesearch.merging.base.note_nonfinite`).
    """
    global _compiled
    if base.numel() >= FUSE_MIN_NUMEL and (fn := _compiled_core()) is not None:
        try:
            into = out if out is not None else output_buffers().take(base)
            return note_nonfinite(*fn(base, inputs, out=into, check=True, **kwargs))
        except Exception as err:  # no C++ compiler, unsupported backend, ...
            log.warning("torch.compile failed (%s); merging eagerly from now on", err)
            _compiled = False
    return _core(base, inputs, **kwargs)


def eager_weighted_sum(models: Sequence[torch.Tensor], weight: Sequence[float],
                       normalize: bool) -> torch.Tensor:
    """``sum_i w_i theta_i`` by in-place adds (divided by ``sum_i w_i`` when ``normalize``,
    unguarded, as mergekit does).

    ``add_(x, alpha=w)`` rounds once per model (a fused multiply-add on the CPU and on
    CUDA), which is what mergekit's ``addcmul_`` gives: bit for bit its linear merge.
    """
    out = torch.zeros_like(models[0])
    for tensor, w in zip(models, weight, strict=True):
        out.add_(tensor, alpha=w)
    if normalize:
        out.div_(sum(weight))
    return out


def _fused_sum(models: list[torch.Tensor], weight: torch.Tensor, divisor: torch.Tensor,
               out: torch.Tensor | None = None, check: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`eager_weighted_sum` as one pass, for ``torch.compile`` only.

    Each step is inductor's fused multiply-add (``prims.fma``: one rounding), so the
    compiled pass rounds exactly as the in-place adds do.  A plain ``total + x * w``
    rounds the product first and differs in the last bit of about a quarter of the
    entries.  (Eager, ``prims.fma`` is not fused: never call this uncompiled.)
    """
    fma = torch.ops.prims.fma
    total = fma(models[0], weight[0], torch.zeros((), dtype=models[0].dtype,
                                                  device=models[0].device))
    for i in range(1, len(models)):
        total = fma(models[i], weight[i], total)
    return _finish(total / divisor, out, check)


_compiled_sum = None


def weighted_sum(models: Sequence[torch.Tensor], weight: Sequence[float],
                 normalize: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """The linear merge ``sum_i w_i theta_i`` (divided by ``sum_i w_i`` when ``normalize``),
    bit for bit :func:`eager_weighted_sum`; on large tensors one compiled pass into ``out``
    or a recycled buffer, counting non-finite results, like the core."""
    global _compiled_sum
    first = models[0]
    # half types would be summed in float32 when compiled: they keep the in-place adds
    if (first.numel() >= FUSE_MIN_NUMEL and first.dtype in (torch.float32, torch.float64)
            and _compiled_sum is not False):
        try:
            if _compiled_sum is None:
                _compiled_sum = False
                if compile_enabled():
                    importlib.import_module("torch._inductor.inductor_prims")  # prims.fma
                    _compiled_sum = torch.compile(_fused_sum, dynamic=True)
            if _compiled_sum:
                w = torch.tensor(list(weight), dtype=first.dtype, device=first.device)
                divisor = torch.tensor(float(sum(weight)) if normalize else 1.0,
                                       dtype=first.dtype, device=first.device)
                into = out if out is not None else output_buffers().take(first)
                return note_nonfinite(*_compiled_sum(list(models), w, divisor, out=into,
                                                     check=True))
        except Exception as err:  # no C++ compiler, unsupported backend, ...
            log.warning("torch.compile failed (%s); summing eagerly from now on", err)
            _compiled_sum = False
    return eager_weighted_sum(models, weight, normalize)


def _use_count(t: torch.Tensor) -> int | None:
    """How many tensors hold ``t``'s memory (None where torch cannot say)."""
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):
        return None


class OutputBuffers:
    """Buffers for merged tensors, reused across merges on the CPU, up to a budget.

    On the CPU every fresh large allocation is fresh memory the kernel must fault in
    (on a VM about as slow as the merge itself), while a merge stream hands each merged
    tensor to a sink that copies it and drops it.  So merged tensors are views of kept
    buffers, at most :data:`per_size` per (size, dtype): a buffer is handed out again only
    when nothing else holds its memory any more (torch's count of the tensors on its
    storage is back to the buffer's own), so a result the caller keeps is never
    overwritten, and a caller keeping many just gets fresh tensors.  The budget is
    ``MERGESEARCH_OUTPUT_CACHE_MB`` (default 512; 0 turns reuse off).  Not used on
    accelerators, whose allocators already reuse memory (and run asynchronously).
    """

    per_size = 2  # a stream's consumer holds the previous tensor while the next is merged

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self._bufs: dict[tuple[int, torch.dtype], list[tuple[torch.Tensor, int]]] = {}

    def take(self, like: torch.Tensor) -> torch.Tensor | None:
        """A free buffer shaped as ``like`` (its dtype, on the CPU), or None."""
        if like.device.type != "cpu" or not self.budget:
            return None
        key = (like.numel(), like.dtype)
        kept = self._bufs.setdefault(key, [])
        for buf, free in kept:
            if _use_count(buf) == free:
                return buf.view(like.shape)
        nbytes = like.numel() * like.element_size()
        if len(kept) >= self.per_size or self.used + nbytes > self.budget:
            return None
        buf = torch.empty(like.numel(), dtype=like.dtype)
        free = _use_count(buf)
        if free is None:  # cannot tell when it is free again: never reuse
            self.budget = 0
            return None
        kept.append((buf, free))
        self.used += nbytes
        return buf.view(like.shape)


_output_buffers: OutputBuffers | None = None


def output_buffers() -> OutputBuffers:
    global _output_buffers
    if _output_buffers is None:
        import os

        mb = float(os.environ.get("MERGESEARCH_OUTPUT_CACHE_MB", "512"))
        _output_buffers = OutputBuffers(int(mb * (1 << 20)))
    return _output_buffers


class MaskBits:
    """DARE's hash bits per (tensor seed key, size), computed once and kept, up to a budget.

    Filled first come, first kept, never evicted: a model larger than the budget keeps its
    first tensors' bits and hashes the rest on every merge, at no extra cost.  The budget is
    ``MERGESEARCH_MASK_CACHE_MB`` (default 256; 0 turns the cache off).  CPU only: on an
    accelerator the hash is cheaper than the memory it would read.
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self._bits: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, key: int, numel: int) -> torch.Tensor | None:
        """The int32 bits (hash minus 2**31) of ``numel`` entries under ``key``, or None
        when they are not kept and would not fit."""
        bits = self._bits.get((key, numel))
        if bits is None and self.used + 4 * numel <= self.budget:
            bits = signed_bits(torch.arange(numel).to(torch.int32), as_int32(key))
            self._bits[(key, numel)] = bits
            self.used += 4 * numel
        return bits


_mask_bits: MaskBits | None = None


def mask_bits() -> MaskBits:
    global _mask_bits
    if _mask_bits is None:
        import os

        mb = float(os.environ.get("MERGESEARCH_MASK_CACHE_MB", "256"))
        _mask_bits = MaskBits(int(mb * (1 << 20)))
    return _mask_bits


def _cached_bits(base: torch.Tensor, seeds: list[int]) -> list[torch.Tensor] | None:
    """Every model's kept bits for this tensor (CPU only), or None to hash in the core."""
    if base.device.type != "cpu" or not mask_bits().budget:
        return None
    out = [mask_bits().get(key, base.numel()) for key in seeds]
    return None if any(b is None for b in out) else [b.view(base.shape) for b in out]


def _merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    sparsifier: str | None,
    consensus: bool,
    weight: Sequence[float],
    normalize: bool,
    lambda_: float = 1.0,
    density: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    rescale: bool = False,
    seed: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    n = len(models)
    lo, hi = [0.0] * n, [math.inf] * n
    keep_below, scale, seeds = [1 << 32] * n, [1.0] * n, [0] * n
    mode, inputs = "none", list(models)
    if sparsifier in ("magnitude", "outliers"):
        mode = "band"
        if sparsifier == "magnitude":  # cut-offs of |model - base|, never written out
            bands = sparsify.magnitude_bands(list(models), density, base)
            lo, hi = [band[0] for band in bands], [band[1] for band in bands]
        else:
            for i, model in enumerate(models):
                lo[i], hi[i] = sparsify.outlier_band(model, density[i], gamma[i], base)
    elif sparsifier == "random":
        mode = "random"
        for i in range(n):
            keep_below[i] = min(1 << 32, max(0, math.ceil(density[i] * (1 << 32))))
            scale[i] = 1.0 / density[i] if rescale and 0 < density[i] < 1 else 1.0
            seeds[i] = sparsify.model_key(seed, i)
        bits = _cached_bits(base, seeds)
        if bits is not None:
            mode = "bits"
        for i, k in enumerate(keep_below):  # hash < k  <=>  hash - 2**31 <= k - 1 - 2**31
            if k == 0:  # nothing kept: a zero task vector drops out the same way
                inputs[i] = base
            keep_below[i] = max(k - 1, 0) - _OFFSET
            seeds[i] = as_int32(seeds[i])
    elif sparsifier == "magprune":
        mode = "deltas"
        inputs = [sparsify.magprune(m - base, density[i], epsilon[i],
                                    sparsify.model_key(seed, i), rescale)
                  for i, m in enumerate(models)]

    def vec(values: Sequence[float], dtype: torch.dtype = base.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=base.device)

    small = torch.int32 if mode in ("random", "bits") else torch.int64
    return run_core(
        base, inputs, weight=vec(weight), lo=vec(lo), hi=vec(hi),
        keep_below=vec(keep_below, small), scale=vec(scale), seeds=vec(seeds, small),
        lambda_=vec(lambda_), mode=mode, consensus=consensus, normalize=normalize, out=out,
        **({"bits": bits} if mode == "bits" else {}))


def _params(normalize: bool, *extra: Param) -> tuple[Param, ...]:
    return (
        Param("weight", per_model=True, doc="scale of this model's task vector"),
        Param("normalize", normalize, kind=bool, doc="divide by the sum of (agreeing) weights"),
        Param("lambda", 1.0, doc="scale of the merged task vector"),
        *extra,
    )


DENSITY = Param("density", 1.0, per_model=True, low=0.0, high=1.0,
                doc="fraction of the task vector kept")
RESCALE = Param("rescale", True, kind=bool, doc="divide survivors by their keep probability")
GAMMA = Param("gamma", 0.01, per_model=True, low=0.0, high=1.0,
              doc="fraction of largest-magnitude entries dropped")
EPSILON = Param("epsilon", 0.15, per_model=True, low=0.0, high=1.0,
                doc="spread of keep probabilities around density")


def _check_della(values: dict[str, list], where: str) -> None:
    """DELLA keep probabilities span density +/- epsilon and must stay inside (0, 1)."""
    eps = max(values["epsilon"])
    for density in values["density"]:
        if density < 1 and not (0 < density - eps and density + eps < 1):
            raise ValueError(
                f"{where}: della needs 0 < density - epsilon and density + epsilon < 1 "
                f"(density {density:g}, epsilon {eps:g}); lower epsilon or move density"
            )


def _method(name: str, doc: str, sparsifier: str | None, consensus: bool,
            params: tuple[Param, ...]) -> MergeMethod:
    return register(
        MergeMethod(
            name=name,
            fn=partial(_merge, sparsifier=sparsifier, consensus=consensus),
            params=params,
            task_vectors=True,
            stochastic=sparsifier in ("random", "magprune"),
            check=_check_della if sparsifier == "magprune" else None,
            writes_out=True,
            doc=doc,
        )
    )


TASK_ARITHMETIC = _method("task_arithmetic", "base + lambda * sum_i w_i tau_i",
                          None, False, _params(False))
TIES = _method("ties", "trim to top-density by magnitude, elect signs, disjoint merge",
               "magnitude", True, _params(True, DENSITY))
DARE_TIES = _method("dare_ties", "random drop (DARE) then TIES sign consensus",
                    "random", True, _params(False, DENSITY, RESCALE))
DARE_LINEAR = _method("dare_linear", "random drop (DARE) then a weighted sum",
                      "random", False, _params(False, DENSITY, RESCALE))
BREADCRUMBS = _method("breadcrumbs", "drop the largest gamma and the smallest entries",
                      "outliers", False, _params(False, DENSITY, GAMMA))
BREADCRUMBS_TIES = _method("breadcrumbs_ties", "breadcrumbs then TIES sign consensus",
                           "outliers", True, _params(False, DENSITY, GAMMA))
DELLA = _method("della", "magnitude-ranked random drop (DELLA) then TIES sign consensus",
                "magprune", True, _params(True, DENSITY, EPSILON, RESCALE))
DELLA_LINEAR = _method("della_linear", "magnitude-ranked random drop then a weighted sum",
                       "magprune", False, _params(False, DENSITY, EPSILON, RESCALE))
