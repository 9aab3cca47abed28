"""Frank-Wolfe merging (FW-Merging, Chen et al., ICCV 2025): a merge built by conditional
gradient steps toward the pool member the loss gradient prefers.

The iterate ``x_t`` is a task-arithmetic recipe over the pool: coefficients ``c_t`` per
source (``granularity: task``) or per source and parameter tensor (``layer``), merged as
``base + sum_i c_i tau_i``.  Each iteration:

1. a **probe** at ``x_t`` (:mod:`mergesearch.execution.fw_probe`): the worker takes the
   cross-entropy gradient on a small labelled proxy set (the search items of every task)
   and answers only cosines between it and each source's task vector, per tensor;
2. the **linear minimisation oracle**: ``s = argmin_i sum_p cos(g_p, tau_ip)`` (task
   granularity) or ``s_p = argmin_i cos(g_p, tau_ip)`` per tensor (layer granularity);
3. the **step** ``gamma_t = 2 / (t + 2) * step_size``:

   * hard: ``x_{t+1} = x_t + gamma_t * scaling * (s - x_t)``;
   * soft: one ``s_k`` per task (from that task's own gradient), then a short coefficient
     search over them: ``soft_trials`` candidates ``x_t + gamma_t * (sum_k a_k s_k - x_t)``,
     the first with every ``a_k = scaling``, the others with ``a_k`` drawn uniformly from
     ``[0, 2 * scaling]``; each is scored as a trial and the best becomes ``x_{t+1}``;

4. ``x_{t+1}`` is scored as a trial, so the front, the best trial and the export work as
   for any strategy.

Faithful: the oracle on gradient cosines, the open-loop step, hard and soft variants at
task and layer granularity, the defaults (10 iterations, step 0.1, scaling 0.3),
candidates streamed one at a time in the probe.  Our choices: at layer granularity the
base is one more vertex of the hull by default (``base_vertex``, scored ``-min_cosine``
= -0.1 per tensor): a source is picked for a tensor only where its cosine is below -0.1,
else the tensor steps toward the base (the paper's plain per-tensor argmin always picks
some source, and with harmful sources in the pool it picks them somewhere;
benchmarks/frank_wolfe.py measures both); the iterate starts at the
base (``init: base``; ``uniform`` starts from ``scaling`` on every source); the soft
variant's coefficient search is a few scored trials, not AdaMerging's entropy descent
(it needs no unlabelled-data gradient with respect to the coefficients); with
``ties_density`` the step's difference ``s - x_t`` is TIES-trimmed (the ``ties`` merge
method, whose magnitude trimming lives in :mod:`mergesearch.merging.sparsify`) by
merging ``s`` onto ``x_t`` as the base, ``x_t`` a recipe-defined model, so iterates nest
(each is merged once per worker).  ``evaluations`` (optional) stops the search once
trials plus probes, a probe counted as ``probe_cost`` trials, reach it: equal cost
against strategies that only score.

Without a recipe space (no ``Problem.decode``: the conformance suite's closed-form
problems) the same loop runs over the genome box with a two-point finite-difference
gradient in place of the probe (the oracle over a box is its corner against the gradient).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from mergesearch.strategies.base import Proposal, Strategy, StrategyError, StrategyOptions, register

PROBE = "mergesearch.execution.fw_probe:gradient_cosines"
TOTAL = "total"


class FrankWolfeOptions(StrategyOptions):
    variant: Literal["hard", "soft"] = "hard"
    granularity: Literal["task", "layer"] = "task"
    iterations: int = Field(10, ge=1)
    step_size: float = Field(0.1, gt=0, le=1)
    scaling: float = Field(0.3, gt=0)
    init: Literal["base", "uniform"] = "base"
    ties_density: float | None = Field(None, gt=0, le=1)
    proxy_items: int = Field(100, ge=1)
    soft_trials: int = Field(4, ge=1)
    evaluations: int | None = Field(None, ge=1)
    probe_cost: float = Field(3.0, ge=0)
    fd_step: float = Field(0.02, gt=0, le=0.5)  # genome mode: share of each range
    #: the base as one more vertex of the hull, scored ``-min_cosine``: where no source's
    #: cosine is below it, the step shrinks toward the base instead of picking a source.
    #: None (the default): on at layer granularity, where the plain per-tensor argmin
    #: picks some source on every tensor, distractors included (benchmarks/frank_wolfe.py);
    #: off at task granularity, where one source is picked by its cosine summed over every
    #: tensor and a mean cosine below -min_cosine is rare (the iterate would not move)
    base_vertex: bool | None = None
    min_cosine: float = Field(0.1, ge=0, le=1)
    #: a guard on scored trials: a step whose scored merge is worse than the iterate's own
    #: score (from the step that made it) is rejected, the iterate kept, and the next
    #: iteration probes it again with its smaller step.  Off by default (the paper's loop)
    guard: bool = False


def fw_gamma(t: int, step_size: float) -> float:
    """The open-loop step size of iteration ``t`` (from 0): ``2 / (t + 2) * step_size``."""
    return 2.0 / (t + 2.0) * step_size


def hard_step(c: np.ndarray, vertex: np.ndarray, gamma: float, scaling: float) -> np.ndarray:
    """``c + gamma * scaling * (vertex - c)``: coefficients of the hard variant's next
    iterate (``vertex`` one-hot per source, per tensor at layer granularity)."""
    return c + gamma * scaling * (vertex - c)


def soft_step(c: np.ndarray, vertices: list[np.ndarray], alphas: np.ndarray,
              gamma: float) -> np.ndarray:
    """``c + gamma * (sum_k a_k vertex_k - c)``: the soft variant's candidate."""
    target = sum(a * v for a, v in zip(alphas, vertices, strict=True))
    return c + gamma * (target - c)


def oracle(cos: np.ndarray, granularity: str, base_score: float | None = None) -> np.ndarray:
    """One-hot vertex ``[sources, tensors]`` from cosines ``[sources, tensors]``: the source
    with the least summed cosine everywhere (task) or per tensor (layer).  With
    ``base_score`` the base (no task vector) competes with that score per tensor (summed
    over tensors at task granularity); where it wins the vertex is all zeros."""
    n = cos.shape[0]
    if base_score is not None:
        cos = np.vstack([cos, np.full((1, cos.shape[1]), base_score)])
    vertex = np.zeros_like(cos)
    if granularity == "task":
        vertex[int(np.argmin(cos.sum(axis=1))), :] = 1.0
    else:
        vertex[np.argmin(cos, axis=0), np.arange(cos.shape[1])] = 1.0
    return vertex[:n]


@register
class FrankWolfe(Strategy):
    """FW-Merging: probe the gradient cosines at the iterate, step toward the oracle's
    pick, score the new iterate; hard or soft, per source or per tensor."""

    name = "frank_wolfe"
    description = "Frank-Wolfe merging (FW-Merging): gradient-cosine oracle over the pool"
    multi_objective = False
    Options = FrankWolfeOptions
    kinds = frozenset({"real"})  # coefficients and steps are continuous

    # -- set-up -------------------------------------------------------------------------

    def _setup(self) -> None:
        o = self.options
        self._rng = np.random.default_rng(self.seed)
        self.t = 0
        self.spent = 0.0  # trials + probe_cost per probe
        self.history: list[dict[str, Any]] = []  # per iteration: picks, losses, gamma
        self.cosines: list[dict[str, Any]] = []  # every payload told, in order
        self._waiting: dict[int, str] = {}  # candidate id -> "probe" | "score"
        self._soft: dict[int, np.ndarray] = {}  # soft candidates' coefficients
        self._soft_scores: dict[int, float] = {}
        self._next_c: np.ndarray | None = None  # hard: the stepped iterate, to score
        self.recipe_next: dict[str, Any] | None = None  # with ties_density: the same
        self._soft_pending: list[np.ndarray] | None = None  # soft candidates to ask
        self.recipe: dict[str, Any] | None = None  # the iterate as a recipe (TIES nests)
        self.loss = np.inf  # the iterate's scored loss (the guard's bar; inf: not scored)
        decode = self.problem.decode
        self.genome_mode = decode is None
        if self.genome_mode:
            self.pool, self.base, self.tensors = list(self.problem.names), None, ["genome"]
            x0 = self.problem.x0
            self.c = x0.reshape(-1, 1).astype(float)
            self._fd: list[tuple[int, int, float]] = []  # (dim, sign, value) pending
            self._fd_loss: dict[tuple[int, int], tuple[float, float]] = {}
            self._fx = np.inf
            return
        start = decode(self.problem.x0)
        if start.base is None or not start.models:
            raise StrategyError("frank_wolfe needs a space over a base and source models "
                                "(e.g. search_spaces/frank_wolfe.yaml)")
        self.base = start.base
        self.pool = [m.model for m in start.models]
        self.tensors: list[str] = []  # known after the first probe (layer granularity)
        value = o.scaling if o.init == "uniform" else 0.0
        self.c = np.full((len(self.pool), 1), value)

    # -- recipes ------------------------------------------------------------------------

    def _coefficients_recipe(self, c: np.ndarray) -> dict[str, Any]:
        """Task arithmetic (lambda 1) with coefficients ``c`` [sources, 1 or tensors]."""
        used = [i for i in range(len(self.pool)) if np.any(c[i] != 0)] or [0]
        models = []
        for i in used:
            if c.shape[1] == 1:
                weight: Any = float(c[i, 0])
            else:  # longest names first: a name inside another never shadows it
                order = sorted(range(len(self.tensors)), key=lambda p: -len(self.tensors[p]))
                weight = [{"filter": self.tensors[p], "value": float(c[i, p])} for p in order]
            models.append({"model": self.pool[i], "parameters": {"weight": weight}})
        return {"method": "task_arithmetic", "base": self.base, "models": models,
                "parameters": {"normalize": False, "lambda": 1.0}}

    def _vertex_recipe(self, vertex: np.ndarray) -> dict[str, Any] | str:
        """The oracle's pick as a model: a pool checkpoint, or per tensor a recipe."""
        if not vertex.any():  # the base won everywhere
            return self.base
        if vertex.shape[1] == 1 or np.all(vertex == vertex[:, :1]):
            return self.pool[int(np.argmax(vertex[:, 0]))]
        from mergesearch.models.recipe_model import recipe_ref  # here: listing stays light

        return recipe_ref(self._coefficients_recipe(vertex))

    def _ties_recipe(self, target: np.ndarray, gamma: float) -> dict[str, Any]:
        """``x_t + gamma * TIES-trim(target - x_t)``: ``target`` merged onto the iterate."""
        from mergesearch.models.recipe_model import recipe_ref

        here = self.recipe or self._coefficients_recipe(self.c)
        return {"method": "ties", "base": recipe_ref(here),
                "models": [{"model": self._vertex_recipe(target),
                            "parameters": {"weight": 1.0,
                                           "density": float(self.options.ties_density)}}],
                "parameters": {"normalize": True, "lambda": float(gamma)}}

    def _current_recipe(self) -> dict[str, Any]:
        return self.recipe or self._coefficients_recipe(self.c)

    @property
    def base_vertex(self) -> bool:
        """Whether the base competes in the oracle (``base_vertex``, None: at layer
        granularity only)."""
        o = self.options
        return o.granularity == "layer" if o.base_vertex is None else o.base_vertex

    def _widen(self, n_tensors: int) -> None:
        """Per-tensor coefficients once the tensors are known (layer granularity)."""
        if self.c.shape[1] == 1 and n_tensors > 1:
            self.c = np.repeat(self.c, n_tensors, axis=1)

    # -- ask / tell ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        o = self.options
        if self.genome_mode:
            return o.evaluations is not None and self.spent >= o.evaluations
        if self.t >= o.iterations and not self._waiting:
            return True
        return o.evaluations is not None and self.spent >= o.evaluations and not self._waiting

    def _ask(self, n: int) -> list[Proposal]:
        if self._waiting:
            return []  # one step at a time: the next needs these answers
        if self.genome_mode:
            return self._ask_genome(n)
        o = self.options
        if self._next_c is not None or self.recipe_next is not None:
            cid = self._next_id
            self._waiting[cid] = "score"
            recipe = self.recipe_next if self.recipe_next is not None else \
                self._coefficients_recipe(self._next_c)
            return [Proposal(recipe=recipe, meta={"iteration": self.t, "role": "iterate"})]
        if self._soft_pending is not None:
            out = []
            for k, c in enumerate(self._soft_pending[:n]):
                cid = self._next_id + k
                self._waiting[cid] = "score"
                self._soft[cid] = c
                out.append(Proposal(recipe=self._coefficients_recipe(c),
                                    meta={"iteration": self.t, "role": "soft"}))
            self._soft_pending = self._soft_pending[n:] or None
            return out
        cid = self._next_id
        self._waiting[cid] = "probe"
        return [Proposal(recipe=self._current_recipe(), kind=PROBE,
                         meta={"iteration": self.t, "base": self.base, "pool": self.pool,
                               "proxy_items": o.proxy_items})]

    def _tell(self, told) -> None:
        if self.genome_mode:
            self._tell_genome(told)
            return
        for cand, result in told:
            role = self._waiting.pop(cand.id)
            if role == "probe":
                self.spent += self.options.probe_cost
                if result.ok:
                    self.cosines.append(result.payload)
                    self._step(result.payload)
                else:  # nothing learned: probe the same iterate again, next ask
                    self.history.append({"iteration": self.t, "probe": "failed"})
            else:
                self.spent += 1.0
                loss = self.problem.scalar_loss(result.values) if result.ok else np.inf
                if cand.id in self._soft:
                    self._soft_scores[cand.id] = loss
                else:
                    self._advance(loss)
        if self._soft and not self._waiting and self._soft_pending is None:
            self._finish_soft()

    def _step(self, payload: dict[str, Any]) -> None:
        o = self.options
        if payload["sources"] != self.pool:
            raise StrategyError("frank_wolfe: a probe answered for other sources than the pool")
        if not self.tensors:
            self.tensors = list(payload["tensors"])
        if o.granularity == "layer":
            self._widen(len(self.tensors))
        gamma = fw_gamma(self.t, o.step_size)
        keys = [TOTAL] if o.variant == "hard" else [k for k in payload["keys"] if k != TOTAL]
        vertices = []
        for key in keys:
            cos = np.asarray(payload["cos"][key], dtype=float)  # [sources, tensors]
            v = oracle(cos, o.granularity, -o.min_cosine if self.base_vertex else None)
            vertices.append(v if self.c.shape[1] > 1 else v[:, :1])
        picks = [[self.pool[i] if v[i, p] else "base" for p, i in
                  enumerate(np.argmax(v, axis=0))] for v in vertices]
        self.history.append({"iteration": self.t, "gamma": gamma, "keys": keys,
                             "picks": [sorted(set(p)) for p in picks],
                             "loss": payload.get("loss", {})})
        if o.variant == "hard":
            if o.ties_density is not None:
                self.recipe_next = self._ties_recipe(vertices[0], gamma * o.scaling)
            else:
                self._next_c = hard_step(self.c, vertices[0], gamma, o.scaling)
            return
        alphas = [np.full(len(keys), o.scaling)]
        alphas += [self._rng.uniform(0, 2 * o.scaling, len(keys))
                   for _ in range(o.soft_trials - 1)]
        self._soft_pending = [soft_step(self.c, vertices, a, gamma) for a in alphas]

    def _rejects(self, loss: float) -> bool:
        """Whether the guard keeps the iterate instead of a step scored ``loss``."""
        return self.options.guard and not loss <= self.loss

    def _finish_soft(self) -> None:
        best = min(self._soft, key=lambda cid: (self._soft_scores.get(cid, np.inf), cid))
        loss = self._soft_scores.get(best, np.inf)
        if self._rejects(loss):
            self.history[-1]["rejected"] = True
        else:
            self.c, self.loss = self._soft[best], loss
            self.history[-1]["chosen"] = best
        self._soft, self._soft_scores = {}, {}
        self.t += 1

    def _advance(self, loss: float) -> None:
        """The hard step's iterate was scored: it becomes ``x_{t+1}`` (unless the guard
        rejects it)."""
        if self._rejects(loss):
            self.history[-1]["rejected"] = True
        elif self.recipe_next is not None:
            self.recipe, self.loss = self.recipe_next, loss
        else:
            self.c, self.loss = self._next_c, loss
        self._next_c, self.recipe_next = None, None
        self.history[-1]["score_loss"] = None if not np.isfinite(loss) else float(loss)
        self.t += 1

    # -- genome mode (no recipe space): finite differences instead of the probe ----------

    def _ask_genome(self, n: int) -> list[Proposal]:
        """Each iteration one batch: the iterate itself, then two points per dimension."""
        p = self.problem
        x = self.c[:, 0]
        if not self._fd and not self._fd_loss:
            # a seeded jitter of the difference step, so that runs are the seed's own
            h = self.options.fd_step * (p.high - p.low) * self._rng.uniform(0.5, 1.5)
            self._fd = [(-1, 0, 0.0)] + [
                (d, s, float(min(max(x[d] + s * h[d], p.low[d]), p.high[d])))
                for d in range(p.n_dims) for s in (1, -1)]
        out = []
        for k, (d, s, value) in enumerate(self._fd[:n]):
            g = list(x)
            if d >= 0:
                g[d] = value
            self._waiting[self._next_id + k] = f"fd:{d}:{s}:{value!r}"
            out.append(Proposal(genome=p.clip(g), meta={
                "iteration": self.t, "role": "iterate" if d < 0 else "difference"}))
        self._fd = self._fd[n:]
        return out

    def _tell_genome(self, told) -> None:
        for cand, result in told:
            _, d, s, value = self._waiting.pop(cand.id).split(":", 3)
            self.spent += 1.0
            loss = self.problem.scalar_loss(result.values) if result.ok else np.inf
            self._fd_loss[(int(d), int(s))] = (loss, float(value))
        if not self._fd and not self._waiting:
            self._genome_step()

    def _genome_step(self) -> None:
        p = self.problem
        x = self.c[:, 0]
        self._fx = self._fd_loss.pop((-1, 0))[0]
        self.history.append({"iteration": self.t,
                             "score_loss": float(self._fx) if np.isfinite(self._fx) else None})
        grad, curv = np.zeros(p.n_dims), np.full(p.n_dims, np.nan)
        for d in range(p.n_dims):
            (fp, xp), (fm, xm) = self._fd_loss[(d, 1)], self._fd_loss[(d, -1)]
            if np.isfinite(fp) and np.isfinite(fm) and xp != xm:
                grad[d] = (fp - fm) / (xp - xm)
                if xp > x[d] > xm:  # a second difference around x (not at a bound)
                    a, b = xp - x[d], x[d] - xm
                    curv[d] = 2 * ((fp - self._fx) / a + (fm - self._fx) / b) / (a + b)
        self._fd_loss = {}
        vertex = np.where(grad > 0, p.low, np.where(grad < 0, p.high, x))
        u = vertex - x
        gamma = 2.0 / (self.t + 2.0)  # the open-loop step, unless a curvature is known
        if np.all(np.isfinite(curv)) and np.isfinite(self._fx):
            bend = float(np.sum(curv * u * u))
            slope = float(grad @ u)
            if bend > 0:  # the minimum of the diagonal quadratic model along u
                gamma = float(min(max(-slope / bend, 0.0), 1.0))
        self.c = (x + gamma * u).reshape(-1, 1)
        self.t += 1
