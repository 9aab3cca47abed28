"""Cheap fitness: predict a candidate's full-set score from its answers on a few items.

Three estimators, each built once per (task, metric) from the full-set answers of some
calibration models (the source models, and possibly a few merges), then asked many times:

* ``subset``: a seeded random sample of ``k`` items; the estimate is their mean.  Needs no
  calibration.
* ``anchors`` (tinyBenchmarks' anchor points): cluster the items by the calibration
  models' answers (k-means on each item's vector of per-model scores), keep per cluster
  the item nearest its centre, weighted by the cluster's share of the items; the estimate
  is the weighted sum of the anchors' scores.  Exact when every cluster is homogeneous.
* ``irt``: a two-parameter logistic item-response model, ``P(item i right | model j) =
  sigmoid(a_i . theta_j - b_i)``, fitted once on the calibration models' answers (a MAP
  fit with Gaussian priors, L-BFGS from a seeded start: deterministic).  A candidate's
  ability ``theta`` is fitted from its answers on ``k`` items with the item parameters
  held fixed; the prediction of the full-set mean (p-IRT) is the seen items' scores plus
  the model's probabilities on the unseen ones.  The blended prediction (gp-IRT) is
  ``lam * subset mean + (1 - lam) * p-IRT``, with ``lam`` the share of the p-IRT error
  in the two errors, both measured on the calibration models: our own choice of ``lam``
  (tinyBenchmarks tunes it on held-out models; MERGE³'s gmp-IRT blends the same way).

Scores may be fractional (character accuracy): the IRT likelihood is then the Bernoulli
cross-entropy with soft targets.  Everything here is numpy / scipy / scikit-learn on
small matrices; nothing touches a model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from .base import EvaluationError

KINDS = ("full", "subset", "anchors", "irt")
NEEDS_CALIBRATION = ("anchors", "irt")


def subset_items(n: int, k: int, seed: int | str) -> list[int]:
    """``k`` of ``n`` item positions, a seeded random sample, sorted."""
    if not 0 < k <= n:
        raise EvaluationError(f"a subset of {k} items from a task of {n}: choose 1..{n}")
    order = list(range(n))
    random.Random(f"estimator:{seed}").shuffle(order)
    return sorted(order[:k])


# -- IRT ----------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


@dataclass
class IRT:
    """Fitted item parameters: discriminations ``a`` [items, dims], difficulties ``b``
    [items]; ``theta`` [models, dims] the calibration models' abilities."""

    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray

    def prob(self, theta: np.ndarray, items: Sequence[int] | None = None) -> np.ndarray:
        a, b = (self.a, self.b) if items is None else (self.a[items], self.b[items])
        return _sigmoid(np.atleast_2d(theta) @ a.T - b)

    def ability(self, scores: Sequence[float], items: Sequence[int],
                prior: float = 1.0) -> np.ndarray:
        """The MAP ability of a model that scored ``scores`` on ``items`` (parameters
        fixed; a standard normal prior of precision ``prior``)."""
        y = np.asarray(scores, dtype=float)
        a, b = self.a[list(items)], self.b[list(items)]

        def loss(t: np.ndarray) -> tuple[float, np.ndarray]:
            z = a @ t - b
            p = np.clip(_sigmoid(z), 1e-12, 1 - 1e-12)
            value = -np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)) + 0.5 * prior * t @ t
            return float(value), a.T @ (p - y) + prior * t

        start = np.zeros(a.shape[1])
        return minimize(loss, start, jac=True, method="L-BFGS-B").x

    def predict(self, scores: Sequence[float], items: Sequence[int]) -> float:
        """p-IRT: the full-set mean, the seen items' scores plus the unseen ones' odds."""
        items = list(items)
        p = self.prob(self.ability(scores, items))[0]
        p[items] = np.asarray(scores, dtype=float)
        return float(p.mean())


def fit_irt(answers: np.ndarray, *, dims: int = 1, seed: int = 0, prior_theta: float = 1.0,
            prior_a: float = 1.0, prior_b: float = 0.1, max_iter: int = 2000) -> IRT:
    """Fit a ``dims``-dimensional 2PL model on ``answers`` [models, items] in [0, 1]
    (NaN: not answered).  MAP with priors ``theta ~ N(0, 1/prior_theta)``, ``a ~ N(1,
    1/prior_a)``, ``b ~ N(0, 1/prior_b)``; L-BFGS from a ``seed``-seeded start."""
    y = np.asarray(answers, dtype=float)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 1:
        raise EvaluationError(f"IRT needs answers of two or more models on one or more "
                              f"items, got an array of shape {y.shape}")
    mask = ~np.isnan(y)
    y = np.where(mask, y, 0.0)
    if ((y < 0) | (y > 1)).any():
        raise EvaluationError("IRT answers must be scores in [0, 1]")
    m, n = y.shape
    rng = np.random.default_rng(seed)
    mean = np.clip((y * mask).sum(0) / np.maximum(mask.sum(0), 1), 0.02, 0.98)
    row = np.clip((y * mask).sum(1) / np.maximum(mask.sum(1), 1), 0.02, 0.98)
    theta0 = np.log(row / (1 - row))[:, None] - np.log(row / (1 - row)).mean()
    theta0 = theta0 / (theta0.std() + 1e-9)
    theta0 = np.hstack([theta0, rng.normal(0, 0.1, (m, dims - 1))]) if dims > 1 else theta0
    x0 = np.concatenate([theta0.ravel(), np.ones(n * dims) + rng.normal(0, 0.01, n * dims),
                         -np.log(mean / (1 - mean))])
    centre = np.ones((n, dims))

    def unpack(x: np.ndarray):
        return (x[: m * dims].reshape(m, dims), x[m * dims: (m + n) * dims].reshape(n, dims),
                x[(m + n) * dims:])

    def loss(x: np.ndarray) -> tuple[float, np.ndarray]:
        theta, a, b = unpack(x)
        p = np.clip(_sigmoid(theta @ a.T - b), 1e-12, 1 - 1e-12)
        nll = -np.sum(mask * (y * np.log(p) + (1 - y) * np.log(1 - p)))
        value = (nll + 0.5 * prior_theta * np.sum(theta ** 2)
                 + 0.5 * prior_a * np.sum((a - centre) ** 2) + 0.5 * prior_b * np.sum(b ** 2))
        g = mask * (p - y)
        grad = np.concatenate([(g @ a + prior_theta * theta).ravel(),
                               (g.T @ theta + prior_a * (a - centre)).ravel(),
                               -g.sum(0) + prior_b * b])
        return float(value), grad

    x = minimize(loss, x0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter}).x
    theta, a, b = unpack(x)
    return IRT(a=a.copy(), b=b.copy(), theta=theta.copy())


# -- anchors -------------------------------------------------------------------------------


def anchor_points(answers: np.ndarray, k: int, seed: int = 0) -> tuple[list[int], list[float]]:
    """``k`` representative items of ``answers`` [models, items] and their weights: k-means
    on the items' answer vectors, the item nearest each centre, weighted by its cluster's
    share.  Fewer than ``k`` when the items have fewer distinct answer vectors."""
    from sklearn.cluster import KMeans

    y = np.asarray(answers, dtype=float)
    n = y.shape[1]
    if not 0 < k <= n:
        raise EvaluationError(f"{k} anchor points from a task of {n} items: choose 1..{n}")
    points = y.T
    distinct = len(np.unique(points, axis=0))
    k = min(k, distinct)
    if k == n:
        return list(range(n)), [1.0 / n] * n
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points)
    items, weights = [], []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        dist = ((points[members] - km.cluster_centers_[c]) ** 2).sum(1)
        items.append(int(members[np.argmin(dist)]))
        weights.append(len(members) / n)
    order = np.argsort(items)
    return [items[i] for i in order], [weights[i] for i in order]


# -- estimators ------------------------------------------------------------------------------


class Estimator:
    """Which items of one task to score, and how to predict the full-set mean from them."""

    kind: str
    items: list[int]

    def predict(self, scores: Sequence[float]) -> dict[str, float]:
        """``{"estimate": ..., ...}``: the prediction, and any variants (p-IRT, gp-IRT)."""
        raise NotImplementedError

    def _check(self, scores: Sequence[float]) -> np.ndarray:
        y = np.asarray(scores, dtype=float)
        if y.shape != (len(self.items),):
            raise EvaluationError(f"{self.kind} estimator: {y.size} scores for "
                                  f"{len(self.items)} items")
        return y


class SubsetEstimator(Estimator):
    kind = "subset"

    def __init__(self, n: int, k: int, seed: int | str = 0):
        self.n = n
        self.items = subset_items(n, k, seed)

    def predict(self, scores: Sequence[float]) -> dict[str, float]:
        return {"estimate": float(self._check(scores).mean())}


class AnchorEstimator(Estimator):
    kind = "anchors"

    def __init__(self, answers: np.ndarray, k: int, seed: int = 0):
        self.n = np.asarray(answers).shape[1]
        self.items, self.weights = anchor_points(answers, k, seed)

    def predict(self, scores: Sequence[float]) -> dict[str, float]:
        return {"estimate": float(np.dot(self.weights, self._check(scores)))}


class IRTEstimator(Estimator):
    """p-IRT and gp-IRT over ``k`` items chosen at random (``select="random"``) or as anchor
    points (``"anchors"``); ``estimate`` is gp-IRT when ``blend``, else p-IRT."""

    kind = "irt"

    def __init__(self, answers: np.ndarray, k: int, seed: int = 0, *, select: str = "random",
                 blend: bool = True, dims: int = 1):
        y = np.asarray(answers, dtype=float)
        self.n = y.shape[1]
        if select == "anchors":
            self.items = anchor_points(y, k, seed)[0]
        elif select == "random":
            self.items = subset_items(self.n, k, seed)
        else:
            raise EvaluationError(f"irt select {select!r}: use random or anchors")
        self.blend = blend
        self.model = fit_irt(y, dims=dims, seed=seed)
        # the blend weight from the calibration models: p-IRT's squared error, and the
        # subset mean's sampling variance (finite population), on the same items
        k_ = len(self.items)
        truth = y.mean(1)
        pirt = np.array([self.model.predict(row[self.items], self.items) for row in y])
        err_irt = float(np.mean((pirt - truth) ** 2))
        frac = (self.n - k_) / max(self.n - 1, 1)
        err_obs = float(np.mean(y.var(1, ddof=1) / k_ * frac)) if self.n > 1 else 0.0
        total = err_irt + err_obs
        self.lam = err_irt / total if total > 0 else 0.5

    def predict(self, scores: Sequence[float]) -> dict[str, float]:
        y = self._check(scores)
        pirt = self.model.predict(y, self.items)
        gpirt = self.lam * float(y.mean()) + (1 - self.lam) * pirt
        return {"estimate": gpirt if self.blend else pirt, "pirt": pirt, "gpirt": gpirt}


def make_estimator(kind: str, n: int, k: int, *, seed: int | str = 0,
                   answers: np.ndarray | None = None, **options) -> Estimator:
    """An estimator of a task of ``n`` items scoring ``k`` of them; ``answers`` [models,
    n] are the calibration models' full-set scores (anchors and irt need them)."""
    if kind not in KINDS or kind == "full":
        raise EvaluationError(f"unknown estimator {kind!r}; choose one of "
                              f"{', '.join(k for k in KINDS if k != 'full')} (or full)")
    if not 0 < k <= n:
        raise EvaluationError(f"estimator {kind}: {k} items from a task of {n}: choose "
                              f"1..{n}")
    if kind == "subset":
        return SubsetEstimator(n, k, seed)
    if answers is None or np.asarray(answers).shape[0] < 2:
        raise EvaluationError(f"estimator {kind} needs the full-set answers of two or more "
                              "calibration models (evaluator.estimator.sources)")
    answers = np.asarray(answers, dtype=float)
    if answers.shape[1] != n:
        raise EvaluationError(f"estimator {kind}: calibration answers cover "
                              f"{answers.shape[1]} items, the task has {n}")
    seed = seed if isinstance(seed, int) else _int_seed(seed)
    if kind == "anchors":
        return AnchorEstimator(answers, k, seed)
    return IRTEstimator(answers, k, seed, **options)


def _int_seed(key: str) -> int:
    return random.Random(key).randrange(2 ** 31)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (NaN when either side is constant)."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)
