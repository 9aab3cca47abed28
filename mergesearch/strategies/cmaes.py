"""CMA-ES (Hansen & Ostermeier 2001; Hansen 2016 tutorial) through pycma's ask/tell.

Faithful: every update (mean, step size, covariance, active CMA, termination) is pycma's
``cma.CMAEvolutionStrategy`` with its defaults, bounds handled by pycma's ``BoundTransform``.
This is also what Sakana's evolutionary model merge and mergekit-evolve use.

Our choices:

- The search runs in the unit cube: each dimension's ``[low, high]`` maps to ``[0, 1]``, so
  ``sigma0`` (default 0.2) is a fraction of every range and differently scaled dimensions
  (a weight in [0, 2], a density in [0, 1]) are treated alike.  The mean starts at the
  problem's init point.
- Randomness comes only from a ``numpy.random.default_rng(seed)`` handed to pycma as its
  ``randn``; pycma's own ``seed`` option is disabled because it would reseed the global
  ``np.random`` of the user's process.  No files are read or written (no ``cma_signals.in``,
  no ``outcmaes/`` logs).
- Generation-based: ``ask(n)`` hands out members of the current generation not yet issued;
  once all are issued it returns ``[]`` until every member is told, then pycma is told and the
  next generation sampled.
- Several objectives are scalarised with :meth:`Problem.scalar_loss`.  A failed candidate gets
  a penalty loss worse than every successful loss of its generation
  (``worst + (worst - best) + 1``) plus its distance to the mean in the unit cube, so failures
  rank last, far failures below near ones, and a generation of failures is not "flat".
- pycma's budget limits (``maxiter``, ``maxfevals``) are switched off: the controller's budget
  decides.  Its convergence tests stay on, and ``done`` turns True when one fires; note that a
  generation with all-equal losses triggers ``tolfun`` (pass
  ``cma_options={"tolfun": 0, "tolflatfitness": 10}`` when losses often tie).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from mergesearch.strategies.base import Strategy, StrategyOptions, register
from mergesearch.trial import Candidate, Result

log = logging.getLogger(__name__)

#: pycma options this adapter sets itself (randomness, bounds, quietness).
_MANAGED = frozenset({"bounds", "randn", "seed", "verbose", "verb_log", "verb_disp",
                      "signals_filename", "popsize"})


class CMAESOptions(StrategyOptions):
    sigma0: float = Field(0.2, gt=0, le=1)
    """Initial step size as a fraction of each dimension's range."""
    popsize: int | None = Field(None, ge=2)
    """Candidates per generation; None = pycma's default ``4 + floor(3 ln n)``."""
    cma_options: dict[str, Any] = Field(default_factory=dict)
    """Further pycma options by their pycma name (e.g. ``CMA_diagonal``, ``tolfun``)."""

    @field_validator("cma_options")
    @classmethod
    def _known_pycma_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        import cma  # here and in _setup: importing pycma costs ~0.5 s, listing strategies not

        known = cma.CMAOptions.defaults()
        for key in value:
            if key in _MANAGED:
                raise ValueError(f"{key!r} is set by mergesearch; use the strategy's own options")
            if key not in known:
                raise ValueError(f"{key!r} is not a pycma option (see cma.CMAOptions())")
        return value


@register
class CMAES(Strategy):
    """pycma's CMA-ES in the unit cube, one generation at a time."""

    name = "cmaes"
    rng_libraries = ("cma", "numpy")
    kinds = frozenset({"real"})  # pycma's search distribution is continuous
    description = "CMA-ES (pycma), single objective (weighted sum), generation by generation"
    multi_objective = False
    Options = CMAESOptions
    options: CMAESOptions

    def _setup(self) -> None:
        import cma

        low, high, x0 = self._search_box()
        self._low, self._span = low, high - low
        rng = np.random.default_rng(self.seed)
        opts: dict[str, Any] = {"maxiter": math.inf, "maxfevals": math.inf,
                                **self.options.cma_options,
                                "bounds": [0.0, 1.0],
                                "randn": lambda *shape: rng.standard_normal(shape),
                                "seed": math.nan, "verbose": -9, "verb_log": 0,
                                "signals_filename": None}
        if self.options.popsize is not None:
            opts["popsize"] = self.options.popsize
        with _pycma_warnings_to_log():
            self._es = cma.CMAEvolutionStrategy((x0 - self._low) / self._span,
                                                self.options.sigma0, opts)
        self._stop: dict[str, Any] = {}
        self._start_pending = bool(getattr(self.options, "include_init", False))
        self._start_id: int | None = None  # the start point's candidate, once asked
        self._sample()

    def _search_box(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(low, high, x0)`` of the box pycma's unit cube stands for (subclasses that
        search a relaxation of the genome override this and :meth:`_to_genome`)."""
        p = self.problem
        return p.low, p.high, p.x0

    def _sample(self) -> None:
        with _pycma_warnings_to_log():
            self._generation: list[np.ndarray] = self._es.ask()
        self._issued = 0
        self._slot: dict[int, int] = {}  # candidate id -> index in the generation
        self._losses: dict[int, float | None] = {}  # index -> loss; None = failed

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    @property
    def generation(self) -> int:
        """Generations told so far."""
        return int(self._es.countiter)

    @property
    def mean(self) -> list[float]:
        """The search distribution's mean as a genome."""
        return self._to_genome(self._es.result.xfavorite)

    @property
    def done(self) -> bool:
        return bool(self._stop)

    @property
    def stop_reasons(self) -> dict[str, Any]:
        """pycma's termination conditions that fired (empty while running)."""
        return dict(self._stop)

    def _to_genome(self, unit: np.ndarray) -> list[float]:
        return self.problem.clip(self._low + self._span * np.asarray(unit, dtype=float))

    def _ask(self, n: int) -> list[tuple[Sequence[float], float]]:
        out: list[tuple[Sequence[float], float]] = []
        if self._start_pending:  # the start point, scored once before generation 1
            self._start_pending = False
            self._start_id = self._next_id
            out.append((list(self.problem.x0), 1.0))
        start = self._issued
        stop = min(len(self._generation), start + n - len(out))
        for index in range(start, stop):
            self._slot[self._next_id + len(out)] = index  # the id the base class will give it
            out.append((self._to_genome(self._generation[index]), 1.0))
        self._issued = stop
        return out

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        for cand, result in told:
            if cand.id == self._start_id:  # the start point: no generation's member
                continue
            index = self._slot.pop(cand.id)
            self._losses[index] = self.problem.scalar_loss(result.values) if result.ok else None
        if len(self._losses) == len(self._generation):
            with _pycma_warnings_to_log():
                self._es.tell(self._generation, self._generation_losses())
                self._stop = dict(self._es.stop())
            if self._stop:
                log.info("cmaes stops after %d generations: %s", self.generation, self._stop)
            else:
                self._sample()

    def _generation_losses(self) -> list[float]:
        """Losses in generation order, failed members replaced by penalties (see module doc)."""
        ok = [v for v in self._losses.values() if v is not None]
        base = max(ok) + (max(ok) - min(ok)) + 1.0 if ok else 0.0
        mean = np.asarray(self._es.mean, dtype=float)
        losses = []
        for index, x in enumerate(self._generation):
            loss = self._losses[index]
            if loss is None:
                loss = base + float(np.linalg.norm(x - mean)) / math.sqrt(len(mean))
            losses.append(loss)
        return losses


@contextmanager
def _pycma_warnings_to_log() -> Iterator[None]:
    """Route pycma's ``warnings.warn`` chatter (flat fitness, ...) to our logger."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.debug("pycma: %s", w.message)
