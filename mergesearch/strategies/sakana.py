"""Sakana's evolutionary model merge (Akiba et al. 2024): the parameter-space search
(``sakana_ps``) and the data-flow search (``sakana_dfs``), both CMA-ES through pycma.

Both are :class:`~mergesearch.strategies.cmaes.CMAES` with the paper's settings as
defaults; everything pycma does (updates, bounds, convergence tests) is as documented
there.  Run PS then DFS as one experiment with two stages (``experiments/zoo/sakana_ps_dfs.yaml``):
the PS stage's best trial joins the DFS stage's pool as a model rebuilt from its recipe.

**sakana_ps** searches DARE-TIES ``weight`` and ``density`` per source per layer group
(``search_spaces/dare_ties_layer_groups.yaml``; any real-valued space works).

* From the paper: init 0.5 for every variable (the space's ``init``: the strategy starts
  at the problem's start point, so keep it at 0.5 as the shipped space does); ``sigma0``
  1/6; ``popsize`` 4 + floor(3 ln n) (pycma's default, which the paper's Optuna CMA sampler
  shares); the final model is the best trial on the search items (``mergesearch export``
  picks it; an experiment's ``report`` items score it too).
* Ours: the paper ran Optuna's CMA sampler, this runs pycma (the same algorithm; the
  random streams differ).  The search runs in the unit cube of the bounds, so sigma0 1/6
  is 1/6 of each range (with bounds [0, 1], the paper's absolute 1/6).  ``include_init``
  (default true) scores the start point once before the first generation; the paper does
  not, it costs one evaluation and makes the start a trial one can compare with.

**sakana_dfs** searches the ``layer_path`` space (:mod:`mergesearch.spaces.layer_path`):
an indicator per layer slot (binary dimensions) and a scale per hop or per (previous
layer, layer) pair.

* From the paper: CMA-ES over a real-valued genome; slot t is on the path iff its
  indicator I_t > 0; the start is I = 0 except model A's layers in the first repetition
  (I = 1), which the space's start point marks; model A opens and closes the path and
  gives the embeddings (the space's ``fix_ends``); the input scales are searched with the
  path (the paper found fixing them to 1 cost > 20 points).
* Ours: the paper leaves the indicators unbounded; here each lives in
  ``indicator_bounds`` (default [-2, 2]) so that pycma's unit cube covers it, and the
  initial indicator of an off slot is ``off_init`` (default the paper's 0, which puts every
  off slot on in half of the first samples; a negative value starts closer to model A
  alone).  ``sigma0`` defaults to 1/6 as in PS (the paper does not give DFS's), and
  ``popsize`` to pycma's default: the paper's 128 (100 generations) is for T = 192 slots
  and ~13k evaluations; set it in the experiment.  ``include_init`` as in PS: the start
  point is model A itself, so the stage's best is never below the model it starts from.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from mergesearch.strategies.base import register
from mergesearch.strategies.cmaes import CMAES, CMAESOptions


class SakanaPSOptions(CMAESOptions):
    sigma0: float = Field(1 / 6, gt=0, le=1)
    """Initial step size as a fraction of each dimension's range (the paper: 1/6)."""
    include_init: bool = True
    """Score the start point (every dimension at its init) once, before generation 1."""


@register
class SakanaPS(CMAES):
    """CMA-ES with the settings of Sakana's parameter-space merge."""

    name = "sakana_ps"
    description = ("Sakana's parameter-space search: CMA-ES (sigma0 1/6, popsize 4 + 3 ln n) "
                   "from the start point, single objective")
    Options = SakanaPSOptions
    options: SakanaPSOptions


class SakanaDFSOptions(SakanaPSOptions):
    indicator_bounds: tuple[float, float] = (-2.0, 2.0)
    """Where each slot's real-valued indicator I_t lives; the slot is on iff I_t > 0."""
    off_init: float = 0.0
    """The initial indicator of a slot that is off at the start (the paper: 0)."""

    @model_validator(mode="after")
    def _indicators(self) -> SakanaDFSOptions:
        low, high = self.indicator_bounds
        if not low < 0.0 < 1.0 <= high:
            raise ValueError(f"indicator_bounds {list(self.indicator_bounds)} must contain 0 "
                             "(the on/off threshold) and 1 (an on slot's start) inside")
        if not low <= self.off_init <= 0.0:
            raise ValueError(f"off_init {self.off_init} must be in [{low}, 0]: an off slot "
                             "starts off (indicator <= 0)")
        return self


@register
class SakanaDFS(CMAES):
    """CMA-ES over real-valued indicators (and the scales) of Sakana's data-flow search."""

    name = "sakana_dfs"
    description = ("Sakana's data-flow search: CMA-ES over real indicators (slot on iff > 0) "
                   "and scales of a layer path, single objective")
    kinds = frozenset({"real", "binary"})  # binary dimensions are searched as indicators
    Options = SakanaDFSOptions
    options: SakanaDFSOptions

    def _search_box(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = self.problem
        low, high, x0 = p.low.copy(), p.high.copy(), p.x0.copy()
        self._binary = np.array([d.kind == "binary" for d in p.dims])
        lo, hi = self.options.indicator_bounds
        low[self._binary], high[self._binary] = lo, hi
        x0[self._binary] = np.where(p.x0[self._binary] >= 0.5, 1.0, self.options.off_init)
        return low, high, x0

    def _to_genome(self, unit: np.ndarray) -> list[float]:
        x = self._low + self._span * np.asarray(unit, dtype=float)
        x[self._binary] = (x[self._binary] > 0.0).astype(float)
        return self.problem.clip(x)
