"""MERGE's surrogate-assisted multi-objective search over component-wise configurations.

MERGE (fine-grained merging via modular expert recombination, 2026) searches, for every
layer, which model's attention and MLP block to keep (a source's, or the merged one's),
trading cross-task performance against storage (distinct modules kept) with a
surrogate-assisted evolutionary algorithm that returns a Pareto set.  The paper does not
say which surrogate, MOEA or infill rule it uses; every one of those choices here is
**ours**:

- **Surrogate: one random forest per objective** (scikit-learn's
  ``RandomForestRegressor``, bootstrapped trees), on a one-hot encoding of categorical
  dimensions (reals and integers scaled to [0, 1], binaries as 0/1).  The mean of the
  trees is the prediction, their standard deviation the uncertainty (as in SMAC).  Why a
  forest rather than a GP or an RBF: the space is categorical (a choice of module per
  block), where a forest needs no distance between categories and no kernel
  hyperparameters, is cheap to refit at every round on a few hundred points, and its
  trees' spread gives an uncertainty for free; a GP on one-hot codes needs a
  categorical kernel to be meaningful, an RBF gives no uncertainty.  Targets are
  standardised per objective; an objective that has not varied yet is predicted as its
  constant.  An objective that is a function of the recipe alone (``source: recipe``,
  such as MERGE's storage: the problem's ``exact`` map) is not modelled: it is computed
  for every candidate, with no uncertainty (``exact_objectives``, on by default).  On a
  component space storage is the number of blocks taken from an expert, which a forest
  on one-hot codes only approximates (an additive count, split by split); computed, the
  infill knows which candidates sit one module further along the front.
- **MOEA: pymoo's NSGA-II** on genome arrays (categorical indices and integers rounded)
  with uniform crossover and a re-draw mutation (each dimension, with probability
  1 / dims and at least one per child, re-drawn to another of its values; a real one
  uniform in its bounds), pymoo's duplicate elimination, run on the surrogate,
  ``generations`` generations of ``pop_size``; its first population is the evaluated
  points, best non-dominated ranks first, topped up with perturbations of them (each
  dimension re-drawn with probability 2 / dims) and uniform points.  (pymoo's
  mixed-variable form builds a Python object per individual: 1.5-3x the strategy time
  of the array form in benchmarks/RESULTS.md's measurement, for a hypervolume within
  the seed spread of this one's.)
- **Infill: optimistic hypervolume improvement.**  NSGA-II minimises each objective's
  lower confidence bound ``mean - kappa * std`` (losses: maximised objectives negated),
  and its final population are the infill candidates.  From them a batch is picked
  greedily: each pick is the candidate whose optimistic losses add the most hypervolume
  to the front of everything evaluated so far plus the points already picked or still
  pending (which count with their predicted mean: a "believer" rule, so one batch
  spreads along the front).  When no candidate improves the front, the most uncertain one
  (largest summed std) is picked instead.  With one objective, hypervolume improvement is
  the improvement of the LCB over the best loss.  Besides NSGA-II's population, the
  candidates may hold the evaluated front's one-change neighbours (each discrete
  dimension of each non-dominated point set to each of its other values, ``neighbours``
  at most; off by default):
  on a component space a front that gains a little per block taken from an expert is
  extended one block at a time, which NSGA-II's population alone may not cover.  At most
  a quarter of a round's batch (at least one) are such neighbours, so the search does
  not turn into a one-block-at-a-time local search.
- **Initial design**: the problem's start point (``include_init``), then ``initial - 1``
  perturbations of it at stratified rates: the k-th point re-draws each dimension with
  probability ``(k + u) / n`` (at least one), so the first points span few to many
  changes from the start.  For a component space starting at the merge this covers the
  storage axis from "almost all merged" to "almost all experts" before any model is
  fitted.  Until two points have succeeded, further points are drawn the same way.
- Never proposes a genome it proposed before (duplicates are dropped from the candidates
  and replaced by fresh perturbations).

Batches: a surrogate round proposes ``max(batch, n)`` points for ``ask(n)``, handed out
in order; later asks take from that queue before another round runs.

State: the base class's event log, plus each surrogate round's proposals and the
generator state after it (``rounds``), so a resumed search replays its rounds from the
record instead of refitting forests and rerunning NSGA-II (replay stays fast and exact;
the base class still checks every replayed candidate against its logged hash).

The router that picks modules per input (MERGE's last stage) is not part of this
strategy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from pydantic import Field

from mergesearch.strategies.base import Dimension, Proposal, Strategy, StrategyOptions, register
from mergesearch.trial import Candidate, Result


class MergeMOEAOptions(StrategyOptions):
    initial: int = Field(10, ge=2)
    """Points of the initial design (the start point counts when ``include_init``), made
    in rounds of ``batch``: the last round is whole, so the design may be a little larger."""
    batch: int = Field(4, ge=1)
    """Points each surrogate round proposes (at least the ``n`` of the ask)."""
    trees: int = Field(32, ge=2)
    """Trees per objective's random forest."""
    min_samples_leaf: int = Field(1, ge=1)
    """The forests' smallest leaf."""
    kappa: float = Field(1.0, ge=0)
    """Optimism of the infill: NSGA-II minimises mean - kappa * std of each loss."""
    pop_size: int = Field(40, ge=4)
    """Population of the NSGA-II run on the surrogate."""
    generations: int = Field(25, ge=1)
    """Generations of the NSGA-II run on the surrogate, per round."""
    include_init: bool = True
    """Propose the problem's start point first."""
    exact_objectives: bool = True
    """Compute the objectives the problem knows exactly (recipe metrics such as storage)
    for each candidate instead of modelling them; False models every objective."""
    neighbours: int = Field(0, ge=0)
    """Infill candidates added to NSGA-II's: genomes one discrete change away from an
    evaluated non-dominated point, at most this many (a seeded sample when there are
    more; e.g. 256); 0, the default, for NSGA-II's alone.  Measured in
    benchmarks/RESULTS.md: more points on a flat front, a lower hypervolume on the hard
    zoo."""


@register
class MergeMOEA(Strategy):
    """Random-forest surrogates, NSGA-II on their lower confidence bounds, hypervolume-
    improvement infill (MERGE's surrogate-assisted MOEA, our choices; see the module)."""

    name = "merge_moea"
    description = ("MERGE: random-forest surrogates + pymoo NSGA-II with optimistic "
                   "hypervolume-improvement infill, for categorical component spaces")
    multi_objective = True
    rng_libraries = ("numpy", "pymoo", "scikit-learn")
    Options = MergeMOEAOptions
    options: MergeMOEAOptions

    # -- state ------------------------------------------------------------------------------

    def _setup(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._global_state = np.random.RandomState(self.seed).get_state()
        self._queue: list[list[float]] = []
        self._seen: set[tuple[float, ...]] = set()
        self._issued = 0
        self._genome_of: dict[int, list[float]] = {}  # candidate id -> genome
        self._X: list[list[float]] = []  # told ok genomes
        self._Y: list[np.ndarray] = []  # and their losses
        self._pending_ids: list[int] = []
        self._rounds: list[dict[str, Any]] = []
        self._phase = "initial"
        self._recorded: list[dict[str, Any]] = list(getattr(self, "_replay_rounds", []))
        self._columns = self._encoding()
        self._exact = ([j for j, o in enumerate(self.problem.objectives)
                        if o.name in self.problem.exact]
                       if self.options.exact_objectives else [])
        self._exact_cache: dict[tuple[float, ...], np.ndarray] = {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rounds": copy.deepcopy(self._rounds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._replay_rounds = list(state.get("rounds", []))
        try:
            super().load_state_dict(state)
        finally:
            self._replay_rounds = []
        self._recorded = []

    # -- encoding -----------------------------------------------------------------------------

    def _encoding(self) -> int:
        cols = 0
        for d in self.problem.dims:
            cols += len(d.choices) if d.kind == "categorical" else 1
        return cols

    def encode(self, genomes: np.ndarray) -> np.ndarray:
        """Genomes (rows) as the forests see them: one-hot categoricals, the rest in [0, 1]."""
        genomes = np.atleast_2d(np.asarray(genomes, dtype=float))
        out = np.zeros((len(genomes), self._columns))
        col = 0
        for j, d in enumerate(self.problem.dims):
            if d.kind == "categorical":
                idx = np.rint(genomes[:, j]).astype(int)
                out[np.arange(len(genomes)), col + idx] = 1.0
                col += len(d.choices)
            else:
                out[:, col] = (genomes[:, j] - d.low) / (d.high - d.low)
                col += 1
        return out

    def exact_losses(self, genomes: Sequence[Sequence[float]]) -> np.ndarray:
        """The losses of the exactly known objectives (columns ``self._exact``), per genome."""
        out = np.zeros((len(genomes), len(self._exact)))
        objectives = self.problem.objectives
        for i, genome in enumerate(genomes):
            key = tuple(float(g) for g in genome)
            if key not in self._exact_cache:
                self._exact_cache[key] = np.array(
                    [objectives[j].sign * self.problem.exact[objectives[j].name](list(key))
                     for j in self._exact])
            out[i] = self._exact_cache[key]
        return out

    def predict(self, surrogate: Surrogate,
                genomes: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
        """Per genome and loss: the surrogate's mean and std (standardised units), the
        exactly known losses computed (std 0)."""
        mu, sd = surrogate.predict(self.encode(np.array(genomes, dtype=float)))
        if self._exact:
            cols = self._exact
            mu[:, cols] = (self.exact_losses(genomes) - surrogate.mean[cols]) / surrogate.std[cols]
            sd[:, cols] = 0.0
        return mu, sd

    # -- ask / tell -------------------------------------------------------------------------

    def _ask(self, n: int) -> list[Proposal]:
        if not self._queue:
            self._fill(n)
        out, self._queue = self._queue[:n], self._queue[n:]
        proposals = []
        for k, genome in enumerate(out):
            self._genome_of[self._next_id + k] = genome
            self._pending_ids.append(self._next_id + k)
            proposals.append(Proposal(genome=genome, meta={"phase": self._phase}))
        return proposals

    def _fill(self, n: int) -> None:
        """Queue the next round's proposals: from the record when replaying one."""
        if self._recorded:
            record = self._recorded.pop(0)
            genomes = [[float(g) for g in x] for x in record["genomes"]]
            self._rng.bit_generator.state = _rng_state(record["rng"])
            self._phase = record["phase"]
        else:
            genomes = self._round(n)
        for g in genomes:
            self._seen.add(tuple(g))
        self._issued += len(genomes)
        self._queue = genomes
        self._rounds.append({"phase": self._phase, "genomes": genomes,
                             "rng": self._rng.bit_generator.state})

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        for cand, result in told:
            self._pending_ids.remove(cand.id)
            genome = self._genome_of.pop(cand.id)
            if result.ok:
                self._X.append(genome)
                self._Y.append(self.problem.losses(result.values))

    # -- one round ------------------------------------------------------------------------

    def _round(self, n: int) -> list[list[float]]:
        size = max(self.options.batch, n)
        p = self.problem
        out: list[list[float]] = []
        if self._issued == 0 and self.options.include_init:
            out.append(p.clip(p.x0))
        if self._issued < self.options.initial or len(self._X) < 2:
            self._phase = "initial"
            strata = max(self.options.initial - int(self.options.include_init), 1)
            while len(out) < size:
                rank = (self._issued + len(out) - int(self.options.include_init)) % strata
                rate = (rank + self._rng.uniform()) / strata
                out.append(self._fresh(p.x0, rate, out))
            return out
        self._phase = "surrogate"
        with self._private_random():
            return self._infill(size)

    def _fresh(self, around: Sequence[float], rate: float,
               extra: Sequence[Sequence[float]] = ()) -> list[float]:
        """A genome never proposed: ``around`` with each dimension re-drawn at ``rate``
        (at least one), retried, then uniform."""
        taken = self._seen | {tuple(e) for e in extra}
        for attempt in range(60):
            r = rate if attempt < 30 else 1.0
            genome = self._perturb(np.asarray(around, dtype=float), r)
            if tuple(genome) not in taken:
                return genome
        return genome  # a space this small is exhausted: a repeat is all there is

    def _perturb(self, around: np.ndarray, rate: float) -> list[float]:
        dims = self.problem.dims
        change = self._rng.uniform(size=len(dims)) < rate
        if not change.any():
            change[self._rng.integers(len(dims))] = True
        genome = [float(g) for g in around]
        for j in np.flatnonzero(change):
            genome[j] = self._draw(dims[j], around[j])
        return genome

    def _draw(self, d: Dimension, current: float) -> float:
        """A new value of one dimension (a discrete one differs from ``current``)."""
        if not d.discrete:
            return float(self._rng.uniform(d.low, d.high))
        values = [v for v in range(int(d.low), int(d.high) + 1) if v != int(current)]
        return float(values[self._rng.integers(len(values))])

    # -- the surrogate and NSGA-II on it ---------------------------------------------------

    def fit(self) -> Surrogate:
        """Forests on the told ok points (one per objective)."""
        return Surrogate.fit(self.encode(np.array(self._X)), np.array(self._Y),
                             trees=self.options.trees, leaf=self.options.min_samples_leaf,
                             seed=int(self._rng.integers(2**31 - 1)), skip=self._exact)

    def _infill(self, size: int) -> list[list[float]]:
        surrogate = self.fit()
        X, Y = np.array(self._X), surrogate.scale(np.array(self._Y))
        candidates, local = self._candidates(surrogate, X, Y)
        local_left = max(1, size // 4)  # neighbours of the front: a quarter of a round
        if candidates:
            mu, sd = self.predict(surrogate, candidates)
        believed = list(Y)
        if self._pending_ids:  # in flight: counted at their predicted mean
            pm, _ = self.predict(surrogate, [self._genome_of[i] for i in self._pending_ids])
            believed += list(pm)
        ref = Y.max(axis=0) + 0.1 * (Y.max(axis=0) - Y.min(axis=0)) + 1e-9
        out: list[list[float]] = []
        free = list(range(len(candidates)))
        kappa = self.options.kappa
        while len(out) < size and free:
            if local_left == 0:
                free = [i for i in free if i < local]
                if not free:
                    break
            lcb = mu[free] - kappa * sd[free]
            gains = _improvements(np.array(believed), lcb, ref)
            best = int(np.argmax(gains))
            if gains[best] <= 0:  # nothing improves the front: the most uncertain
                best = int(np.argmax(sd[free].sum(axis=1)))
            pick = free.pop(best)
            local_left -= pick >= local
            out.append(candidates[pick])
            believed.append(mu[pick])
        while len(out) < size:  # too few new candidates: perturb the front
            elite = X[self._rng.integers(len(X))]
            out.append(self._fresh(elite, 2.0 / self.problem.n_dims, out))
        return out

    def _candidates(self, surrogate: Surrogate, X: np.ndarray,
                    Y: np.ndarray) -> tuple[list[list[float]], int]:
        """NSGA-II's final population on the surrogate's lower bounds, then the front's
        neighbours, new genomes only; and where the neighbours start."""
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.population import Population
        from pymoo.operators.crossover.ux import UniformCrossover
        from pymoo.optimize import minimize

        problem = _SurrogateProblem(self, surrogate, self.options.kappa)
        start = np.array(self._first_population(X, Y), dtype=float)
        algorithm = NSGA2(pop_size=self.options.pop_size,
                          sampling=Population.new(X=start),
                          crossover=UniformCrossover(),
                          mutation=_redraw(self.problem.dims, 1.0 / self.problem.n_dims),
                          eliminate_duplicates=True)
        seed = int(self._rng.integers(1, 2**31 - 1))
        result = minimize(problem, algorithm, ("n_gen", self.options.generations), seed=seed,
                          verbose=False)
        pop = result.pop
        F = pop.get("F")
        order = np.lexsort(F.T[::-1]) if F.ndim == 2 else np.argsort(F)
        out, keys = [], set()

        def add(genomes):
            for genome in genomes:
                if (key := tuple(genome)) not in self._seen and key not in keys:
                    keys.add(key)
                    out.append(genome)

        add(problem.as_genome(pop[i].X) for i in order)
        local = len(out)
        add(self._neighbours(X, Y))
        return out, local

    def _neighbours(self, X: np.ndarray, Y: np.ndarray) -> list[list[float]]:
        """Genomes one discrete change away from an evaluated non-dominated point, not
        proposed before: where a front that gains a little per module changed is
        extended (at most ``neighbours``, a seeded sample of them)."""
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        limit = self.options.neighbours
        if limit == 0:
            return []
        front = (NonDominatedSorting().do(Y, only_non_dominated_front=True) if len(Y) > 1
                 else np.arange(len(Y)))
        out, keys = [], set()
        for i in front:
            for j, d in enumerate(self.problem.dims):
                if not d.discrete:
                    continue
                for v in range(int(d.low), int(d.high) + 1):
                    if v == int(np.rint(X[i, j])):
                        continue
                    genome = [float(g) for g in X[i]]
                    genome[j] = float(v)
                    key = tuple(genome)
                    if key not in self._seen and key not in keys:
                        keys.add(key)
                        out.append(genome)
        if len(out) > limit:
            keep = np.sort(self._rng.choice(len(out), size=limit, replace=False))
            out = [out[k] for k in keep]
        return out

    def _first_population(self, X: np.ndarray, Y: np.ndarray) -> list[list[float]]:
        """The evaluated points by non-dominated rank, then perturbations, then uniform."""
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        size = self.options.pop_size
        fronts = NonDominatedSorting().do(Y) if len(Y) > 1 else [np.arange(len(Y))]
        ranked = [int(i) for f in fronts for i in f]
        out = [list(map(float, X[i])) for i in ranked[:size // 2]]
        keys = {tuple(g) for g in out}
        elites = [X[i] for i in ranked[:max(1, len(fronts[0]))]]
        rate = 2.0 / self.problem.n_dims
        for attempt in range(20 * size):  # a small space may have fewer new points
            if len(out) >= size:
                break
            if len(out) < size - size // 4 and attempt < 10 * size:  # near the front
                g = self._perturb(elites[self._rng.integers(len(elites))], rate)
            else:  # anywhere
                g = self._perturb(X[0], 1.0)
            if tuple(g) not in keys:
                keys.add(tuple(g))
                out.append(g)
        return out

    @contextmanager
    def _private_random(self):
        """Run library code with our own global numpy state; the user's comes back after."""
        users = np.random.get_state()
        np.random.set_state(self._global_state)
        try:
            yield
        finally:
            self._global_state = np.random.get_state()
            np.random.set_state(users)


class Surrogate:
    """One random forest per loss, on standardised targets: mean and trees' std."""

    def __init__(self, forests: list[Any], mean: np.ndarray, scale: np.ndarray,
                 constant: np.ndarray):
        self.forests, self.mean, self.std, self.constant = forests, mean, scale, constant

    @classmethod
    def fit(cls, X: np.ndarray, Y: np.ndarray, *, trees: int = 32, leaf: int = 1,
            seed: int = 0, skip: Sequence[int] = ()) -> Surrogate:
        """Forests on ``X`` for the losses ``Y``; columns in ``skip`` get none (their
        predictions are left at 0: the caller computes them)."""
        from sklearn.ensemble import RandomForestRegressor

        Y = np.atleast_2d(np.asarray(Y, dtype=float).T).T
        mean, scale = Y.mean(axis=0), Y.std(axis=0)
        constant = scale < 1e-12
        scale = np.where(constant, 1.0, scale)
        forests = []
        for j in range(Y.shape[1]):
            if constant[j] or j in skip:
                forests.append(None)
                continue
            forest = RandomForestRegressor(n_estimators=trees, min_samples_leaf=leaf,
                                           max_features=1.0, bootstrap=True, n_jobs=1,
                                           random_state=seed + j)
            forest.fit(X, (Y[:, j] - mean[j]) / scale[j])
            forests.append(forest)
        return cls(forests, mean, scale, constant)

    def scale(self, Y: np.ndarray) -> np.ndarray:
        """Losses in the standardised units the forests predict."""
        return (np.asarray(Y, dtype=float) - self.mean) / self.std

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row and loss: the trees' mean and standard deviation (standardised units)."""
        X = np.ascontiguousarray(np.atleast_2d(X), dtype=np.float32)  # as the trees take it
        mu = np.zeros((len(X), len(self.forests)))
        sd = np.zeros_like(mu)
        for j, forest in enumerate(self.forests):
            if forest is None:
                continue
            per_tree = np.stack([t.tree_.predict(X)[:, 0] for t in forest.estimators_])
            mu[:, j], sd[:, j] = per_tree.mean(axis=0), per_tree.std(axis=0)
        return mu, sd

    def predict_losses(self, X: np.ndarray) -> np.ndarray:
        """The predicted losses in their own units."""
        return self.predict(X)[0] * self.std + self.mean


class _SurrogateProblem:
    """The pymoo problem NSGA-II solves: minimise each loss's lower confidence bound, over
    genomes as arrays (categorical indices and integers rounded, everything clipped)."""

    def __new__(cls, strategy: MergeMOEA, surrogate: Surrogate, kappa: float):
        from pymoo.core.problem import Problem as PymooProblem

        dims = strategy.problem.dims
        low = np.array([d.low for d in dims], dtype=float)
        high = np.array([d.high for d in dims], dtype=float)
        discrete = np.array([d.discrete for d in dims])

        class Optimistic(PymooProblem):
            def _evaluate(self, x: Any, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
                mu, sd = strategy.predict(surrogate, self.snap(x))
                out["F"] = mu - kappa * sd

            @staticmethod
            def snap(x: np.ndarray) -> np.ndarray:
                x = np.clip(np.atleast_2d(np.asarray(x, dtype=float)), low, high)
                return np.where(discrete, np.rint(x), x)

            @classmethod
            def as_genome(cls, row: np.ndarray) -> list[float]:
                return strategy.problem.clip([float(g) for g in cls.snap(row)[0]])

        return Optimistic(n_var=len(dims), n_obj=len(strategy.problem.objectives),
                          xl=low, xu=high)


def _redraw(dims: Sequence[Dimension], rate: float):
    """pymoo mutation over genome arrays: each dimension re-drawn with probability ``rate``
    (at least one per child): a discrete one to another of its values, uniformly, a real
    one uniform in its bounds."""
    from pymoo.core.mutation import Mutation

    class Redraw(Mutation):
        def _do(self, problem: Any, X: np.ndarray, *args: Any, random_state: Any = None,
                **kwargs: Any) -> np.ndarray:
            X = np.array(X, dtype=float)
            n, m = X.shape
            change = random_state.random((n, m)) < rate
            none = np.flatnonzero(~change.any(axis=1))
            change[none, random_state.integers(m, size=len(none))] = True
            for j, d in enumerate(dims):
                rows = np.flatnonzero(change[:, j])
                if d.discrete:
                    size = int(d.high) - int(d.low) + 1
                    if size < 2:
                        continue
                    shift = random_state.integers(1, size, size=len(rows))
                    current = np.rint(X[rows, j]) - d.low
                    X[rows, j] = d.low + (current + shift) % size
                else:
                    X[rows, j] = random_state.uniform(d.low, d.high, size=len(rows))
            return X

    return Redraw()


def _improvements(front: np.ndarray, points: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """How much each of ``points`` (rows, losses) adds to the hypervolume of ``front``
    bounded by ``ref``; with one loss, how far it goes below the best."""
    if front.shape[1] == 1:
        return np.maximum(0.0, front[:, 0].min() - points[:, 0])
    from pymoo.indicators.hv import HV

    front = _non_dominated(front[np.all(front < ref, axis=1)])
    hv = HV(ref_point=ref)
    base = float(hv(front)) if len(front) else 0.0
    gains = np.zeros(len(points))
    for i, p in enumerate(points):
        if not np.all(p < ref):
            continue
        if len(front) and np.any(np.all(front <= p, axis=1)):
            continue  # dominated (or equalled): adds nothing
        gains[i] = float(hv(np.vstack([front, p]) if len(front) else p[None])) - base
    return gains


def _non_dominated(points: np.ndarray) -> np.ndarray:
    if len(points) < 2:
        return points
    keep = [not np.any(np.all(points <= p, axis=1) & np.any(points < p, axis=1))
            for p in points]
    return np.unique(points[keep], axis=0)


def _rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """A generator state read back from JSON (ints stay ints: nothing to convert)."""
    return {k: (_rng_state(v) if isinstance(v, dict) else v) for k, v in state.items()}
