"""BMM's closed-form inner merge and RegMean: per linear module, a ridge regression.

For a linear module ``y = x W^T`` with weights ``W_t`` in source ``t`` and a Gram
matrix ``G_t`` of its inputs (``in x in``), the merge that best reproduces every
source's outputs on those inputs, pulled toward an anchor merge ``W_a``, is

    W* = argmin_W  sum_t ||X_t (W - W_t)^T||^2 + lam ||W - W_a||^2
       = (sum_t W_t G_t + lam W_a) (sum_t G_t + lam I)^-1

(BMM's inner step as we derive it from the abstract).  ``G_t`` comes either

* from **activations**: ``X_t^T X_t`` of the inputs the module sees when source
  ``t`` runs on calibration items, the context's ``input_gram`` statistic that a
  worker collects once per source (:mod:`mergesearch.execution.calibration`); or
* **data-free**, from the task vector: ``G_t = tau_t^T tau_t`` with
  ``tau_t = W_t - W_base``, so each source counts in the input directions it changed.

Our choices: ``lambda`` is relative, in units of the mean eigenvalue of ``sum_t G_t``
(``trace / in``), so one value means the same in every module and for either Gram
source; ``scale`` then scales the merged change from the base,
``base + scale (W* - base)``, the second hyperparameter the outer search tunes.
Each source's ``weight`` scales its anchor task vector and, clipped at zero, its Gram
(how much its outputs count in the fit); equal weights leave the fit unchanged,
since ``lambda`` is relative.  ``lambda_log2`` multiplies ``lambda`` by ``2 **
lambda_log2``: a space searches it for a log-scale ridge strength, which reaches both
ends, the pure fit (RegMean-like) and the anchor (task arithmetic with the searched
weights), where a linear ``lambda`` in [0, 4] reaches neither the anchor nor much of the
low end.  Two options of the fit, off by default: ``weighted_targets`` fits each
source's *weighted* change ``base + w_t tau_t`` instead of the source itself (with inputs
in separate directions and ``lambda`` 0 the fit is then task arithmetic with those
weights; by default a weight only sets a source's say, so its size hardly matters in the
fit), ``gram_norm`` scales each source's Gram to mean eigenvalue 1 before its
weight (a source with a large task vector, data-free, or large activations no longer
dominates the fit), ``alpha`` < 1 shrinks the Grams' off-diagonal entries as RegMean
does, and ``skip_unchanged`` leaves a source out of the fit of a tensor it
left as the base's (an expert trained on some layers only: its activation Gram would
pull the other sources' changes there back toward the base; data-free Grams are zero
there already).
The anchor is task arithmetic, or TIES with ``ties: true``, computed by those
methods' own functions.  Tensors that are not linear weights (norms, embeddings,
biases) take the anchor.  Which tensors are linear: those with an ``input_gram``
(nn.Linear weights of the source model, input features = ``weight.shape[1]``) for
activations; 2-D tensors outside embeddings for data-free Grams.

Activation Grams need a worker that collects them
(:class:`~mergesearch.execution.calibration.CalibratingWorker`); a merge without them
(a plain function call, another worker) uses data-free Grams, RegMean the average, and
says so once in the log.

RegMean (Jin et al. 2023) is the case ``lam -> 0`` with activation Grams, with the
paper's ``alpha`` shrinking the Grams' off-diagonal entries; its non-linear tensors
are the plain average of the models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from mergesearch.merging.base import MergeMethod, Param, register
from mergesearch.merging.context import TensorContext
from mergesearch.merging.task_arithmetic import TASK_ARITHMETIC, TIES

log = logging.getLogger(__name__)

INPUT_GRAM = "input_gram"
"""The context statistic answering a linear weight's input Gram in one source (or None
for a tensor that is not the weight of a linear module)."""

EMBEDDING_PARTS = ("embed", "wte", "wpe")
"""Name parts that mark a 2-D tensor as an embedding table, not a linear weight."""


def is_linear_name(name: str) -> bool:
    """Whether a 2-D tensor of this name is taken as a linear weight by data-free Grams."""
    module = name.rsplit(".", 1)[0].lower()
    return not any(part in module for part in EMBEDDING_PARTS)


def ridge_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                anchor: torch.Tensor | None, lam: float) -> torch.Tensor:
    """``(sum_t W_t G_t + lam W_a)(sum_t G_t + lam I)^-1`` in float64 (absolute ``lam``;
    ``lam = 0`` is RegMean, solved by least squares where the summed Gram is singular)."""
    dtype = weights[0].dtype
    total = sum(g.double() for g in grams)
    rhs = sum(w.double() @ g.double() for w, g in zip(weights, grams, strict=True))
    if lam > 0:
        total = total + lam * torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
        rhs = rhs + lam * anchor.double()
    # total is symmetric: W* = rhs total^-1  <=>  total W*^T = rhs^T
    try:
        out = torch.linalg.solve(total, rhs.T).T
    except RuntimeError:  # singular (lam = 0 with fewer inputs than features)
        out = None
    if out is None or not bool(torch.isfinite(out).all()):
        out = (torch.linalg.pinv(total, hermitian=True) @ rhs.T).T
    return out.to(dtype)


def relative_lambda(grams: Sequence[torch.Tensor], lam: float) -> float:
    """``lam`` in units of the mean eigenvalue of the summed Gram (its trace / size)."""
    trace = float(sum(torch.diagonal(g).sum() for g in grams))
    return lam * trace / grams[0].shape[0]


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's shrink: the Gram's off-diagonal entries times ``alpha``
    (``alpha G + (1 - alpha) diag(G)``)."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def calibrated(context: TensorContext | None) -> bool:
    """Whether the context answers activation Grams (a calibrating worker's merge)."""
    return context is not None and context.provides(INPUT_GRAM)


_warned: set[str] = set()


def _uncalibrated(method: str, fallback: str) -> None:
    """Say once per method that activation Grams are missing and what is used instead."""
    if method not in _warned:
        _warned.add(method)
        log.warning("%s: no activation Grams in this merge (set execution.worker_class: "
                    "mergesearch.execution.calibration:CalibratingWorker); using %s",
                    method, fallback)


def _activation_grams(context: TensorContext, n: int) -> list[torch.Tensor] | None:
    """Each source's input Gram of this tensor from the context (None: not a linear
    weight)."""
    grams = [context.stat(INPUT_GRAM, i) for i in range(n)]
    if any(g is None for g in grams):
        return None
    return grams


def _anchor(base: torch.Tensor, models: Sequence[torch.Tensor], *, ties: bool,
            weight: Sequence[float], density: Sequence[float], normalize: bool,
            seed: int) -> torch.Tensor:
    if ties:
        return TIES.fn(base, list(models), weight=list(weight), density=list(density),
                       normalize=normalize, lambda_=1.0, seed=seed)
    return TASK_ARITHMETIC.fn(base, list(models), weight=list(weight), normalize=normalize,
                              lambda_=1.0, seed=seed)


def bmm_merge(base: torch.Tensor, models: Sequence[torch.Tensor], *, lambda_: float = 1.0,
              scale: float = 1.0, activations: bool = True, ties: bool = False,
              weight: Sequence[float] | None = None, density: Sequence[float] | None = None,
              normalize: bool = False, lambda_log2: float = 0.0,
              weighted_targets: bool = False, gram_norm: bool = False,
              skip_unchanged: bool = False, alpha: float = 1.0,
              context: TensorContext | None = None, seed: int = 0) -> torch.Tensor:
    """BMM's inner merge of one tensor (see the module docstring).  Without activation
    Grams (a plain function call, or a merge on a worker that does not calibrate: logged
    once) data-free ones are used."""
    n = len(models)
    weight = [1.0] * n if weight is None else weight
    density = [1.0] * n if density is None else density
    anchor = _anchor(base, models, ties=ties, weight=weight, density=density,
                     normalize=normalize, seed=seed)
    grams = None
    if activations and not calibrated(context) and context is not None:
        _uncalibrated("bmm", "data-free Grams")
    if base.ndim == 2:
        if activations and calibrated(context):
            grams = _activation_grams(context, n)
        elif context is None or is_linear_name(context.name):
            taus = [m - base for m in models]
            grams = [t.T @ t for t in taus]
    merged = anchor
    if grams is not None:  # each source's outputs count by its (non-negative) weight
        grams = [g.to(base.device, base.dtype) for g in grams]
        if alpha != 1.0:  # RegMean's shrink of the off-diagonal entries
            grams = [shrink(g, alpha) for g in grams]
        if gram_norm:  # every source's Gram to mean eigenvalue 1: its say is its weight
            grams = [g / t if (t := float(torch.diagonal(g).mean())) > 0 else g
                     for g in grams]
        grams = [max(w, 0.0) * g for w, g in zip(weight, grams, strict=True)]
        if skip_unchanged:  # a source that left this tensor as the base's has no say in it
            grams = [g if bool((m != base).any()) else torch.zeros_like(g)
                     for m, g in zip(models, grams, strict=True)]
        targets = models
        if weighted_targets:  # fit each source's weighted task vector, base + w tau
            targets = [base + w * (m - base) for w, m in zip(weight, models, strict=True)]
        if any(bool(g.any()) for g in grams):  # all zero: no direction to fit, the anchor
            lam = relative_lambda(grams, lambda_ * 2.0 ** lambda_log2)
            merged = ridge_solve(targets, grams, anchor, lam)
    return base + scale * (merged - base)


def regmean_merge(base: torch.Tensor, models: Sequence[torch.Tensor], *, alpha: float = 1.0,
                  context: TensorContext | None = None, seed: int = 0) -> torch.Tensor:
    """RegMean: ``(sum_t W_t G_t)(sum_t G_t)^-1`` on linear weights from activation Grams
    (off-diagonals times ``alpha``), the average elsewhere.  Without activation Grams (a
    plain function call, or a worker that does not calibrate: logged once) every tensor
    is averaged."""
    n = len(models)
    if not calibrated(context) and context is not None:
        _uncalibrated("regmean", "the average of the models")
    grams = _activation_grams(context, n) if base.ndim == 2 and calibrated(context) else None
    if grams is None:
        return TASK_ARITHMETIC.fn(base, list(models), weight=[1.0] * n, normalize=True,
                                  lambda_=1.0, seed=seed)
    grams = [g.to(base.device, base.dtype) for g in grams]
    if alpha != 1.0:
        grams = [shrink(g, alpha) for g in grams]
    return ridge_solve(models, grams, None, 0.0)


BMM = register(
    MergeMethod(
        name="bmm",
        fn=bmm_merge,
        params=(
            Param("lambda", 1.0, low=0.0,
                  doc="ridge strength toward the anchor, in mean eigenvalues of sum_t G_t"),
            Param("lambda_log2", 0.0,
                  doc="the ridge strength times 2 ** this: searched, a log-scale lambda "
                      "that reaches both the pure fit and the anchor"),
            Param("scale", 1.0, doc="scale of the merged change from the base"),
            Param("activations", True, kind=bool,
                  doc="Grams from calibration activations (false: data-free, tau^T tau)"),
            Param("ties", False, kind=bool, doc="anchor on TIES instead of task arithmetic"),
            Param("weight", 1.0, per_model=True,
                  doc="anchor: scale of this task vector; fit: weight of its Gram (if > 0)"),
            Param("density", 1.0, per_model=True, low=0.0, high=1.0,
                  doc="anchor (TIES): fraction of the task vector kept"),
            Param("normalize", False, kind=bool, doc="anchor: divide by the summed weights"),
            Param("weighted_targets", False, kind=bool,
                  doc="fit: each source's target is base + weight * task vector (false: "
                      "the source itself; its weight then only sets its say)"),
            Param("skip_unchanged", False, kind=bool,
                  doc="fit: a source whose tensor equals the base's has no say in that "
                      "tensor (activation Grams would pull it toward the base there)"),
            Param("alpha", 1.0, low=0.0, high=1.0,
                  doc="fit: scale of the Grams' off-diagonal entries (RegMean's shrink; "
                      "1: none)"),
            Param("gram_norm", False, kind=bool,
                  doc="fit: each source's Gram scaled to mean eigenvalue 1 before its "
                      "weight (its say no longer grows with its task vector, activations "
                      "or calibration tokens)"),
        ),
        task_vectors=True,
        context=True,
        mergekit=False,
        doc="BMM inner merge: per linear module, ridge regression of the sources' outputs "
            "toward an anchor merge (activation or data-free Grams)",
    )
)

REGMEAN = register(
    MergeMethod(
        name="regmean",
        fn=regmean_merge,
        params=(Param("alpha", 1.0, low=0.0, high=1.0,
                      doc="scale of the Grams' off-diagonal entries"),),
        task_vectors=False,
        context=True,
        mergekit=False,
        doc="RegMean: per linear module, the weights that best reproduce every source's "
            "outputs on calibration inputs; the average elsewhere",
    )
)
