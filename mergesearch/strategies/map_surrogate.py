"""The maths of MAP (amortised Pareto fronts via quadratic approximation, 2024), with no
strategy bookkeeping: the design, the quadratic-through-a-link surrogate and its fit, the
surrogate front (NSGA-III) and the preference choice.

Everything works in *unit coordinates* ``z`` (the strategy maps them to genomes), so one
quadratic serves a search over ``[0, 1]`` weights and one over ``[-300, -100]`` alike.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np

Link = Literal["sigmoid", "softplus", "identity"]
#: candidate pool size for the design's greedy selection
POOL = 20_000


def n_coefficients(n: int) -> int:
    """Coefficients of a full quadratic in ``n`` variables: constant, linear, squares and
    cross terms, ``(n + 1)(n + 2) / 2``."""
    return (n + 1) * (n + 2) // 2


def features(z: np.ndarray) -> np.ndarray:
    """Rows ``[1, z_1..z_n, z_i z_j (i <= j)]`` of the quadratic's design matrix."""
    z = np.atleast_2d(np.asarray(z, dtype=float))
    i, j = np.triu_indices(z.shape[1])
    return np.hstack([np.ones((len(z), 1)), z, z[:, i] * z[:, j]])


def design(n: int, count: int | None = None, seed: int = 0) -> np.ndarray:
    """MAP's design in ``[0, 1]^n``: the ``n`` one-hot points, then grid points (one-hot,
    sum-to-one and all-equal points excluded, as the paper holds those out) picked greedily
    by their leverage under the quadratic (a sequential D-optimal design), until ``count``
    distinct points (default ``(n + 1)(n + 2)``).  Our choice: greedy leverage rather than
    the paper's unstated subset, so the quadratic is always identifiable (a pure 0/1 grid
    confounds ``z_i`` with ``z_i^2``)."""
    count = 2 * n_coefficients(n) if count is None else int(count)
    onehot = np.eye(n)
    if count <= n:
        return onehot[:count].copy()
    pool = _pool(n, seed)
    chosen = [*onehot]
    F = features(pool)
    p = F.shape[1]
    inv = np.eye(p) / 1e-6  # (X^T X + 1e-6 I)^-1, updated point by point (Sherman-Morrison)
    for row in features(onehot):
        inv = _rank_one(inv, row)
    leverage = np.einsum("ij,jk,ik->i", F, inv, F)
    while len(chosen) < count and np.isfinite(leverage).any():
        k = int(np.argmax(leverage))
        chosen.append(pool[k])
        v = inv @ F[k]  # the leverages after adding row k, without a new inverse
        leverage -= (F @ v) ** 2 / (1.0 + F[k] @ v)
        inv = _rank_one(inv, F[k])
        leverage[k] = -np.inf
    return np.array(chosen)


def _rank_one(inv: np.ndarray, row: np.ndarray) -> np.ndarray:
    v = inv @ row
    return inv - np.outer(v, v) / (1.0 + row @ v)


def _pool(n: int, seed: int) -> np.ndarray:
    """Grid points in ``[0, 1]^n`` the design picks from: a full grid of 3 to 5 levels (21
    for one variable) when it has at most :data:`POOL` points, else :data:`POOL` random
    points of the 3-level grid."""
    levels = 21 if n == 1 else max(k for k in (3, 4, 5) if k == 3 or k**n <= POOL)
    grid = np.linspace(0.0, 1.0, levels)
    if levels**n <= POOL:
        pool = np.array(list(itertools.product(grid, repeat=n)))
    else:
        rng = np.random.default_rng(np.random.SeedSequence([seed, n, 17]))
        pool = np.unique(grid[rng.integers(0, levels, size=(POOL, n))], axis=0)
    onehot = (np.isclose(pool, 1.0).sum(axis=1) == 1) & (np.isclose(pool, 0.0).sum(axis=1)
                                                           == n - 1)
    sums_to_one = np.isclose(pool.sum(axis=1), 1.0)
    all_equal = np.isclose(pool.max(axis=1), pool.min(axis=1))
    if n == 1:  # every point is "all equal": hold out only the one-hot point
        return pool[~onehot]
    return pool[~(onehot | sums_to_one | all_equal)]


# -- the surrogate -------------------------------------------------------------------------

def _apply(link: Link, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The link's value and derivative at ``t``."""
    if link == "sigmoid":
        s = 0.5 * (1.0 + np.tanh(0.5 * t))  # overflow-free logistic
        return s, s * (1.0 - s)
    if link == "softplus":
        return np.logaddexp(0.0, t), 0.5 * (1.0 + np.tanh(0.5 * t))
    return t, np.ones_like(t)


def _inverse(link: Link, y: np.ndarray) -> np.ndarray:
    if link == "sigmoid":
        y = np.clip(y, 1e-3, 1 - 1e-3)
        return np.log(y) - np.log1p(-y)
    if link == "softplus":
        y = np.maximum(y, 1e-3)
        return y + np.log(-np.expm1(-y))
    return y


def choose_link(values: np.ndarray) -> Link:
    """``sigmoid`` for values in [0, 1] (accuracies), ``softplus`` for non-negative ones
    (losses), else ``identity``."""
    values = np.asarray(values, dtype=float)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        return "sigmoid"
    if values.size and values.min() >= 0.0:
        return "softplus"
    return "identity"


@dataclass(frozen=True)
class Quadratic:
    """``M~(z) = link(w . features(z))``: one task metric's surrogate."""

    w: np.ndarray
    link: Link

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return _apply(self.link, features(z) @ self.w)[0]


def fit(z: np.ndarray, y: np.ndarray, link: Link | None = None,
        ridge: float = 1e-6) -> Quadratic:
    """The quadratic-through-``link`` that fits ``y`` at ``z`` by nonlinear least squares
    (``scipy.optimize.least_squares``, analytic Jacobian), started from the linear fit of
    the inverse-linked targets; ``ridge`` (on every coefficient but the constant) keeps the
    fit unique when there are fewer points than coefficients."""
    from scipy.optimize import least_squares

    z, y = np.atleast_2d(np.asarray(z, dtype=float)), np.asarray(y, dtype=float)
    link = link or choose_link(y)
    F = features(z)
    p = F.shape[1]
    penalty = math.sqrt(ridge) * np.eye(p)[1:]
    target = _inverse(link, y)
    A = np.vstack([F, penalty]) if ridge > 0 else F
    b = np.concatenate([target, np.zeros(p - 1)]) if ridge > 0 else target
    w0 = np.linalg.lstsq(A, b, rcond=None)[0]
    if link == "identity":
        return Quadratic(w0, link)

    def residual(w: np.ndarray) -> np.ndarray:
        r = _apply(link, F @ w)[0] - y
        return np.concatenate([r, penalty @ w]) if ridge > 0 else r

    def jacobian(w: np.ndarray) -> np.ndarray:
        J = _apply(link, F @ w)[1][:, None] * F
        return np.vstack([J, penalty]) if ridge > 0 else J

    done = least_squares(residual, w0, jac=jacobian, method="trf", xtol=1e-12, ftol=1e-12,
                         gtol=1e-12, max_nfev=200 * p)
    return Quadratic(done.x, link)


# -- the surrogate front --------------------------------------------------------------------

@contextmanager
def private_global_random(seed: int) -> Iterator[None]:
    """Run with a global numpy state of our own (in case a library draws from it), the
    caller's restored after."""
    users = np.random.get_state()
    np.random.seed(seed % (2**32))
    try:
        yield
    finally:
        np.random.set_state(users)


#: fronts already computed in this process, by their inputs' digest: a replayed state (a
#: resumed search) reruns the same NSGA-III searches, which are pure functions of these
_FRONTS: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_CACHED = 256


def surrogate_front(models: list[Quadratic], signs: np.ndarray, low: np.ndarray,
                    high: np.ndarray, *, seed: int, pop_size: int = 100,
                    generations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The surrogates' Pareto front over the box ``[low, high]``: NSGA-III (pymoo; SBX and
    polynomial mutation with eta 20, ``mu = lambda = pop_size``) on the losses
    ``signs * M~(z)``; with one objective, pymoo's GA with the same operators, its final
    population sorted.  Returns ``(Z, predicted values)`` (values, not losses)."""
    digest = hashlib.sha256()
    for part in (*[m.w for m in models], signs, low, high):
        digest.update(np.ascontiguousarray(part, dtype=float).tobytes())
    digest.update(repr(([m.link for m in models], seed, pop_size, generations)).encode())
    key = digest.hexdigest()
    if key in _FRONTS:
        _FRONTS.move_to_end(key)
        Z, V = _FRONTS[key]
        return Z.copy(), V.copy()
    Z, V = _front(models, signs, low, high, seed, pop_size, generations)
    _FRONTS[key] = (Z.copy(), V.copy())
    while len(_FRONTS) > _CACHED:
        _FRONTS.popitem(last=False)
    return Z, V


def _front(models: list[Quadratic], signs: np.ndarray, low: np.ndarray, high: np.ndarray,
           seed: int, pop_size: int, generations: int) -> tuple[np.ndarray, np.ndarray]:
    from pymoo.core.problem import Problem as PymooProblem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.optimize import minimize

    signs = np.asarray(signs, dtype=float)

    class Surrogates(PymooProblem):
        def _evaluate(self, x, out, *args, **kwargs):  # noqa: ANN001
            out["F"] = np.column_stack([s * m(x) for s, m in zip(signs, models, strict=True)])

    problem = Surrogates(n_var=len(low), n_obj=len(models), xl=low, xu=high)
    operators = {"crossover": SBX(eta=20, prob=0.9), "mutation": PM(eta=20)}
    if len(models) > 1:
        from pymoo.algorithms.moo.nsga3 import NSGA3

        algorithm = NSGA3(ref_dirs=_directions(len(models), pop_size), pop_size=pop_size,
                          n_offsprings=pop_size, **operators)
    else:
        from pymoo.algorithms.soo.nonconvex.ga import GA

        algorithm = GA(pop_size=pop_size, n_offsprings=pop_size, **operators)
    with private_global_random(seed):
        res = minimize(problem, algorithm, ("n_gen", generations), seed=seed % (2**31 - 1) + 1,
                       verbose=False)
    if len(models) > 1:  # the final population's non-dominated members
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        X, F = res.pop.get("X"), res.pop.get("F")
        Z = X[np.sort(NonDominatedSorting().do(F, only_non_dominated_front=True))]
    else:  # the whole final population, best first
        pop = res.pop
        Z = pop.get("X")[np.argsort(pop.get("F")[:, 0], kind="stable")]
    Z = np.clip(Z, low, high)
    values = np.column_stack([m(Z) for m in models])
    return Z, values


def _directions(m: int, pop_size: int) -> np.ndarray:
    """Das-Dennis reference directions, as many as fit in the population."""
    from pymoo.util.ref_dirs import get_reference_directions

    partitions = 1
    while math.comb(partitions + 1 + m - 1, m - 1) <= pop_size:
        partitions += 1
    return get_reference_directions("das-dennis", m, n_partitions=partitions)


def spread(points: np.ndarray, first: int, k: int, avoid: np.ndarray | None = None,
           ) -> list[int]:
    """Indices of ``k`` rows of ``points`` spread out: ``first``, then each time the row
    farthest (each column scaled to its range) from those chosen and from ``avoid``."""
    points = np.asarray(points, dtype=float)
    scale = np.ptp(points, axis=0)
    scale[scale == 0] = 1.0
    p = points / scale
    chosen = [first]
    near = np.linalg.norm(p - p[first], axis=1)
    if avoid is not None and len(avoid):
        a = np.asarray(avoid, dtype=float) / scale
        near = np.minimum(near, np.min(np.linalg.norm(p[:, None] - a[None], axis=2), axis=1))
    while len(chosen) < min(k, len(points)):
        near[chosen] = -np.inf
        j = int(np.argmax(near))
        if near[j] <= 0:
            break
        chosen.append(j)
        near = np.minimum(near, np.linalg.norm(p - p[j], axis=1))
    return chosen
