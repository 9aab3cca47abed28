"""MAP: amortised Pareto fronts via quadratic approximation (2024), and two variants:
``map``, ``bayesian_map`` and ``nested_map``.

Each task metric ``M_n(c)`` over the merge coefficients ``c`` (the genome) is modelled by a
quadratic in ``c`` wrapped in a link (sigmoid for accuracies, softplus for losses), fitted by
nonlinear least squares on evaluated points; NSGA-III on the surrogates gives a predicted
Pareto front at no evaluation cost; chosen front points are then evaluated for real.  The
maths is in :mod:`mergesearch.strategies.map_surrogate`.

Faithful to the paper: one quadratic-through-a-link per objective, fitted by
``scipy.optimize.least_squares``; the ``(N + 1)(N + 2)``-point design of the one-hot points
plus grid points with the one-hot, sum-to-one and all-equal points held out; NSGA-III
(pymoo, ``mu = lambda = 100``, SBX and polynomial mutation with eta 20) over the space's
bounds; the preference choice (the front point maximising ``sum p_i M~_i``); Bayesian MAP's
direction bins by hyperspherical angles scored by the bootstrap residual's mean + 0.5 std
and sampled by a softmax at temperature 0.07; nested MAP's pairwise 2-D merges of the two
models with the closest single-task scores until one model remains.

Our choices:

- The design and the fits work in unit coordinates of the *design box*: per dimension
  ``[0, 1]`` (task-vector coefficients) intersected with its bounds, or its bounds where
  they do not meet ``[0, 1]``; the front is searched over the whole bounds.  Grid points are
  picked greedily by leverage (a sequential D-optimal design), so the quadratic is always
  identifiable.
- Every proposal's metadata says its ``phase`` (``design``, ``adaptive``, ``front``,
  ``experts``, ``explore``), its ``round`` and, once a surrogate exists, the ``predicted``
  value of every objective it models; the actual values are the trial's values, so every
  trial carries predicted vs actual.  ``strategy.fronts`` keeps each round's predicted front.
- MAP is not one-shot here: after the design, each round refits every surrogate on all
  points evaluated so far (design and validated front points), runs NSGA-III again and
  validates ``front_points`` new front points (spread over the front from the preference
  point, or the best by preference), so a search never runs dry before its budget.
- A round is a barrier: ``ask`` returns ``[]`` until every candidate of the round is told,
  since the next round's fit needs them.  Failed candidates are left out of the fits.
- Bayesian MAP scores each bin by the out-of-bag residual of bootstrap refits (a point's
  residual counts only from fits that did not see it), summed over objectives scaled by
  their value range; bins with no point score as the worst bin (unexplored).
- Nested MAP runs its pairwise merges as internal stages on the flat space: a merge of
  merges of task vectors is again a task-arithmetic merge whose coefficients compose
  (``x (a_1 tau_1 + a_2 tau_2) + y (b_3 tau_3 + b_4 tau_4)``), so each 2-D MAP searches
  ``c = x a + y b`` for the pair's coefficient vectors ``a``, ``b``.  The experts are
  scored first (each alone: weight 1 on its dimensions, 0 on the others); each objective
  belongs to the expert best on it; a pair's 2-D MAP prefers the sum of the pair's
  objectives, and the merged model is the pair's validated point that scored best on them
  for real.  Once one model remains, its last 2-D MAP goes on refining.
- Nested MAP's experts are groups of dimensions: ``options.experts`` (expert -> dimension
  names, ``*`` / ``?`` wildcards), else read from task-arithmetic names (``weight[rev]``
  per expert, ``weight[rev]@L0-1`` per layer group: an expert's layers move together,
  so a per-layer space runs as its per-expert space), else one expert per dimension when
  no name is bracketed.  A space with several bracketed parameters (DARE-TIES weight and
  density) or unbracketed dimensions among bracketed ones is refused with what it needs.
- State: the base class's replay (every refit and NSGA-III run is seeded by the round).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from mergesearch.strategies import map_surrogate as ms
from mergesearch.strategies.base import Proposal, Strategy, StrategyError, StrategyOptions, register
from mergesearch.trial import Candidate, Result

LinkOption = Literal["auto", "sigmoid", "softplus", "identity"]
#: proposals closer than this (in unit coordinates) to a known point are duplicates
_SAME = 1e-6


class MapOptions(StrategyOptions):
    design: int | None = Field(None, ge=1)
    """Design points before the first fit; None: ``(N + 1)(N + 2)`` for N dimensions."""
    front_points: int = Field(8, ge=1)
    """Front points evaluated for real per round."""
    select: Literal["front", "preference"] = "front"
    """Which front points to validate: ``front``, spread over the predicted front starting
    from the preference point; ``preference``, the best by ``sum p_i M~_i``."""
    preference: list[float] | None = None
    """The preference vector ``p``, one entry per objective in objective order; None: the
    objectives' weights."""
    link: LinkOption | dict[str, LinkOption] = "auto"
    """The surrogate's link, or one per objective by name: ``auto`` picks sigmoid for values
    in [0, 1], softplus for non-negative ones, else the identity."""
    ridge: float = Field(1e-6, ge=0)
    """L2 penalty on the quadratic's coefficients (not the constant)."""
    front_box: Literal["bounds", "design"] = "bounds"
    """Where NSGA-III searches the surrogates: the space's ``bounds`` (the paper), or the
    ``design`` box the surrogates were fitted in (no extrapolation)."""
    pop_size: int = Field(100, ge=4)
    """NSGA-III's mu = lambda on the surrogates."""
    generations: int = Field(50, ge=1)
    """NSGA-III generations on the surrogates (the paper gives none; quadratics settle
    well within 50)."""
    min_distance: float = Field(0.02, ge=0, le=0.5)
    """A front, adaptive or exploring point is proposed only this far (in some coordinate
    of the design box's unit coordinates) from every point evaluated or planned; a round
    with fewer such front points fills up with random points of its frame.  Without it a
    surrogate front that has collapsed onto one merge (always, with one objective: the
    GA's final population) spends the rest of the budget on copies of that merge."""

    @model_validator(mode="after")
    def _positive_preference(self) -> MapOptions:
        if self.preference is not None and (not self.preference or
                                            min(self.preference) < 0 or
                                            sum(self.preference) <= 0):
            raise ValueError("preference: give non-negative numbers, not all zero")
        return self


class _Frame:
    """A (sub)space a surrogate lives in: unit coordinates ``u = z @ basis`` for ``z`` in
    ``[low, high]``, the candidate ids it owns and points of known value (``fixed``)."""

    def __init__(self, basis: np.ndarray, low: np.ndarray, high: np.ndarray,
                 objectives: list[int]):
        self.basis, self.low, self.high = basis, low, high
        self.objectives = objectives
        self.ids: dict[int, np.ndarray] = {}  # candidate id -> z
        self.fixed: list[tuple[np.ndarray, np.ndarray]] = []  # (z, values)

    def u(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=float) @ self.basis


class _MapBase(Strategy):
    """The round engine the three strategies share (design, fits, fronts, validation)."""

    multi_objective = True
    kinds = frozenset({"real"})  # quadratics over real coefficients
    rng_libraries = ("numpy", "scipy", "pymoo")
    Options = MapOptions
    options: MapOptions

    # -- set-up -------------------------------------------------------------------------

    def _setup(self) -> None:
        p = self.problem
        self._rng = np.random.default_rng(np.random.SeedSequence([self.seed, 7]))
        low, high = p.low, p.high
        dl, dh = np.maximum(low, 0.0), np.minimum(high, 1.0)
        outside = dh <= dl  # bounds that do not meet [0, 1]: the design box is the bounds
        self._dl = np.where(outside, low, dl)
        self._span = np.where(outside, high, dh) - self._dl
        self._ul, self._uh = (low - self._dl) / self._span, (high - self._dl) / self._span
        self._signs = np.array([o.sign for o in p.objectives])
        given = self.options.preference
        if given is not None and len(given) != len(p.objectives):
            raise StrategyError(f"{self.name} options: preference has {len(given)} entries "
                                f"for {len(p.objectives)} objectives "
                                f"({', '.join(o.name for o in p.objectives)})")
        self._pref = np.array(given if given is not None else [o.weight for o in p.objectives],
                              dtype=float)
        links = self.options.link
        if isinstance(links, dict):
            unknown = sorted(set(links) - {o.name for o in p.objectives})
            if unknown:
                raise StrategyError(f"{self.name} options: link names objective(s) "
                                    f"{', '.join(unknown)} that the problem lacks")
        self._u: dict[int, np.ndarray] = {}  # candidate id -> unit coordinates
        self._values: dict[int, np.ndarray] = {}  # ok candidate id -> values, objective order
        self._queue: list[tuple[np.ndarray, dict[str, Any], _Frame | None, Any]] = []
        self._outstanding: set[int] = set()
        self._round = 0
        self.fronts: list[dict[str, Any]] = []  # each round's predicted front
        n = p.n_dims
        self._full = _Frame(np.eye(n), self._ul, self._uh, list(range(len(p.objectives))))
        self._start()

    def _start(self) -> None:
        """Subclass hook: build the first frame(s)."""

    # -- ask / tell ---------------------------------------------------------------------

    def _ask(self, n: int) -> list[Proposal]:
        if not self._queue and not self._outstanding:
            self._queue = self._next_round()
            self._round += 1
            if not self._queue:  # nothing new: explore at random rather than run dry
                self._queue = [self._explore(self._full) for _ in range(max(1, n))]
        out = []
        for k, (u, meta, frame, z) in enumerate(self._queue[:n]):
            cid = self._next_id + k
            genome = self.problem.clip(self._dl + self._span * u)
            self._u[cid] = (np.asarray(genome) - self._dl) / self._span
            if frame is not None:
                frame.ids[cid] = np.asarray(z, dtype=float)
            self._outstanding.add(cid)
            out.append(Proposal(genome=genome, meta={"round": self._round, **meta}))
        del self._queue[:n]
        return out

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        for cand, result in told:
            self._outstanding.discard(cand.id)
            if result.ok:
                self._values[cand.id] = np.array(
                    [result.values[o.name] for o in self.problem.objectives], dtype=float)

    def _next_round(self) -> list[tuple[np.ndarray, dict[str, Any], _Frame | None, Any]]:
        raise NotImplementedError

    # -- shared pieces ------------------------------------------------------------------

    def _data(self, frame: _Frame) -> tuple[np.ndarray, np.ndarray]:
        """The frame's points of known value: ``(Z, values)``."""
        if frame is self._full:
            ids = [i for i in sorted(self._values)]
            zs, ys = [self._u[i] for i in ids], [self._values[i] for i in ids]
        else:
            ids = [i for i in sorted(frame.ids) if i in self._values]
            zs, ys = [frame.ids[i] for i in ids], [self._values[i] for i in ids]
        zs += [z for z, _ in frame.fixed]
        ys += [v for _, v in frame.fixed]
        n = frame.basis.shape[0]
        if not zs:
            return np.zeros((0, n)), np.zeros((0, len(self.problem.objectives)))
        return np.array(zs), np.array(ys)

    def _link(self, j: int) -> ms.Link | None:
        link = self.options.link
        if isinstance(link, dict):
            link = link.get(self.problem.objectives[j].name, "auto")
        return None if link == "auto" else link

    def _fit(self, Z: np.ndarray, Y: np.ndarray, objectives: list[int]) -> list[ms.Quadratic]:
        return [ms.fit(Z, Y[:, j], self._link(j), self.options.ridge) for j in objectives]

    def _predicted(self, models: list[ms.Quadratic], objectives: list[int],
                   z: np.ndarray) -> dict[str, float]:
        names = [self.problem.objectives[j].name for j in objectives]
        return {name: float(m(z)[0]) for name, m in zip(names, models, strict=True)}

    def _round_seed(self) -> int:
        return int(np.random.SeedSequence([self.seed, self._round]).generate_state(1)[0])

    def _known(self) -> np.ndarray:
        planned = [u for u, *_ in self._queue]
        return np.array([*self._u.values(), *planned]) if self._u or planned else \
            np.zeros((0, self.problem.n_dims))

    def _is_new(self, u: np.ndarray, known: np.ndarray, gap: float = _SAME) -> bool:
        genome = np.asarray(self.problem.clip(self._dl + self._span * u))
        u = (genome - self._dl) / self._span
        return not len(known) or float(np.min(np.abs(known - u).max(axis=1))) > gap

    def _design_round(self, frame: _Frame, count: int | None = None,
                      skip_onehot: bool = False) -> list[tuple]:
        k = frame.basis.shape[0]
        Z = ms.design(k, count, seed=self.seed)
        if skip_onehot:
            Z = Z[k:]
        Z = np.clip(Z, frame.low, frame.high)
        return self._fresh((frame.u(z), {"phase": "design"}, frame, z) for z in Z)

    def _fresh(self, rows: Iterable[tuple], k: int | None = None,
               gap: float = _SAME) -> list[tuple]:
        """The first ``k`` (all, when None) of ``rows`` (``(u, meta, frame, z)``) whose
        genome is new, more than ``gap`` (max-norm, unit coordinates) from every point
        evaluated, planned or an earlier row.  ``rows`` may be a generator; it is drawn
        from only until ``k`` are found."""
        out, known = [], self._known()
        if k == 0:
            return out
        for row in rows:
            if self._is_new(row[0], known, gap):
                out.append(row)
                known = np.vstack([known, row[0]])
            if k is not None and len(out) == k:
                break
        return out

    def _explore(self, frame: _Frame) -> tuple:
        lo, hi = np.maximum(frame.low, 0.0), np.minimum(frame.high, 1.0)
        lo, hi = np.where(hi > lo, lo, frame.low), np.where(hi > lo, hi, frame.high)
        z = lo + (hi - lo) * self._rng.random(len(lo))
        return (frame.u(z), {"phase": "explore"}, frame, z)

    def _front_round(self, frame: _Frame, k: int, preference: np.ndarray) -> list[tuple]:
        """Fit the frame's objectives, run NSGA-III on the surrogates, and pick ``k`` new
        front points to evaluate (the preference point first)."""
        Z, Y = self._data(frame)
        objs = frame.objectives
        if len(Z) < 2:
            return [self._explore(frame) for _ in range(k)]
        models = self._fit(Z, Y, objs)
        low, high = frame.low, frame.high
        if self.options.front_box == "design" and frame is self._full:
            low, high = np.maximum(low, 0.0), np.minimum(high, 1.0)
        FZ, V = ms.surrogate_front(models, self._signs[objs], low, high,
                                   seed=self._round_seed(), pop_size=self.options.pop_size,
                                   generations=self.options.generations)
        score = V @ (-self._signs[objs] * preference[objs])
        best = int(np.argmax(score))
        self.fronts.append({"round": self._round, "u": [frame.u(z).tolist() for z in FZ],
                            "z": FZ.tolist(), "predicted": V.tolist(),
                            "objectives": [self.problem.objectives[j].name for j in objs],
                            "preferred": best})
        order = (list(np.argsort(-score, kind="stable")) if self.options.select == "preference"
                 else ms.spread(V, best, len(V)))
        front = ((frame.u(FZ[i]),
                  {"phase": "front", "predicted": self._predicted(models, objs, FZ[i]),
                   "preference_score": float(score[i]), "preferred": bool(i == best)},
                  frame, FZ[i]) for i in order)
        # the front exhausted near what is known: random points of the frame fill the round
        explore = (self._explore(frame) for _ in range(50 * k))
        return self._fresh(itertools.chain(front, explore), k, self.options.min_distance)


@register
class Map(_MapBase):
    """MAP: the quadratic design, surrogates, NSGA-III front, validated front points."""

    name = "map"
    description = ("MAP: quadratic-through-link surrogates per objective from an (N+1)(N+2) "
                   "design, NSGA-III front on them, front points validated for real")

    def _next_round(self) -> list[tuple]:
        if self._round == 0:
            return self._design_round(self._full, self.options.design)
        return self._front_round(self._full, self.options.front_points, self._pref)


class BayesianMapOptions(MapOptions):
    design: int | None = Field(None, ge=1)
    """Initial design points; None: ``(N + 1)(N + 2) / 2``, one per coefficient."""
    adaptive: int | None = Field(None, ge=0)
    """Adaptive points (where the surrogate is worst) before the first front; None:
    ``(N + 1)(N + 2) / 4``."""
    batch: int = Field(4, ge=1)
    """Adaptive points per refit."""
    bins: int = Field(3, ge=1)
    """Bins per hyperspherical angle."""
    bootstrap: int = Field(8, ge=2)
    """Bootstrap refits for the residual score."""
    temperature: float = Field(0.07, gt=0)
    """Softmax temperature over the bins' (max-normalised) scores."""
    max_dims: int = Field(6, ge=1)
    """The most dimensions it accepts (bins grow as ``bins^(N-1)``)."""


@register
class BayesianMap(_MapBase):
    """Bayesian MAP: a small design, then points where the surrogate is worst, then fronts."""

    name = "bayesian_map"
    description = ("Bayesian MAP: MAP whose design grows where the surrogates' bootstrap "
                   "residual is worst (direction bins, softmax T 0.07); up to 6 dimensions")
    Options = BayesianMapOptions
    options: BayesianMapOptions

    def _start(self) -> None:
        n = self.problem.n_dims
        if n > self.options.max_dims:
            raise StrategyError(f"bayesian_map bins directions in {n} dimensions, more than "
                                f"max_dims {self.options.max_dims}: use map or nested_map, or "
                                "raise max_dims")
        self._adaptive = 0

    def _next_round(self) -> list[tuple]:
        n = self.problem.n_dims
        if self._round == 0:
            return self._design_round(self._full, self.options.design or ms.n_coefficients(n))
        budget = (self.options.adaptive if self.options.adaptive is not None
                  else ms.n_coefficients(n) // 2)
        if self._adaptive < budget:
            k = min(self.options.batch, budget - self._adaptive)
            self._adaptive += k
            return self._adaptive_round(k)
        return self._front_round(self._full, self.options.front_points, self._pref)

    def _angles(self, U: np.ndarray) -> np.ndarray:
        """Hyperspherical angles (each in [0, pi/2]) of non-negative directions."""
        U = np.maximum(np.atleast_2d(U), 0.0)
        n = U.shape[1]
        tail = np.sqrt(np.cumsum((U ** 2)[:, ::-1], axis=1)[:, ::-1])  # ||u[k:]||
        return np.arctan2(tail[:, 1:], U[:, : n - 1]) if n > 1 else np.zeros((len(U), 0))

    def _bin_of(self, U: np.ndarray) -> np.ndarray:
        b = self.options.bins
        if U.shape[1] == 1:  # one dimension: bins along the line
            return np.clip((U[:, :1] * b).astype(int), 0, b - 1)
        return np.clip((self._angles(U) / (math.pi / 2) * b).astype(int), 0, b - 1)

    def _adaptive_round(self, k: int) -> list[tuple]:
        frame, objs = self._full, self._full.objectives
        Z, Y = self._data(frame)
        if len(Z) < 2:
            return [self._explore(frame) for _ in range(k)]
        lo, hi = np.clip(self._ul, 0, None), np.minimum(self._uh, 1.0)  # the design box
        # out-of-bag residuals of bootstrap refits, per point, scaled per objective
        scale = np.ptp(Y, axis=0)
        scale[scale == 0] = 1.0
        m = len(Z)
        rows = [[] for _ in range(m)]
        for _ in range(self.options.bootstrap):
            take = self._rng.integers(0, m, size=m)
            out = np.setdiff1d(np.arange(m), take)
            if not len(out):
                continue
            models = self._fit(Z[take], Y[take], objs)
            err = np.column_stack([np.abs(q(Z[out]) - Y[out, j]) / scale[j]
                                   for q, j in zip(models, objs, strict=True)]).sum(axis=1)
            for i, e in zip(out, err, strict=True):
                rows[i].append(float(e))
        point = np.array([np.mean(r) + 0.5 * np.std(r) if r else np.nan for r in rows])
        bins = [tuple(b) for b in self._bin_of((Z - lo) / (hi - lo))]
        score: dict[tuple, list[float]] = {}
        for b, s in zip(bins, point, strict=True):
            if np.isfinite(s):
                score.setdefault(b, []).append(float(s))
        n = Z.shape[1]
        nb = self.options.bins
        every = [tuple(b) for b in np.ndindex(*([nb] * max(n - 1, 1)))]
        worst = max((np.mean(v) for v in score.values()), default=1.0)
        s = np.array([np.mean(score[b]) if b in score else worst for b in every])
        s = s / (s.max() if s.max() > 0 else 1.0)
        prob = np.exp((s - 1.0) / self.options.temperature)
        prob /= prob.sum()
        fitted = self._fit(Z, Y, objs)

        def draws():  # a bin by the softmax, then a point in it; at most 50 k tries
            for _ in range(50 * k):
                b = every[int(self._rng.choice(len(every), p=prob))]
                u = lo + (hi - lo) * self._in_bin(b, len(lo))
                yield (u, {"phase": "adaptive", "bin": [int(x) for x in b],
                           "predicted": self._predicted(fitted, objs, u)}, frame, u)

        return self._fresh(draws(), k, self.options.min_distance)

    def _in_bin(self, b: tuple, n: int) -> np.ndarray:
        """A random point of the unit cube whose direction from the origin lies in bin
        ``b``: angles uniform in the bin, radius uniform up to the cube's far side."""
        nb = self.options.bins
        if n == 1:
            return np.array([(b[0] + self._rng.random()) / nb])
        phi = (np.array(b) + self._rng.random(n - 1)) / nb * (math.pi / 2)
        d = np.ones(n)
        for i, a in enumerate(phi):
            d[i] *= math.cos(a)
            d[i + 1:] *= math.sin(a)
        d = np.maximum(d, 0.0)
        return d / d.max() * self._rng.random()


class NestedMapOptions(MapOptions):
    front_points: int = Field(3, ge=1)
    """Front points of each pair's 2-D MAP evaluated for real."""
    polish_points: int = Field(8, ge=1)
    """Front points per round once one model remains (its last 2-D MAP refining)."""
    experts: dict[str, list[str]] | None = None
    """The space's dimensions by expert: expert name -> the names of the dimensions that
    scale its task vector (``*`` and ``?`` are wildcards, brackets are literal, so
    ``weight[rev]@*`` is every layer group of ``rev``); every dimension in exactly one
    expert.  None: from the names, ``<param>[<expert>]`` or ``<param>[<expert>]@<layers>``
    (the task-arithmetic spaces, per expert or per layer) grouped by expert; a space with
    no bracketed names, one expert per dimension."""

    @model_validator(mode="after")
    def _experts_named(self) -> NestedMapOptions:
        if self.experts is not None:
            empty = [e for e, names in self.experts.items() if not names]
            if not self.experts or empty:
                raise ValueError("experts: give each expert one or more dimension names"
                                 + (f" ({', '.join(empty)} has none)" if empty else ""))
        return self


#: a dimension of a task-arithmetic space: ``weight[rev]``, ``weight[rev]@L0-1``
_EXPERT_DIM = re.compile(r"^(?P<param>[^\[\]@]+)\[(?P<expert>[^\[\]]+)\](?:@.*)?$")


def _pattern(text: str) -> re.Pattern:
    """``*`` and ``?`` as wildcards, everything else (brackets too) literal."""
    return re.compile("^" + re.escape(text).replace(r"\*", ".*").replace(r"\?", ".") + "$")


def expert_groups(names: list[str], experts: dict[str, list[str]] | None = None,
                  ) -> list[tuple[str, list[int]]]:
    """The dimensions (by index) of each expert, in the order the experts come: from
    ``experts`` (expert -> dimension names or patterns), else from the names (see
    :attr:`NestedMapOptions.experts`).  Raises :class:`StrategyError` saying what nested MAP
    needs when the space does not say which dimensions belong to which expert."""
    need = ("nested_map merges experts by scaling each expert's task vector (task "
            "arithmetic, whose merges of merges compose): it needs the dimensions grouped "
            "by expert")
    if experts is not None:
        owner: dict[int, str] = {}
        groups = []
        for expert, given in experts.items():
            dims = sorted({i for g in given for i, n in enumerate(names)
                           if _pattern(g).match(n)})
            if not dims:
                raise StrategyError(f"nested_map options: experts.{expert} ({', '.join(given)}) "
                                    f"names no dimension of this space ({_some(names)})")
            twice = [i for i in dims if i in owner]
            if twice:
                raise StrategyError(f"nested_map options: {_some([names[i] for i in twice])} "
                                    f"in experts {owner[twice[0]]} and {expert}: each "
                                    "dimension belongs to one expert")
            owner.update({i: expert for i in dims})
            groups.append((expert, dims))
        left = [n for i, n in enumerate(names) if i not in owner]
        if left:
            raise StrategyError(f"nested_map options: experts leaves out {_some(left)}: "
                                "every dimension belongs to exactly one expert")
        return groups
    found = [_EXPERT_DIM.match(n) for n in names]
    if not any(found):  # plain names: each dimension is one expert's weight
        return [(n, [i]) for i, n in enumerate(names)]
    odd = [n for n, m in zip(names, found, strict=True) if m is None]
    if odd:
        raise StrategyError(f"{need}; the dimensions {_some(odd)} name no expert "
                            "(<param>[<expert>]): give options.experts, expert -> its "
                            "dimension names")
    params = sorted({m["param"] for m in found})
    if len(params) > 1:
        raise StrategyError(f"{need}, one weight parameter per expert (weight[rev] or "
                            f"weight[rev]@L0-1); this space has the parameters "
                            f"{', '.join(params)}: search a task-arithmetic space, or give "
                            "options.experts (expert -> the dimensions that scale its task "
                            "vector) if you mean every one of them to")
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(found):
        groups.setdefault(m["expert"], []).append(i)
    return list(groups.items())


def _some(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@register
class NestedMap(_MapBase):
    """Nested MAP: pairwise 2-D MAPs, closest single-task scores first, until one model."""

    name = "nested_map"
    description = ("Nested MAP: merge the two models with the closest single-task scores by "
                   "a 2-D MAP, repeatedly, until one model remains; then refine it")
    Options = NestedMapOptions
    options: NestedMapOptions

    def _start(self) -> None:
        self._groups = expert_groups(self.problem.names, self.options.experts)
        self._models: list[dict[str, Any]] = []  # each: u, tasks, values, name
        self._stage: _Frame | None = None
        self._pair: list[dict[str, Any]] = []
        self._step = "experts"  # experts -> design -> front -> (design -> front)... -> polish
        self.merges: list[dict[str, Any]] = []
        self._n = len(self._groups)  # experts

    def _next_round(self) -> list[tuple]:
        if self._step == "experts":  # each expert alone: weight 1 on its dimensions, 0 else
            self._step = "pair"
            out = []
            for name, dims in self._groups:
                u = np.zeros(self.problem.n_dims)
                u[dims] = np.clip(1.0, self._ul[dims], self._uh[dims])
                out.append((u, {"phase": "experts", "model": name}, None, None))
            return out
        if self._step == "pair":
            if not self._models:
                self._init_models()
            if len(self._models) == 1:
                self._step = "polish"
                if self._stage is None:  # one dimension: a 1-D MAP along it
                    self._stage = self._frame([self._models[0]])
                    self._step = "front"
                    return self._design_round(self._stage, skip_onehot=True)
                return self._next_round()
            self._pair = self._closest()
            self._stage = self._frame(self._pair)
            self._step = "front"
            return self._noted(self._design_round(self._stage, skip_onehot=True))
        if self._step == "front":
            out = self._stage_front(self.options.front_points)
            self._step = "merge" if len(self._models) > 1 else "polish"
            return out
        if self._step == "merge":
            self._merge()
            self._step = "pair"
            return self._next_round()
        return self._stage_front(self.options.polish_points)  # the last 2-D MAP refines

    def _stage_front(self, k: int) -> list[tuple]:
        pref = self._pref * np.isin(np.arange(len(self._pref)), self._stage.objectives)
        return self._noted(self._front_round(self._stage, k, pref))

    def _noted(self, rows: list[tuple]) -> list[tuple]:
        """The rows with the pair's stage and names in their notes."""
        meta = {"stage": len(self.merges), "pair": [p["name"] for p in self._pair]}
        return [(u, {**m, **meta}, f, z) for u, m, f, z in rows]

    def _init_models(self) -> None:
        values = [self._values.get(i) for i in range(self._n)]  # experts: candidates 0..n-1
        got = [v for v in values if v is not None]
        worst = (np.max(np.array(got) * self._signs, axis=0) * self._signs if got
                 else np.zeros(len(self._signs)))
        owner: dict[int, set[int]] = {i: set() for i in range(self._n)}
        if got:
            for j in range(len(self._signs)):
                loss = [self._signs[j] * v[j] if v is not None else np.inf for v in values]
                owner[int(np.argmin(loss))].add(j)
        self._models = [{"name": self._groups[i][0], "u": self._u[i],
                         "tasks": owner[i], "values": values[i] if values[i] is not None
                         else worst} for i in range(self._n)]

    def _closest(self) -> list[dict[str, Any]]:
        V = np.array([m["values"] for m in self._models])
        scale = np.ptp(V, axis=0)
        scale[scale == 0] = 1.0
        best, pair = np.inf, (0, 1)
        for a in range(len(V)):
            for b in range(a + 1, len(V)):
                d = float(np.linalg.norm((V[a] - V[b]) / scale))
                if d < best - 1e-12:
                    best, pair = d, (a, b)
        return [self._models[pair[0]], self._models[pair[1]]]

    def _frame(self, models: list[dict[str, Any]]) -> _Frame:
        basis = np.array([m["u"] for m in models])
        low, high = [], []
        for row in basis:  # the coefficient range that keeps every weight in bounds
            on = np.abs(row) > 1e-12
            if not on.any():  # a model at the base (all coefficients 0): any range will do
                low.append(0.0)
                high.append(1.0)
                continue
            lo = np.max(np.minimum(self._ul[on] / row[on], self._uh[on] / row[on]))
            hi = np.min(np.maximum(self._ul[on] / row[on], self._uh[on] / row[on]))
            low.append(lo)
            high.append(hi)
        tasks = sorted(set().union(*(m["tasks"] for m in models)))
        frame = _Frame(basis, np.array(low), np.array(high),
                       tasks or list(range(len(self.problem.objectives))))
        for k, m in enumerate(models):  # the pair's own models: values known
            frame.fixed.append((np.eye(len(models))[k], m["values"]))
        return frame

    def _merge(self) -> None:
        frame = self._stage
        objs = frame.objectives
        pref = -self._signs[objs] * self._pref[objs]
        ids = [i for i in frame.ids if i in self._values]
        if ids:
            best = max(ids, key=lambda i: (float(self._values[i][objs] @ pref), -i))
            u, values, z = frame.u(frame.ids[best]), self._values[best], frame.ids[best]
        else:  # nothing of this pair scored: the midpoint, scored as the worse model
            z = np.full(len(self._pair), 0.5)
            u = frame.u(z)
            values = np.array([m["values"] for m in self._pair]).min(axis=0)
        merged = {"name": "(" + "+".join(m["name"] for m in self._pair) + ")", "u": u,
                  "tasks": set().union(*(m["tasks"] for m in self._pair)), "values": values}
        self.merges.append({"pair": [m["name"] for m in self._pair], "z": list(map(float, z)),
                            "name": merged["name"]})
        self._models = [m for m in self._models if all(m is not p for p in self._pair)]
        self._models.append(merged)
