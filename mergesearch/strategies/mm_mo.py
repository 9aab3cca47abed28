"""MM-MO ("It's Morphing Time", 2024/2025): multi-objective Bayesian optimisation of a
merge recipe with BoTorch, each proposal repaired by differential evolution and the batch
chosen by uncertainty screening.

One round (after the random start):

1. fit one GP per objective (BoTorch ``SingleTaskGP``, outcomes standardised, double
   precision) in the unit cube of the bounds, as a ``ModelListGP`` (independent GPs);
2. propose ``pool`` points (default 5) by maximising qLogNEHVI
   (``qLogNoisyExpectedHypervolumeImprovement``; qLogNEI with one objective) with
   ``optimize_acqf``, sequential greedy, candidates still being evaluated passed as
   ``X_pending``;
3. repair each proposal by DE/rand/1/bin: a donor ``x_r1 + F (x_r2 - x_r3)`` from three
   distinct members of the top-``top`` evaluated configurations, crossed with the proposal
   coordinate by coordinate with probability ``CR`` (one coordinate always from the donor),
   clipped to the bounds; the repaired points join the proposals;
4. "Fisher" screening: of proposals and repairs, keep the ``batch_size`` points of lowest
   Fisher information ``sum_m 1 / var_m(x)`` (the GPs' posterior variances on the
   standardised scale), the points the models know least.

Faithful to the paper's description: DARE-TIES weight and density per model
(``search_spaces/mm_mo_dare_ties.yaml``), task accuracies plus the sparsity objective of the
merged delta (``delta_l1``, minimised: ``experiments/zoo/mm_mo.yaml``), independent GPs,
hypervolume-improvement acquisition, DE/rand/1/bin repair from the top-5 with F = CR = 0.5,
screening by lowest sum of 1 / posterior variance, 10 random evaluations then batches of 5
(the paper's 4 x 5).

Our choices (the paper does not say, or says otherwise):

- qLogNEHVI (the numerically robust, noise-aware successor of the paper's qEHVI) with the
  reference point BoTorch infers from the observed front (nadir minus 10% of its range).
- The screened pool is the ``pool`` acquisition maximisers plus their DE repairs (10 points
  for a batch of 5).  A larger ``pool`` costs more than linearly: each greedy step's
  hypervolume improvement conditions on the points before it.  The top-``top`` members
  are ranked by non-dominated front, then by the sum of their losses normalised to [0, 1]
  over the data.
- The start is ``initial`` points drawn uniformly in the bounds; the first model is fitted
  once at least 3 evaluations succeeded (random points are drawn until then).  Failed
  evaluations are left out of the models.
- Batches: ``ask(n)`` hands out the current batch; when it is used up, the next one is
  proposed at once, with the unfinished candidates as pending points (so workers never wait
  for a whole batch); one ask builds at most one batch.  With one objective the same loop
  runs on qLogNEI (``multi_objective`` stays True: the class is a Pareto-front strategy).
- Real dimensions only (the GPs and DE work in the continuous unit cube).
- State is native, not a replay: ``state_dict`` keeps the told data (in told order), the
  candidates in flight, the batch not yet handed out and the numpy generator's state, so a
  resume fits no GP of the history (the next round fits one set, warm-started from
  the saved hyperparameters) and proposes what the uninterrupted run would have.
  Each round's torch randomness (restarts, MC samples) comes from a seed drawn from that
  generator, inside ``torch.random.fork_rng``, so the user's torch RNG is left alone.
- Each round's GP fit starts from the last round's hyperparameters (kept in the state),
  which saves most of the marginal-likelihood iterations.

BoTorch is the optional ``bo`` extra (``pip install 'mergesearch[bo]'``), imported lazily.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from mergesearch.errors import require_extra
from mergesearch.strategies.base import (
    STATE_VERSION,
    Proposal,
    Strategy,
    StrategyError,
    StrategyOptions,
    _replayed,
    register,
)
from mergesearch.trial import Candidate, Result

log = logging.getLogger(__name__)

#: evaluations that must have succeeded before the first model is fitted
MIN_FIT = 3


class MMMOOptions(StrategyOptions):
    initial: int = Field(10, ge=1)
    """Random evaluations before the first model (the paper: 10)."""
    batch_size: int = Field(5, ge=1)
    """Candidates per model round (the paper: 5)."""
    pool: int = Field(5, ge=1)
    """Acquisition maximisers per round; with their DE repairs, screened to ``batch_size``."""
    top: int = Field(5, ge=3)
    """DE parents: the best evaluated configurations (the paper: 5)."""
    de_f: float = Field(0.5, gt=0, le=2)
    """DE's differential weight F (the paper: 0.5)."""
    de_cr: float = Field(0.5, ge=0, le=1)
    """DE's crossover rate CR (the paper: 0.5)."""
    repair: bool = True
    """Repair each proposal by DE/rand/1/bin (off: the acquisition's proposals as they are)."""
    screening: bool = True
    """Keep the most uncertain points of the pool (off: its last ``batch_size``, the repaired
    proposals when ``repair`` is on)."""
    num_restarts: int = Field(4, ge=1)
    """``optimize_acqf`` restarts per proposal."""
    raw_samples: int = Field(128, ge=1)
    """``optimize_acqf`` raw samples for its starting points."""
    mc_samples: int = Field(64, ge=1)
    """Quasi-Monte-Carlo samples of the acquisition."""

    @model_validator(mode="after")
    def _pool_holds_a_batch(self) -> MMMOOptions:
        size = self.pool * (2 if self.repair else 1)
        if size < self.batch_size:
            raise ValueError(f"pool ({self.pool}, {size} points with the repairs) must hold "
                             f"batch_size ({self.batch_size}): screening keeps batch_size of "
                             "the pool")
        return self


# -- the pieces, as pure functions (tested on their own) ----------------------------------


def rank_top(losses: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best rows of ``losses`` (minimised): by non-dominated front,
    then by the sum of the losses normalised to [0, 1] over the rows, then by index."""
    losses = np.asarray(losses, dtype=float)
    n = len(losses)
    front = np.full(n, -1)
    left = np.arange(n)
    level = 0
    while left.size:
        sub = losses[left]
        dominated = np.array([np.any(np.all(sub <= p, axis=1) & np.any(sub < p, axis=1))
                              for p in sub])
        front[left[~dominated]] = level
        left = left[dominated]
        level += 1
    span = losses.max(axis=0) - losses.min(axis=0)
    norm = (losses - losses.min(axis=0)) / np.where(span > 0, span, 1.0)
    order = np.lexsort((np.arange(n), norm.sum(axis=1), front))
    return order[:k]


def de_repair(proposals: np.ndarray, parents: np.ndarray, rng: np.random.Generator,
              f: float = 0.5, cr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """DE/rand/1/bin in the unit cube: for each proposal (the target), a donor
    ``p[r1] + f (p[r2] - p[r3])`` from three distinct ``parents``, binomial crossover with
    rate ``cr`` (one random coordinate always from the donor), clipped to [0, 1].  Returns
    the repaired points and, per point, the indices ``(r1, r2, r3)`` of its parents."""
    proposals = np.atleast_2d(np.asarray(proposals, dtype=float))
    parents = np.atleast_2d(np.asarray(parents, dtype=float))
    if len(parents) < 3:
        raise ValueError(f"DE/rand/1 needs 3 distinct parents, got {len(parents)}")
    n, d = proposals.shape
    out = proposals.copy()
    chosen = np.empty((n, 3), dtype=int)
    for i in range(n):
        r = rng.choice(len(parents), size=3, replace=False)
        chosen[i] = r
        donor = parents[r[0]] + f * (parents[r[1]] - parents[r[2]])
        cross = rng.random(d) < cr
        cross[rng.integers(d)] = True
        out[i, cross] = donor[cross]
    return np.clip(out, 0.0, 1.0), chosen


def fisher_screen(variances: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows of ``variances`` (points x objectives) with the lowest
    Fisher information ``sum_m 1 / var_m`` (the most uncertain points), lowest first."""
    info = (1.0 / np.maximum(np.asarray(variances, dtype=float), 1e-300)).sum(axis=1)
    return np.argsort(info, kind="stable")[:k]


# -- the strategy ---------------------------------------------------------------------------


@register
class MMMO(Strategy):
    """MM-MO: BoTorch qLogNEHVI over independent GPs, DE/rand/1/bin repair, Fisher
    screening; a native (non-replayed) state."""

    name = "mm_mo"
    description = ("MM-MO: multi-objective BO (BoTorch qLogNEHVI, one GP per objective), "
                   "DE/rand/1/bin repair from the top 5, uncertainty screening")
    multi_objective = True
    rng_libraries = ("numpy", "torch", "botorch", "gpytorch")
    kinds = frozenset({"real"})
    Options = MMMOOptions
    options: MMMOOptions

    def _setup(self) -> None:
        require_extra(("botorch", "gpytorch"), "bo", "the mm_mo strategy (BoTorch)")
        p = self.problem
        self._low, self._span = p.low, p.high - p.low
        self._rng = np.random.default_rng(self.seed)
        self._round = 0  # model rounds so far
        self._queue: list[dict[str, Any]] = []  # proposals of the current batch not handed out
        self._told: list[list[Any]] = []  # [candidate dict, result record] in told order
        self._x: list[np.ndarray] = []  # unit-cube points of the successful evaluations
        self._y: list[np.ndarray] = []  # their losses
        self._hypers: list[dict[str, list]] | None = None  # the last round's GP fit

    # -- ask ----------------------------------------------------------------------------

    def ask(self, n: int = 1) -> list[Candidate]:
        out = super().ask(n)
        self._log.clear()  # the state is native: the base class's replay log is not kept
        return out

    def tell(self, results) -> None:
        super().tell(results)
        self._log.clear()

    def _ask(self, n: int) -> list[Proposal]:
        if not self._queue:
            issued = len(self._told) + len(self._pending)
            if issued < self.options.initial or len(self._y) < MIN_FIT:
                want = max(1, min(n, self.options.initial - issued))
                self._queue = [self._random_point() for _ in range(want)]
            else:
                self._queue = self._model_batch()
        out, self._queue = self._queue[:n], self._queue[n:]
        return [Proposal(genome=q["genome"], meta=q["meta"]) for q in out]

    def _random_point(self) -> dict[str, Any]:
        unit = self._rng.random(self.problem.n_dims)
        return {"genome": self._to_genome(unit), "meta": {"phase": "random"}}

    def _to_genome(self, unit: np.ndarray) -> list[float]:
        return self.problem.clip(self._low + self._span * np.asarray(unit, dtype=float))

    def _to_unit(self, genome: Sequence[float]) -> np.ndarray:
        return (np.asarray(genome, dtype=float) - self._low) / self._span

    def _model_batch(self) -> list[dict[str, Any]]:
        """One round: fit, propose a pool, repair, screen (see the module's doc)."""
        import torch

        opts = self.options
        self._round += 1
        seed = int(self._rng.integers(2**31 - 1))
        x = np.array(self._x)
        losses = np.array(self._y)
        pending = np.array([self._to_unit(c.genome) for c in self._pending.values()
                            if c.genome is not None]).reshape(-1, self.problem.n_dims)
        with torch.random.fork_rng(devices=[]), _botorch_warnings_to_log():
            torch.manual_seed(seed)
            model, self._hypers = _fit(x, -losses, self._hypers)  # BoTorch maximises
            pool = _propose(model, x, -losses, pending, opts, seed)
            top = rank_top(losses, min(opts.top, len(losses)))
            parents: list[list[int]] = [[] for _ in pool]
            if opts.repair and len(top) >= 3:
                repaired, chosen = de_repair(pool, x[top], self._rng, opts.de_f, opts.de_cr)
                pool = np.vstack([pool, repaired])
                parents += [[int(top[j]) for j in row] for row in chosen]
            mean, var = _posterior(model, pool)
        keep = (fisher_screen(var, opts.batch_size) if opts.screening
                else np.arange(len(pool))[-opts.batch_size:])
        ids = [int(c["id"]) for c, r in self._told if r["status"] == "ok"]
        batch = []
        for i in keep:
            meta = {"phase": "model", "round": self._round,
                    "source": "de_repair" if parents[i] else "acquisition",
                    "parents": [ids[j] for j in parents[i]],
                    "predicted": {o.name: float(-o.sign * mean[i, k])
                                  for k, o in enumerate(self.problem.objectives)},
                    "std": {o.name: float(np.sqrt(var[i, k]) * std)
                            for k, (o, std) in enumerate(zip(self.problem.objectives,
                                                             _stds(model), strict=True))}}
            batch.append({"genome": self._to_genome(pool[i]), "meta": meta})
        return batch

    # -- tell ---------------------------------------------------------------------------

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        for cand, result in told:
            record = {"id": result.candidate_id, "values": dict(result.values),
                      "status": result.status}
            if result.payload is not None:
                record["payload"] = result.payload
            self._told.append([cand.to_dict(), record])
            if result.ok and cand.genome is not None:
                self._x.append(self._to_unit(cand.genome))
                self._y.append(self.problem.losses(result.values))

    # -- state: native, not a replay ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "strategy": self.name, "seed": self.seed,
                "options": self.options.model_dump(mode="json"),
                "native": {"next_id": self._next_id, "round": self._round,
                           "rng": self._rng.bit_generator.state,
                           "hypers": self._hypers,
                           "told": [[dict(c), dict(r)] for c, r in self._told],
                           "pending": [c.to_dict() for c in self._pending.values()],
                           "queue": [dict(q) for q in self._queue]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise StrategyError(f"state belongs to strategy {state.get('strategy')!r}, "
                                f"not {self.name!r}")
        if state.get("version") != STATE_VERSION:
            raise StrategyError(f"unsupported strategy state version {state.get('version')}")
        if "native" not in state:
            raise StrategyError(f"{self.name}: the state has no 'native' part (not written by "
                                "this strategy)")
        native = state["native"]
        self.seed = int(state["seed"])
        self.options = self.parse_options(state["options"])
        self._reset()
        # what was told, told again in the same order (cheap: _tell only records data)
        self._tell([(Candidate.from_dict(c), _replayed(r)) for c, r in native["told"]])
        self._next_id = int(native["next_id"])
        self._round = int(native["round"])
        self._hypers = native["hypers"]
        self._rng.bit_generator.state = native["rng"]
        self._pending = {c.id: c for c in map(Candidate.from_dict, native["pending"])}
        self._queue = [{"genome": [float(g) for g in q["genome"]], "meta": q["meta"]}
                       for q in native["queue"]]


# -- BoTorch, behind four small functions ---------------------------------------------------


def _fit(x: np.ndarray, y: np.ndarray, start: list[dict[str, list]] | None = None):
    """One ``SingleTaskGP`` per column of ``y`` (maximised), fitted by marginal likelihood
    from the hyperparameters ``start`` (per GP, by parameter name; the last round's fit) when
    given; a ``ModelListGP`` when there are several.  Returns the model and the fitted
    hyperparameters."""
    import torch
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import ModelListGP, SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    tx = torch.as_tensor(x, dtype=torch.float64)
    models, fitted = [], []
    for k in range(y.shape[1]):
        ty = torch.as_tensor(y[:, k:k + 1], dtype=torch.float64)
        gp = SingleTaskGP(tx, ty, outcome_transform=Standardize(m=1))
        if start:
            with torch.no_grad():
                for name, param in gp.named_parameters():
                    param.copy_(torch.as_tensor(start[k][name], dtype=torch.float64))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
        models.append(gp)
        fitted.append({name: param.detach().tolist() for name, param in gp.named_parameters()})
    return (models[0] if len(models) == 1 else ModelListGP(*models)), fitted


def _propose(model, x: np.ndarray, y: np.ndarray, pending: np.ndarray, opts: MMMOOptions,
             seed: int) -> np.ndarray:
    """``opts.pool`` maximisers of qLogNEHVI (qLogNEI for one objective), sequential greedy,
    with ``pending`` points as ``X_pending``; in the unit cube."""
    import torch
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.acquisition.multi_objective.logei import (
        qLogNoisyExpectedHypervolumeImprovement,
    )
    from botorch.optim import optimize_acqf
    from botorch.sampling import SobolQMCNormalSampler
    from botorch.utils.multi_objective.hypervolume import infer_reference_point
    from botorch.utils.multi_objective.pareto import is_non_dominated

    d = x.shape[1]
    tx = torch.as_tensor(x, dtype=torch.float64)
    ty = torch.as_tensor(y, dtype=torch.float64)
    tp = torch.as_tensor(pending, dtype=torch.float64) if len(pending) else None
    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([opts.mc_samples]), seed=seed)
    if y.shape[1] == 1:
        acq = qLogNoisyExpectedImprovement(model, tx, sampler=sampler, X_pending=tp,
                                           prune_baseline=True)
    else:
        ref = infer_reference_point(ty[is_non_dominated(ty)])
        acq = qLogNoisyExpectedHypervolumeImprovement(model, ref, tx, sampler=sampler,
                                                      X_pending=tp, prune_baseline=True)
    bounds = torch.stack([torch.zeros(d, dtype=torch.float64),
                          torch.ones(d, dtype=torch.float64)])
    cands, _ = optimize_acqf(acq, bounds=bounds, q=opts.pool, num_restarts=opts.num_restarts,
                             raw_samples=opts.raw_samples, sequential=True,
                             options={"maxiter": 100})
    return cands.detach().numpy().astype(float).clip(0.0, 1.0)


def _models(model) -> list:
    return list(model.models) if hasattr(model, "models") else [model]


def _stds(model) -> list[float]:
    """Each GP's outcome standard deviation (the standardisation's scale)."""
    return [float(m.outcome_transform.stdvs.squeeze()) for m in _models(model)]


def _posterior(model, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means (outcome scale, maximised) and variances on the standardised scale
    of each GP at ``points`` (points x objectives)."""
    import torch

    tx = torch.as_tensor(points, dtype=torch.float64)
    means, variances = [], []
    with torch.no_grad():
        for m, std in zip(_models(model), _stds(model), strict=True):
            post = m.posterior(tx)
            means.append(post.mean.squeeze(-1).numpy())
            variances.append(post.variance.squeeze(-1).numpy() / std**2)
    return np.stack(means, axis=1), np.stack(variances, axis=1)


@contextmanager
def _botorch_warnings_to_log() -> Iterator[None]:
    """Route BoTorch's and GPyTorch's warnings (optimisation restarts, input scaling) to
    our logger."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.debug("botorch: %s", w.message)
