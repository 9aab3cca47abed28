"""Per-region linear combination: each model entry adds ``weight * x`` over one region.

The merge M2N2's children are made of (:mod:`mergesearch.strategies.m2n2`).  All tensors
of the model are laid end to end in one flattened order; the recipe gives each tensor its
``offset`` in that order (a method-wide setting with one ``{filter, value}`` entry per
tensor).  Each entry of ``models`` then contributes ``weight`` times its model's values on
the global range ``[start, end)``: a region may be a few elements, some tensor rows, whole
tensors or whole layers, all the same to the method.  The same model may appear in several
entries (one per region where its coefficient differs).

An entry whose ``noise`` is a positive integer ``k`` contributes seeded Gaussian noise
instead of its model's values: ``N(0, 1)`` drawn on the CPU from ``(k, tensor seed)``
(the tensor seed derives from the recipe seed and the tensor name), so a mutation is a
few numbers in the recipe and the worker regenerates it, identically everywhere.  Its
model field only has to name one of the recipe's models (it is not read).

With ``normalize`` (the default) each element is divided by the summed weights of the
model entries (noise entries excluded) covering it, so a plain list of models with equal
weights is their average; M2N2 sets it false (SLERP coefficients do not sum to one).

**Lineage entries** (M2N2 from scratch, ``representation: lineage``).  An entry whose
``member`` is a positive integer ``h`` contributes an earlier merge instead of its model:
the member whose recipe had ``key: h``.  A recipe with a ``key`` keeps what it merged in
an in-memory cache (:data:`MEMBER_CACHE_ELEMENTS`, least recently used out), so a child
costs one pass over its few entries however long its lineage.  A member missing from the
cache (a fresh process after a restart, or evicted) is rebuilt from :data:`LINEAGE`: the
entries of every member by key, which the strategy that made them publishes as it asks
for them (and again when it replays its saved state), back to the nearest cached ancestor
or the sources.  The rebuild runs the very additions the first merge ran, in the same
order, so it is bitwise the same.  The first ``anchors`` entries of such a recipe are its
lineage's source models (weight 0), so a rebuild has every source tensor at hand.  Keys are
digests of the whole lineage (a member's entries and its parents' keys): two searches in
one process never mix their members.  What it does not do: a worker in another process
(a Ray actor) does not see the strategy's :data:`LINEAGE`, and a lineage recipe merged
in a process without its study's strategy fails with a clear error.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from mergesearch.merging.base import MergeMethod, Param, register

#: ``end`` when not given: past the end of any model (an exact float64 integer)
EVERYWHERE = float(2**53)


#: noise tensors kept between merges (a child's noise terms recur in its descendants),
#: at most this many elements in all (float32: 4 bytes each)
NOISE_CACHE_ELEMENTS = 2**26
_noise_cache: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()
_noise_cached = 0


def noise(k: int, seed: int, numel: int) -> torch.Tensor:
    """The ``k``-th noise term of a tensor with seed ``seed``: ``numel`` N(0, 1) draws, float32,
    CPU (the same on every machine torch runs on).  Recently drawn terms are cached (least
    recently used out first); treat the result as read-only."""
    global _noise_cached
    key = (int(k), int(seed), int(numel))
    hit = _noise_cache.get(key)
    if hit is not None:
        _noise_cache.move_to_end(key)
        return hit
    gen = torch.Generator().manual_seed((int(k) * 0x9E3779B1 + int(seed)) % 2**63)
    out = torch.randn(numel, generator=gen, dtype=torch.float32)
    if numel <= NOISE_CACHE_ELEMENTS:
        _noise_cache[key] = out
        _noise_cached += numel
        while _noise_cached > NOISE_CACHE_ELEMENTS:
            _, old = _noise_cache.popitem(last=False)
            _noise_cached -= old.numel()
    return out


#: members' merged tensors by (key, tensor offset, numel), least recently used out, at most
#: this many elements in all
MEMBER_CACHE_ELEMENTS = 2**25
_members: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()
_members_cached = 0

#: key -> (number of anchors, entries): each entry ``(kind, ref, weight, start, end)`` with
#: kind 0 (``ref`` the index of an anchor: a source model), 1 (``ref`` a member key) or 2
#: (``ref`` a noise term); published by the strategy that makes the members
LINEAGE: dict[int, tuple[int, tuple[tuple[int, int, float, float, float], ...]]] = {}


class LineageError(RuntimeError):
    """A lineage entry names a member that is neither cached nor published."""


def publish(key: int, anchors: int, entries) -> None:
    """Record how member ``key`` is made (see :data:`LINEAGE`)."""
    LINEAGE[int(key)] = (int(anchors), tuple((int(k), int(r), float(w), float(s), float(e))
                                             for k, r, w, s, e in entries))


def forget(key: int) -> None:
    """Drop a member nobody will merge from (a child that never joined an archive)."""
    LINEAGE.pop(int(key), None)


def _remember(key: tuple[int, int, int], x: torch.Tensor) -> None:
    global _members_cached
    if key in _members:
        _members.move_to_end(key)
        return
    _members[key] = x
    _members_cached += x.numel()
    while _members_cached > MEMBER_CACHE_ELEMENTS and len(_members) > 1:
        _, old = _members.popitem(last=False)
        _members_cached -= old.numel()


def _combine(n: int, parts, ref: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``sum weight * values[lo:hi]`` over ``parts`` = (values(), weight, lo, hi, counts):
    the one code path of first merges and rebuilds (the same additions in the same order)."""
    out = torch.zeros(n, dtype=ref.dtype, device=ref.device)
    cover = torch.zeros(n, dtype=ref.dtype, device=ref.device) if normalize else None
    for values, w, lo, hi, counts in parts:
        out[lo:hi].add_(values()[lo:hi], alpha=w)
        if cover is not None and counts:
            cover[lo:hi] += w
    if cover is not None:
        out = torch.where(cover != 0, out / torch.where(cover != 0, cover, 1), out)
    return out


def _span(s: float, e: float, lo0: int, n: int) -> tuple[int, int]:
    return max(int(s) - lo0, 0), min(int(e) - lo0, n)


def _member_values(key: int, lo0: int, n: int, seed: int, anchors: list[torch.Tensor],
                   ref: torch.Tensor) -> torch.Tensor:
    """Member ``key`` on the tensor at ``[lo0, lo0 + n)``: cached, or rebuilt from
    :data:`LINEAGE` (its missing ancestors first, each kept only while needed)."""
    hit = _members.get((key, lo0, n))
    if hit is not None:
        _members.move_to_end((key, lo0, n))
        return hit
    # the ancestors to build: depth first from key, stopping at cached members
    order, uses, seen, stack = [], {}, set(), [(key, False)]
    while stack:
        k, done = stack.pop()
        if done:
            order.append(k)
            continue
        if k in seen:
            continue
        seen.add(k)
        op = LINEAGE.get(k)
        if op is None:
            raise LineageError(
                f"regions: member {k} is neither cached nor published; a lineage recipe "
                "merges only in the process of the search that made it (its strategy "
                "publishes the lineage, also when it resumes from its study)")
        if op[0] != len(anchors):
            raise LineageError(f"regions: member {k} was made over {op[0]} source models, "
                               f"this recipe anchors {len(anchors)}")
        stack.append((k, True))
        for kind, r, *_ in op[1]:
            if kind == 1:
                uses[r] = uses.get(r, 0) + 1
                if (r, lo0, n) not in _members and r not in seen:
                    stack.append((r, False))
    built: dict[int, torch.Tensor] = {}
    for k in order:
        parts = []
        for kind, r, w, s, e in LINEAGE[k][1]:
            lo, hi = _span(s, e, lo0, n)
            if lo >= hi or w == 0:
                continue
            parts.append((_source(kind, r, lo0, n, seed, anchors, ref, built), w, lo, hi,
                          kind != 2))
        built[k] = _combine(n, parts, ref, False)
        _remember((k, lo0, n), built[k])
        for kind, r, *_ in LINEAGE[k][1]:  # parents no longer needed here
            if kind == 1 and r in built:
                uses[r] -= 1
                if uses[r] == 0:
                    del built[r]
    return built[key]


def _source(kind: int, r: int, lo0: int, n: int, seed: int, anchors: list[torch.Tensor],
            ref: torch.Tensor, built: dict[int, torch.Tensor] | None = None):
    """A callable giving an entry's values (flat) on the tensor."""
    if kind == 0:
        return lambda: anchors[r].reshape(-1)
    if kind == 2:
        return lambda: noise(r, seed, n).to(ref.device, ref.dtype)
    if built is not None and r in built:
        x = built[r]
        return lambda: x
    return lambda: _member_values(r, lo0, n, seed, anchors, ref)


def regions(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    start: Sequence[float],
    end: Sequence[float],
    noise_term: Sequence[float],
    member: Sequence[float] | None = None,
    offset: float,
    normalize: bool = True,
    key: float = 0.0,
    anchors: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """``sum_i weight_i * x_i`` over each entry's ``[start_i, end_i)`` of the global order, the
    tensor occupying ``[offset, offset + numel)``."""
    ref = models[0]
    n = ref.numel()
    lo0 = int(offset)
    member = member if member is not None else [0.0] * len(models)
    heads = [x for x in models[:int(anchors)]]
    parts = []
    drawn: dict[int, torch.Tensor] = {}
    for x, w, s, e, k, m in zip(models, weight, start, end, noise_term, member, strict=True):
        lo, hi = _span(s, e, lo0, n)
        if lo >= hi or w == 0:
            continue
        k, m = int(k), int(m)
        if k > 0:
            if k not in drawn:
                drawn[k] = noise(k, seed, n).to(ref.device, ref.dtype)
            parts.append(((lambda v=drawn[k]: v), w, lo, hi, False))
        elif m > 0:
            parts.append((_source(1, m, lo0, n, seed, heads, ref), w, lo, hi, True))
        else:
            parts.append(((lambda v=x: v.reshape(-1)), w, lo, hi, True))
    out = _combine(n, parts, ref, normalize)
    if int(key) > 0:
        _remember((int(key), lo0, n), out.clone())
    return out.reshape(ref.shape)


REGIONS = register(
    MergeMethod(
        name="regions",
        fn=regions,
        params=(
            Param("weight", 1.0, per_model=True, doc="coefficient of this entry"),
            Param("start", 0.0, per_model=True, low=0.0,
                  doc="first global flattened index of the entry's region"),
            Param("end", EVERYWHERE, per_model=True, low=0.0,
                  doc="one past the last global flattened index of the region"),
            Param("noise_term", 0.0, per_model=True, low=0.0,
                  doc="0: the model's values; k > 0: seeded N(0, 1) noise term k instead"),
            Param("member", 0.0, per_model=True, low=0.0,
                  doc="0: the model's values; h > 0: the earlier merge whose recipe had key h"),
            Param("key", 0.0, low=0.0,
                  doc="> 0: keep what this recipe merges, for entries with member: key"),
            Param("anchors", 0.0, low=0.0,
                  doc="the first this many entries are the lineage's source models"),
            Param("offset", low=0.0,
                  doc="where the tensor starts in the global flattened order (per tensor, "
                      "by filter; a scalar 0 puts every tensor at 0: per-tensor ranges)"),
            Param("normalize", True, kind=bool,
                  doc="divide each element by the summed weights of the model entries "
                      "covering it"),
        ),
        needs_base=False,
        stochastic=True,
        mergekit=False,
        doc="per-region linear combination of models and seeded noise terms (M2N2 children)",
    )
)
