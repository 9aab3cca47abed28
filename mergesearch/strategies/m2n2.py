"""M2N2 (Sakana 2025, "Competition and Attraction Improve Model Fusion"): a steady-state
archive of models, resource competition over per-item scores, attraction-based mate
selection and split-point crossover with one global SLERP angle.

Faithful to the paper (shared/ALGORITHMS.md "M2N2"), the defaults:

- steady state, one child per ask slot; an archive of ``archive`` = 20 members with their
  per-item correctness ``s_ij`` on the search items (the strategy sets ``uses_items``, so
  the replay log keeps every result's correctness and item ids: a resumed search rebuilds
  the archive and its scores exactly);
- resource competition: ``z_j = sum_k s_kj``, fitness ``f_i = sum_j s_ij / z_j^alpha``
  (alpha 1, ``z^alpha`` read as 1 where ``z_j`` is 0); a told child joins the archive and,
  once it holds more than ``archive`` members, the lowest fitness (computed with the child
  counted) leaves, which may be the child;
- parent A with probability proportional to ``f``; parent B proportional to the attraction
  ``g(A, B) = sum_j max(0, s~_Bj - s~_Aj)``, ``s~_ij = s_ij / z_j^alpha``;
- split-point crossover: a split index ``k`` uniform over the flattened parameters and
  ``w ~ U(0, 1)``; interpolation ``t = w`` before ``k`` and ``1 - w`` after; SLERP with one
  global angle ``Omega = arccos(<A, B> / (|A| |B|))``, linear where ``sin Omega <= 1e-6``;
- mutation N(0, ``mutation_std``^2) per parameter on every child, off by default (the
  paper mutates only when evolving from scratch, with 0.01).

Ablations: ``attraction: false`` picks B like A (proportional to fitness, B != A);
``split: false`` interpolates with ``t = w`` everywhere.

**Children without their weights.**  A member is a per-region linear combination of
*terms*: the source models and seeded noise terms.  Regions are ranges of units of the
``granularity`` (``flattened``: blocks of ``block`` parameters, 1 = the paper's;
``rows`` of each tensor, a 0-d/1-d tensor one unit; whole ``tensors``; ``layers``), laid
end to end in the models' tensor order.  A split falls on a unit boundary (a flattened
index drawn uniformly, snapped to the nearest boundary), so a child of two such members is
again one, over the union of its parents' region boundaries and ``k``.  Its recipe
(merge method ``regions``, :mod:`mergesearch.merging.regions`) lists one entry per term
and run of regions with the same coefficient: self-contained, exportable, merged by any
worker from the sources alone.

The angle needs ``<A, B>``, ``|A|``, ``|B|``: sums over regions of coefficient products
times the inner products of the terms on each region.  One probe
(``mergesearch.strategies.m2n2:region_gram``, asked first, recorded like any probe and
kept in the replay log) returns the sources' Gram matrix on every unit; prefix sums of it
(cached in the strategy) give any region's Gram in O(1).  Noise terms enter the angle by
their expected inner products (``n`` on the diagonal for ``n`` parameters, 0 against each
other and the sources): our choice, exact in expectation, so no probe per child.

**Mutation** adds a noise term to the child: ``noise_term = k`` (the child's own id + 1)
with weight ``mutation_std``, regenerated on the worker from ``(k, tensor seed)``.  What it
costs as the lineage grows: every descendant carries each ancestor's noise term with the
product of the interpolation coefficients along its lineage, so a recipe holds one entry
per (live noise ancestor, run of regions) and the worker draws each live term once per
tensor per merge.  ``prune`` bounds it: coefficients whose magnitude falls below it (as a
share of the largest source coefficient's scale, 1) are set to 0 in the child, and
``max_noise_terms`` keeps only the noise terms of largest energy (``sum c^2 n``) when
set.  Both are exact in the sense that matters: the child *is* its pruned recipe (what
is scored, stored and exported); they trade a little of the inherited noise for bounded
recipes.  Without mutation (merging pretrained models) a recipe has at most
``regions x sources`` entries and grows by at most one region per generation.

**Lineage children** (``representation: lineage``, what evolving from scratch needs).
From scratch every child adds noise, so a child is the sum of all its ancestors'
mutations: a ``terms`` recipe grows with the lineage, and pruning or capping it throws
inherited mutations away.  A lineage child's recipe instead names its two parents (by
*key*, a digest of the parent's own entries, so of its whole lineage) with their SLERP
factors on each side of the split, plus its own noise term: a few entries after the
``anchors`` (the source models, weight 0), exact however many generations back.  The
worker keeps what it merges in an in-memory cache by key (:mod:`mergesearch.merging.
regions`); the strategy publishes every child's entries as it asks for it (and again when
it replays its saved state), so a member missing from the cache (a fresh process after a
restart) is rebuilt from its lineage, bitwise the same: a resumed search is exact.  The
angle needs no probe per child: the strategy keeps each live member's inner products with
every other on every unit (the sources' from the region probe), carried forward by
bilinearity, a noise term counted by its expectation (``std^2`` per parameter on itself,
0 against the rest; within ~1% of the true angle on digits).  Limits: the cache lives in
the worker's process and the published lineage in the strategy's, so a lineage search
runs on the local executor; the cache holds archive-many models (trivial for the digits
MLP, 20 full models of an LLM is not: there ``terms`` with pruning, or mutation off, is
the practical choice; docs/m2n2.md).

Our choices besides: the initial archive is every source model alone (``use_base``
adds the space's base model), scored first, the probe beside them; until the archive is
full every told child joins.  Several children may be in flight (one per ask slot); each
is drawn from the archive as it is when asked.  Failed children never join.  Per-item
scores are the concatenated correctness of every task (sorted by task name).

**A generic problem** (no ``decode``: no models, e.g. the conformance problems) runs the
same loop over genomes: the first member is the start point, the next ``archive - 1``
uniform in the bounds; each objective is one "item" whose score is the member's quality
``(L_max - L) / (L_max - L_min)`` in the archive (scalarised loss ``L``); crossover
interpolates linearly (genomes have no angle worth taking) with the split over the
dimensions, then adds N(0, (``genome_mutation`` x range)^2) and clips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from mergesearch.strategies.base import Proposal, Strategy, StrategyError, StrategyOptions, register
from mergesearch.trial import Candidate, Result

PROBE = "mergesearch.strategies.m2n2:region_gram"
Granularity = Literal["flattened", "rows", "tensors", "layers"]


class M2N2Options(StrategyOptions):
    archive: int = Field(20, ge=2)
    """Archive size P (the paper: 20)."""
    alpha: float = Field(1.0, ge=0)
    """Resource-competition exponent (the paper: 1)."""
    attraction: bool = True
    """Pick parent B by attraction to A; false: proportional to fitness (ablation)."""
    split: bool = True
    """Split-point crossover; false: one interpolation t = w everywhere (ablation)."""
    granularity: Granularity = "flattened"
    """Where split points may fall: blocks of ``block`` parameters, rows, tensors, layers."""
    block: int = Field(1, ge=1)
    """Parameters per unit with ``granularity: flattened`` (1 = any parameter)."""
    mutation_std: float = Field(0.0, ge=0)
    """Std of the Gaussian noise added to every parameter of a child (0.01 from scratch)."""
    prune: float = Field(1e-4, ge=0)
    """Coefficients below this magnitude are dropped from a child's recipe."""
    max_noise_terms: int | None = Field(None, ge=1)
    """Keep at most this many noise terms per child (largest energy first); None: all."""
    representation: Literal["terms", "lineage"] = "terms"
    """How a child's recipe says what it is: ``terms``, per-region coefficients of the
    sources and noise terms (self-contained, bounded by ``prune``/``max_noise_terms``);
    ``lineage``, its two parents (by key) plus its split, SLERP factors and noise term,
    exact and a few entries long, merged from the worker's cache of earlier members."""
    use_base: bool = False
    """Put the space's base model in the initial archive too."""
    genome_mutation: float = Field(0.05, ge=0)
    """Generic problems: mutation std as a share of each dimension's range."""


# -- units and the probe ------------------------------------------------------------------

def layout_offsets(tensors: list[list[Any]]) -> list[int]:
    """Global flattened offset of each ``[name, shape, layer]`` of a layout."""
    out, at = [], 0
    for _, shape, _ in tensors:
        out.append(at)
        at += math.prod(shape)
    return out + [at]


def units(tensors: list[list[Any]], granularity: str, block: int = 1) -> np.ndarray:
    """Unit boundaries in the global flattened order (int64, first 0, last the total)."""
    offsets = layout_offsets(tensors)
    cuts: list[int] = [0]
    previous_layer: Any = object()
    for (_, shape, layer), off, end in zip(tensors, offsets, offsets[1:], strict=False):
        n = end - off
        if granularity == "flattened":
            cuts += list(range(off + block, end, block)) + [end]
        elif granularity == "rows":
            step = math.prod(shape[1:]) if len(shape) >= 2 else n
            cuts += list(range(off + step, end, step)) + [end] if n else []
        elif granularity == "tensors":
            cuts.append(end)
        elif granularity == "layers":
            if layer == previous_layer and len(cuts) > 1:
                cuts[-1] = end  # same layer: widen its unit
            else:
                cuts.append(end)
            previous_layer = layer
        else:
            raise StrategyError(f"unknown granularity {granularity!r} (flattened, rows, "
                                "tensors, layers)")
    out = np.unique(np.asarray(cuts, dtype=np.int64))
    return out


def region_gram(worker: Any, model: Any, candidate: Candidate) -> dict[str, Any]:
    """The probe: the tensor layout of the candidate's models and, on every unit of the
    requested granularity, the Gram matrix of the recipe's models (upper triangle, row
    by row).  Called as ``probe(worker, model, candidate)``; reads source tensors through
    the worker's pool, never returns weights."""
    import torch

    meta = candidate.meta
    recipe = candidate.recipe
    merger = worker.merger
    plan = merger.plan(recipe)
    names = list(plan.sources)
    from mergesearch.merging.layers import layer_index

    tensors = []
    for name in names:
        x = merger.pool.fetch(plan.sources[name][0].model, plan.sources[name][0].name)
        tensors.append([name, list(x.shape), layer_index(name)])
    bounds = units(tensors, meta["granularity"], int(meta.get("block", 1)))
    offsets = layout_offsets(tensors)
    s = len(recipe.models)
    iu = np.triu_indices(s)
    gram = np.zeros((len(bounds) - 1, s, s))
    with torch.no_grad():
        for name, off, end in zip(names, offsets, offsets[1:], strict=False):
            if end == off:
                continue
            x = torch.stack([merger.pool.fetch(src.model, src.name).reshape(-1).double()
                             for src in plan.sources[name]]).cpu()
            lo = int(np.searchsorted(bounds, off, side="right")) - 1
            hi = int(np.searchsorted(bounds, end, side="left"))
            cuts = np.clip(bounds[lo:hi + 1], off, end) - off
            sizes = np.diff(cuts)
            if len(sizes) and (sizes == sizes[0]).all() and cuts[0] == 0:
                g = torch.einsum("pml,qml->mpq", x.reshape(s, len(sizes), int(sizes[0])),
                                 x.reshape(s, len(sizes), int(sizes[0])))
                gram[lo:lo + len(sizes)] += g.numpy()
            else:
                for u, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
                    piece = x[:, a:b]
                    gram[lo + u] += (piece @ piece.T).numpy()
    return {"tensors": tensors, "models": [m.model for m in recipe.models],
            "granularity": meta["granularity"], "block": int(meta.get("block", 1)),
            "gram": gram[:, iu[0], iu[1]].tolist()}


# -- members ------------------------------------------------------------------------------

@dataclass
class Member:
    """An archive member: its candidate id, per-item scores, scalar loss and what it is:
    a genome, or region boundaries (unit indices) with each term's coefficient per region
    (terms: ``m<i>`` the i-th source model, ``n<k>`` noise term k)."""

    id: int
    scores: np.ndarray | None = None
    loss: float = math.inf
    genome: np.ndarray | None = None
    bounds: np.ndarray | None = None
    coef: dict[str, np.ndarray] = field(default_factory=dict)
    source: int | None = None  # an initial member: the index of its source model
    key: int = 0  # a lineage child: its key (the ``regions`` recipe's ``key``)
    recipe: dict[str, Any] | None = None  # a lineage child: its recipe


@register
class M2N2(Strategy):
    """Steady-state archive, resource competition, attraction, split-point SLERP crossover."""

    name = "m2n2"
    description = ("M2N2: archive with resource competition, attraction mate selection and "
                   "split-point global-SLERP crossover (single objective)")
    multi_objective = False
    uses_items = True
    kinds = frozenset({"real"})
    Options = M2N2Options
    options: M2N2Options

    # -- setup --------------------------------------------------------------------------

    def _setup(self) -> None:
        self._rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**63, 2025]))
        self.archive: list[Member] = []
        self._pending_members: dict[int, Member] = {}
        self._initial: list[Any] = []  # initial members still to ask
        self.history: list[list[int]] = []  # archive ids after each told child
        self._gram = None  # prefix sums of the unit Grams, [U + 1, S, S]
        self._elems = None  # prefix element counts per unit, [U + 1]
        self._layout = None
        self._probe_id: int | None = None
        self._n_terms = 0
        self._unit_gram = None  # the sources' Gram on every unit, [U, S, S]
        self._rows: dict[int, dict[int, np.ndarray]] = {}  # lineage: member Grams by unit
        p = self.problem
        if p.decode is None:
            self._mode = "genome"
            low, high = p.low, p.high
            self._initial = [p.x0] + [self._rng.uniform(low, high)
                                      for _ in range(self.options.archive - 1)]
            return
        self._mode = "recipe"
        # the merge method of the children (imported here, not with the module: listing
        # strategies must not pay for torch; merging/__init__ registers it too)
        import mergesearch.merging.regions  # noqa: F401

        template = p.decode(p.x0)
        models = [m.model for m in template.models]
        if self.options.use_base and template.base:
            models = [template.base, *models]
        models = list(dict.fromkeys(models))
        if len(models) < 2:
            raise StrategyError("m2n2 needs at least two models to merge; the space names "
                                f"{len(models)}")
        self._models = models
        self._template = {"dtype": template.dtype,
                          **({"tokenizer_source": template.tokenizer_source}
                             if template.tokenizer_source else {}),
                          **({"vocab": template.vocab} if template.vocab != "strict" else {})}
        self._initial = [f"m{i}" for i in range(len(models))]

    # -- ask ----------------------------------------------------------------------------

    def _ask(self, n: int) -> list[Proposal]:
        out: list[Proposal] = []
        for k in range(n):
            cid = self._next_id + k
            if self._mode == "recipe" and self._gram is None and self._probe_id is None:
                self._probe_id = cid
                out.append(self._probe_proposal())
                continue
            if self._initial:
                out.append(self._initial_proposal(cid, self._initial.pop(0)))
                continue
            if len(self.archive) < 2 or (self._mode == "recipe" and self._gram is None):
                if self._pending_members or (self._gram is None and self._mode == "recipe"):
                    break  # wait for scores (or the probe)
                self._initial = self._refill()  # every initial member failed: again
                out.append(self._initial_proposal(cid, self._initial.pop(0)))
                continue
            out.append(self._child(cid))
        return out

    def _refill(self) -> list[Any]:
        """Initial members again, after all of them failed: fresh random genomes, or the
        source models not in the archive."""
        if self._mode == "genome":
            return [self._rng.uniform(self.problem.low, self.problem.high)
                    for _ in range(self.options.archive)]
        held = {t for m in self.archive for t in m.coef if m.bounds is None}
        return [t for t in (f"m{i}" for i in range(len(self._models))) if t not in held]

    def _probe_proposal(self) -> Proposal:
        o = self.options
        recipe = {"method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}}
                                                for m in self._models],
                  "parameters": {"normalize": True}, **self._template}
        return Proposal(recipe=recipe, kind=PROBE,
                        meta={"role": "probe", "granularity": o.granularity, "block": o.block})

    def _initial_proposal(self, cid: int, what: Any) -> Proposal:
        if self._mode == "genome":
            genome = self.problem.clip(what)
            self._pending_members[cid] = Member(cid, genome=np.asarray(genome))
            return Proposal(genome=genome, meta={"role": "initial"})
        member = Member(cid, bounds=None, coef={what: np.ones(1)}, source=int(what[1:]))
        self._pending_members[cid] = member
        index = int(what[1:])
        recipe = {"method": "linear",
                  "models": [{"model": self._models[index], "parameters": {"weight": 1.0}}],
                  **self._template}
        return Proposal(recipe=recipe, meta={"role": "initial", "model": self._models[index]})

    # -- selection ------------------------------------------------------------------------

    def _score_matrix(self, members: list[Member]) -> np.ndarray:
        if any(m.scores is None for m in members):
            losses = np.array([m.loss for m in members])
            lo, hi = losses.min(), losses.max()
            q = (hi - losses) / (hi - lo) if hi > lo else np.ones_like(losses)
            return q[:, None]
        return np.stack([m.scores for m in members]).astype(float)

    def _fitness(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = s.sum(axis=0)
        scale = np.where(z > 0, z, 1.0) ** self.options.alpha
        shared = s / scale
        return shared.sum(axis=1), shared

    def _pick(self, weights: np.ndarray, exclude: int | None = None) -> int:
        w = np.asarray(weights, dtype=float).copy()
        if exclude is not None:
            w[exclude] = 0.0
        if w.sum() <= 0:
            w = np.ones(len(w))
            if exclude is not None:
                w[exclude] = 0.0
        return int(self._rng.choice(len(w), p=w / w.sum()))

    def _parents(self) -> tuple[int, int]:
        f, shared = self._fitness(self._score_matrix(self.archive))
        a = self._pick(f)
        if self.options.attraction:
            g = np.maximum(0.0, shared - shared[a]).sum(axis=1)
            g[a] = 0.0
            b = self._pick(g if g.sum() > 0 else f, exclude=a)
        else:
            b = self._pick(f, exclude=a)
        return a, b

    # -- crossover ------------------------------------------------------------------------

    def _child(self, cid: int) -> Proposal:
        ia, ib = self._parents()
        pa, pb = self.archive[ia], self.archive[ib]
        w = float(self._rng.uniform())
        meta: dict[str, Any] = {"role": "child", "parents": [pa.id, pb.id], "w": w}
        if self._mode == "genome":
            return self._genome_child(cid, pa, pb, w, meta)
        n_units = len(self._elems) - 1
        k = n_units
        if self.options.split and n_units > 1:
            flat = int(self._rng.integers(1, int(self._elems[-1])))
            pos = int(np.searchsorted(self._elems, flat))
            # the nearest unit boundary strictly inside (0, U)
            near = min((pos - 1, pos), key=lambda u: abs(int(self._elems[u]) - flat))
            k = min(max(near, 1), n_units - 1)
        if self.options.representation == "lineage":
            return self._lineage_child(cid, pa, pb, k, w, meta)
        bounds = np.union1d(np.union1d(self._bounds(pa), self._bounds(pb)), [0, k, n_units])
        ca, cb = self._refine(pa, bounds), self._refine(pb, bounds)
        omega = self._angle(ca, cb, bounds)
        t = np.where(bounds[1:] <= k, w, 1.0 - w)
        s = math.sin(omega)
        if s <= 1e-6:
            fa, fb = 1.0 - t, t
        else:
            fa, fb = np.sin((1.0 - t) * omega) / s, np.sin(t * omega) / s
        coef: dict[str, np.ndarray] = {}
        for term in dict.fromkeys([*ca, *cb]):
            coef[term] = fa * ca.get(term, 0.0) + fb * cb.get(term, 0.0)
        if self.options.mutation_std > 0:
            coef[f"n{cid + 1}"] = np.full(len(bounds) - 1, self.options.mutation_std)
        bounds, coef = self._compact(bounds, coef)
        member = Member(cid, bounds=bounds, coef=coef)
        self._pending_members[cid] = member
        recipe = self._recipe(member)
        meta.update(split=int(self._elems[k]), omega=omega, terms=len(coef),
                    regions=len(bounds) - 1, entries=len(recipe["models"]))
        return Proposal(recipe=recipe, meta=meta)

    # -- lineage children ---------------------------------------------------------------

    def _gram_of(self, a: Member, b: Member) -> np.ndarray:
        """Per-unit inner products of two live members (sources: the probe's Gram)."""
        if a.source is not None and b.source is not None:
            return self._unit_gram[:, a.source, b.source]
        return self._rows[a.id][b.id]

    def _lineage_child(self, cid: int, pa: Member, pb: Member, k: int, w: float,
                       meta: dict[str, Any]) -> Proposal:
        """A child as a lineage recipe: its parents' values (a source model, or an earlier
        member by key) times their SLERP factors on each side of the split, plus its own
        noise term.  Exact: nothing is pruned.  The angle comes from per-unit inner
        products of the live members, carried forward by bilinearity from the sources'
        Gram (a noise term counts by its expectation, ``std^2`` per parameter on itself
        and 0 against everything else), so no probe per child."""
        o = self.options
        n_units = len(self._elems) - 1
        t = np.where(np.arange(n_units) < k, w, 1.0 - w)
        gab, gaa, gbb = (self._gram_of(pa, pb), self._gram_of(pa, pa), self._gram_of(pb, pb))
        ab, aa, bb = float(gab.sum()), float(gaa.sum()), float(gbb.sum())
        cos = ab / max(math.sqrt(max(aa, 0.0) * max(bb, 0.0)), 1e-30)
        omega = math.acos(min(1.0, max(-1.0, cos)))
        s = math.sin(omega)
        if s <= 1e-6:
            fa, fb = 1.0 - t, t
        else:
            fa, fb = np.sin((1.0 - t) * omega) / s, np.sin(t * omega) / s
        # the new member's inner products with every live one, and with itself
        live = {m.id: m for m in [*self.archive, *self._pending_members.values()]}
        child = Member(cid, bounds=None)
        rows: dict[int, np.ndarray] = {}
        for m in live.values():
            if m.source is None and m.id not in self._rows:
                continue  # a terms-made member (never in a lineage search)
            rows[m.id] = fa * self._gram_of(pa, m) + fb * self._gram_of(pb, m)
        sizes = np.diff(self._elems).astype(float)
        rows[cid] = (fa * fa * gaa + 2.0 * fa * fb * gab + fb * fb * gbb
                     + o.mutation_std ** 2 * sizes)
        self._rows[cid] = rows
        for other, row in rows.items():
            if other != cid:
                self._rows.setdefault(other, {})[cid] = row
        # the recipe: anchors (the sources, weight 0), the parents' runs, the noise term
        from mergesearch.merging.regions import publish

        edges = [0, k, n_units] if k < n_units else [0, n_units]
        ops, entries = [], [{"model": m, "parameters": {"weight": 0.0}} for m in self._models]
        for parent, factor in ((pa, fa), (pb, fb)):
            for u0, u1 in zip(edges, edges[1:], strict=False):
                c = float(factor[u0])
                if c == 0.0:
                    continue
                start, end = float(self._elems[u0]), float(self._elems[u1])
                params = {"weight": c, "start": start, "end": end}
                if parent.source is not None:
                    ops.append((0, parent.source, c, start, end))
                    model = self._models[parent.source]
                else:
                    ops.append((1, parent.key, c, start, end))
                    model = self._models[0]
                    params["member"] = float(parent.key)
                entries.append({"model": model, "parameters": params})
        if o.mutation_std > 0:
            total = float(self._elems[-1])
            ops.append((2, cid + 1, o.mutation_std, 0.0, total))
            entries.append({"model": self._models[0], "parameters": {
                "weight": o.mutation_std, "start": 0.0, "end": total,
                "noise_term": float(cid + 1)}})
        child.key = lineage_key(self._models, ops)
        publish(child.key, len(self._models), ops)
        offsets = layout_offsets(self._layout)
        order = sorted(range(len(self._layout)), key=lambda i: -len(self._layout[i][0]))
        child.recipe = {"method": "regions", "models": entries,
                        "parameters": {"normalize": False, "key": float(child.key),
                                       "anchors": float(len(self._models)),
                                       "offset": [{"filter": self._layout[i][0],
                                                   "value": float(offsets[i])}
                                                  for i in order]},
                        **self._template}
        self._pending_members[cid] = child
        meta.update(split=int(self._elems[k]), omega=omega, key=child.key,
                    entries=len(entries) - len(self._models))
        return Proposal(recipe=child.recipe, meta=meta)

    def _discard(self, member: Member, joined: bool) -> None:
        """A member leaves for good: its Gram rows go; one that never joined the archive is
        nobody's parent, so its lineage entry goes too."""
        for other in self._rows.pop(member.id, {}):
            self._rows.get(other, {}).pop(member.id, None)
        if member.key and not joined:
            from mergesearch.merging.regions import forget

            forget(member.key)

    def _genome_child(self, cid: int, pa: Member, pb: Member, w: float,
                      meta: dict[str, Any]) -> Proposal:
        p = self.problem
        d = p.n_dims
        k = int(self._rng.integers(1, d)) if self.options.split and d > 1 else d
        t = np.where(np.arange(d) < k, w, 1.0 - w)
        x = (1.0 - t) * pa.genome + t * pb.genome
        x = x + self._rng.normal(0.0, self.options.genome_mutation, d) * (p.high - p.low)
        genome = p.clip(x)
        self._pending_members[cid] = Member(cid, genome=np.asarray(genome))
        meta["split"] = k
        return Proposal(genome=genome, meta=meta)

    def _bounds(self, m: Member) -> np.ndarray:
        return m.bounds if m.bounds is not None else np.array([0, len(self._elems) - 1])

    def _refine(self, m: Member, bounds: np.ndarray) -> dict[str, np.ndarray]:
        """The member's coefficients on the finer regions ``bounds`` (a superset of its own)."""
        own = self._bounds(m)
        where = np.searchsorted(own, bounds[:-1], side="right") - 1
        return {term: c[where] for term, c in m.coef.items()}

    def _angle(self, ca: dict[str, np.ndarray], cb: dict[str, np.ndarray],
               bounds: np.ndarray) -> float:
        """The global angle between two members on the same regions."""
        grams = self._gram[bounds[1:]] - self._gram[bounds[:-1]]  # [R, S, S]
        elems = (self._elems[bounds[1:]] - self._elems[bounds[:-1]]).astype(float)

        def split(c):
            src = np.zeros((len(bounds) - 1, len(self._models)))
            noise = {}
            for term, v in c.items():
                if term[0] == "m":
                    src[:, int(term[1:])] = v
                else:
                    noise[term] = v
            return src, noise

        (sa, na), (sb, nb) = split(ca), split(cb)

        def dot(x, nx, y, ny):
            value = float(np.einsum("rp,rpq,rq->", x, grams, y))
            for term, v in nx.items():
                if term in ny:
                    value += float(np.sum(v * ny[term] * elems))
            return value

        ab, aa, bb = dot(sa, na, sb, nb), dot(sa, na, sa, na), dot(sb, nb, sb, nb)
        cos = ab / max(math.sqrt(max(aa, 0.0) * max(bb, 0.0)), 1e-30)
        return math.acos(min(1.0, max(-1.0, cos)))

    def _compact(self, bounds: np.ndarray, coef: dict[str, np.ndarray]
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Prune tiny coefficients, cap noise terms, and merge neighbouring regions whose
        coefficients all agree."""
        o = self.options
        elems = (self._elems[bounds[1:]] - self._elems[bounds[:-1]]).astype(float)
        coef = {t: np.where(np.abs(c) < o.prune, 0.0, c) for t, c in coef.items()}
        coef = {t: c for t, c in coef.items() if np.any(c != 0)}
        if o.max_noise_terms is not None:
            noise = sorted((t for t in coef if t[0] == "n"),
                           key=lambda t: (-float(np.sum(coef[t] ** 2 * elems)), t))
            for t in noise[o.max_noise_terms:]:
                del coef[t]
        if not coef:
            return np.array([bounds[0], bounds[-1]]), {}
        mat = np.stack(list(coef.values()))  # [T, R]
        keep = np.ones(len(bounds), dtype=bool)
        keep[1:-1] = np.any(mat[:, 1:] != mat[:, :-1], axis=0)
        regions = np.flatnonzero(keep[:-1])  # the first region of each merged run
        return bounds[keep], {t: c[regions] for t, c in coef.items()}

    def _recipe(self, m: Member) -> dict[str, Any]:
        """The member as a ``regions`` recipe: one entry per term and run of regions."""
        edges = self._elems[m.bounds]
        entries = []
        for term, c in m.coef.items():
            change = np.flatnonzero(np.diff(c) != 0) + 1
            starts = np.concatenate([[0], change])
            ends = np.concatenate([change, [len(c)]])
            for a, b in zip(starts, ends, strict=True):
                if c[a] == 0:
                    continue
                params = {"weight": float(c[a]), "start": float(edges[a]),
                          "end": float(edges[b])}
                if term[0] == "m":
                    model = self._models[int(term[1:])]
                else:
                    model = self._models[0]
                    params["noise_term"] = float(term[1:])
                entries.append({"model": model, "parameters": params})
        offsets = layout_offsets(self._layout)
        order = sorted(range(len(self._layout)), key=lambda i: -len(self._layout[i][0]))
        return {"method": "regions", "models": entries,
                "parameters": {"normalize": False,
                               "offset": [{"filter": self._layout[i][0],
                                           "value": float(offsets[i])} for i in order]},
                **self._template}

    # -- tell ---------------------------------------------------------------------------

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        for cand, result in told:
            if cand.id == self._probe_id:
                if result.ok and result.payload is not None:
                    self._take_probe(result.payload)
                else:
                    self._probe_id = None  # ask it again
                continue
            member = self._pending_members.pop(cand.id, None)
            if member is None:
                continue
            if not result.ok:
                self._discard(member, joined=False)
                continue
            member.loss = self.problem.scalar_loss(result.values)
            if result.correct:
                member.scores = np.concatenate(
                    [np.asarray(result.correct[t], dtype=bool) for t in sorted(result.correct)])
            self._join(member)

    def _take_probe(self, payload: dict[str, Any]) -> None:
        if payload.get("models") != self._models:
            raise StrategyError("m2n2: the region probe answered for other models "
                                f"({payload.get('models')}) than the search's {self._models}")
        self._layout = payload["tensors"]
        bounds = units(self._layout, payload["granularity"], payload["block"])
        s = len(self._models)
        iu = np.triu_indices(s)
        tri = np.asarray(payload["gram"], dtype=float).reshape(len(bounds) - 1, -1)
        full = np.zeros((len(bounds) - 1, s, s))
        full[:, iu[0], iu[1]] = tri
        full[:, iu[1], iu[0]] = tri
        self._gram = np.concatenate([np.zeros((1, s, s)), np.cumsum(full, axis=0)])
        self._unit_gram = full
        self._elems = bounds

    def _join(self, child: Member) -> None:
        if self.archive and (child.scores is None) != (self.archive[0].scores is None):
            raise StrategyError("m2n2: some results carry per-item correctness and some do "
                                "not; the evaluator must report items for every candidate")
        if child.scores is not None and self.archive and \
                len(child.scores) != len(self.archive[0].scores):
            raise StrategyError(f"m2n2: a result scores {len(child.scores)} items where the "
                                f"archive has {len(self.archive[0].scores)}; score every "
                                "candidate on the same items (fidelity 1)")
        pool = [*self.archive, child]
        if len(pool) > self.options.archive:
            f, _ = self._fitness(self._score_matrix(pool))
            # lowest fitness leaves; on ties the newest (the child first)
            drop = min(range(len(pool)), key=lambda i: (f[i], -pool[i].id))
            gone = pool.pop(drop)
            if self._mode == "recipe":
                self._discard(gone, joined=gone is not child)
        self.archive = pool
        self.history.append([m.id for m in pool])

    # -- reading ------------------------------------------------------------------------

    @property
    def best(self) -> Member | None:
        """The archive member with the lowest scalar loss."""
        return min(self.archive, key=lambda m: (m.loss, m.id), default=None)

    def recipe_of(self, member: Member) -> dict[str, Any] | None:
        """A member's recipe (recipe mode, after the probe)."""
        if self._mode != "recipe":
            return None
        if member.recipe is not None:
            return member.recipe
        return None if member.bounds is None else self._recipe(member)


def lineage_key(models: list[str], ops: list[tuple]) -> int:
    """A lineage member's key: a digest of its source models and its entries (which name
    its parents by their keys), so of its whole lineage; in [1, 2^52]."""
    import hashlib
    import json

    text = json.dumps([models, [list(op) for op in ops]], separators=(",", ":"))
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return digest % (2**52 - 1) + 1
