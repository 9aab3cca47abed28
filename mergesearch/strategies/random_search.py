"""Uniform random search: the baseline every other strategy must beat.

Not from a paper (Bergstra & Bengio 2012 argue for it as a baseline).  Our choices: points are
uniform in the box ``[low, high]`` from one ``numpy.random.default_rng(seed)``; the first
candidate is the problem's start point when ``include_init`` is set, so a random search
always contains the user's own recipe.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mergesearch.strategies.base import Strategy, StrategyOptions, register
from mergesearch.trial import Candidate, Result


class RandomOptions(StrategyOptions):
    include_init: bool = True
    """Propose the problem's start point (every dimension at its ``init``) first."""


@register
class RandomSearch(Strategy):
    """Independent uniform samples within the bounds; results are ignored."""

    name = "random"
    description = "Uniform random sampling within the bounds (baseline); starts at the init point"
    multi_objective = True
    Options = RandomOptions
    options: RandomOptions

    def _setup(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._init_pending = self.options.include_init

    def _ask(self, n: int) -> list[tuple[Sequence[float], float]]:
        out: list[tuple[Sequence[float], float]] = []
        if self._init_pending:
            self._init_pending = False
            out.append((self.problem.x0, 1.0))
        low, high = self.problem.low, self.problem.high
        for _ in range(n - len(out)):
            out.append((self._point(self._rng.uniform(low, high)), 1.0))
        return out

    def _point(self, draw: np.ndarray) -> list[float]:
        """A uniform draw in the box, made a genome: each discrete dimension takes each of
        its values with equal chance (one draw per dimension whatever the kinds, so a space
        of real dimensions samples what it always did)."""
        genome = self.problem.clip(draw) if not self.problem.discrete else list(draw)
        for i, d in enumerate(self.problem.dims):
            if d.discrete:
                values = int(d.high - d.low) + 1
                share = (draw[i] - d.low) / (d.high - d.low)
                genome[i] = float(d.low + min(int(share * values), values - 1))
            else:
                genome[i] = float(min(max(genome[i], d.low), d.high))
        return genome

    def _tell(self, told: list[tuple[Candidate, Result]]) -> None:
        """Nothing to learn: random search ignores its results."""
