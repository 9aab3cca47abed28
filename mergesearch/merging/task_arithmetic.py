"""Task-vector merges: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA.

All share one shape: sparsify each task vector ``tau_i = theta_i - theta_base``,
weight it, optionally keep only entries that agree with an elected sign
(TIES consensus), sum, optionally normalise by the summed weights, scale by
``lambda`` and add to the base.  Defaults follow mergekit 0.1.5 so recipes mean
the same in both tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from mergesearch.merging import sparsify
from mergesearch.merging.base import MergeMethod, Param, register


def combine(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weight: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Weighted sum of (already sparsified) deltas added to the base.

    With ``consensus`` the sign of each entry is elected as the sign of the
    weighted sum (ties go to +), and only weighted deltas of that sign count,
    in the sum and in the normalising divisor.
    """
    w = torch.tensor(weight, dtype=base.dtype, device=base.device)
    w = w.reshape(-1, *([1] * base.dim()))
    weighted = torch.stack(list(deltas)) * w
    if consensus:
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(base.dtype)
        agree = weighted.sign() == elected
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


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
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    deltas = []
    for i, model in enumerate(models):
        tau = model - base
        if sparsifier == "magnitude":
            tau = sparsify.magnitude(tau, density[i])
        elif sparsifier == "random":
            tau = sparsify.random(tau, density[i], generator, rescale)
        elif sparsifier == "outliers":
            tau = sparsify.outliers(tau, density[i], gamma[i])
        elif sparsifier == "magprune":
            tau = sparsify.magprune(tau, density[i], epsilon[i], generator, rescale)
        deltas.append(tau)
    return combine(
        base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


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
