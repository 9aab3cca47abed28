"""Ray Tune adapter: let Tune drive a mergesearch strategy and score recipes in its actors.

For users who already run their sweeps with Ray Tune (schedulers, loggers, the
cluster set-up, ``Tuner.restore``).  Three pieces:

* :class:`MergeSearcher` -- a Tune ``Searcher`` around any registered strategy.
  ``suggest`` is ``strategy.ask(1)``; ``on_trial_complete`` is ``strategy.tell``.
  When the strategy must wait for results (a generation boundary: ``ask``
  returns nothing) ``suggest`` returns ``None``, Tune's "nothing right now", and
  Tune asks again after the next trial completes; ``Searcher.FINISHED`` once the
  strategy is ``done``.
* :class:`MergeTrainable` (bind it with :func:`merge_trainable`) -- a Tune class
  trainable that builds one :class:`~mergesearch.execution.worker.Worker` in
  ``setup`` (models loaded once) and keeps it across trials: ``reset_config``
  returns True, so ``TuneConfig(reuse_actors=True)`` hands the loaded worker
  the next candidate.  Each trial is one ``step``: decode, merge, evaluate.
* :func:`tune_search` -- both built from an :class:`~mergesearch.experiment.Experiment`
  and run by a ``Tuner`` (``budget.evaluations`` -> ``num_samples``).

What a trial sees and reports (flat, so Tune's tables and ``metric=`` can name it):

* config: ``{dimension name: value, ..., "candidate_id": id, "fidelity": f}``
  (dimension names are the genome's, e.g. ``weight[rev]@L0-1``);
* result: every objective by name, ``weighted_loss`` when there are several
  objectives, ``candidate_id``, ``status`` ("ok" / "failed"), ``reason`` (failed
  only), ``scores`` (task -> metric -> value) and ``timings`` (seconds).

Metric and mode.  One objective: Tune's metric is that objective and its mode
follows its direction.  Several: the strategy always sees all of them (a
multi-objective strategy builds its Pareto front from them); Tune's metric
defaults to ``weighted_loss`` (mode ``min``), the same weighted sum of losses a
single-objective strategy optimises (:meth:`Problem.scalar_loss`); pass
``metric="<objective>"`` to rank Tune's results by one objective instead.

Failures.  A candidate that fails (the merge raises, NaN scores, a recipe the
space cannot decode) raises :class:`CandidateFailed` in ``step`` by default:
Tune marks the trial ERROR (the reason is in its error file) and the searcher
tells the strategy "failed".  Tune does not reuse an actor whose trial raised,
so the next trial loads the models again; ``raise_on_failure=False`` reports the
failure instead (``status="failed"``, objectives NaN, the reason in ``reason``),
the trial ends TERMINATED and the actor is kept.  A trial Tune stops before it
reports (experiment stopped, time budget) is told as failed too, so a
generation-based strategy is never left waiting.

State.  ``save``/``restore`` (and pickling, which ``Tuner`` does to the search
algorithm) carry the strategy's JSON ``state_dict()`` plus the trial-id ->
candidate-id map, never the strategy's internals; restoring rebuilds the
strategy from its seed and replays its log, so ``Tuner.restore`` continues the
same search.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.variant_generator import _has_unresolved_values

from mergesearch.evaluation import EvaluatorConfig
from mergesearch.execution.worker import WorkerSpec, make_worker
from mergesearch.space import Space, SpaceError, load_space
from mergesearch.strategies import Objective, Problem, Strategy, StrategyError, create_strategy
from mergesearch.trial import Candidate, Result

if TYPE_CHECKING:
    from ray.tune import ResultGrid

    from mergesearch.controller import BoundExperiment
    from mergesearch.experiment import Experiment

log = logging.getLogger(__name__)

CANDIDATE_ID = "candidate_id"
FIDELITY = "fidelity"
WEIGHTED_LOSS = "weighted_loss"
STATUS = "status"
REASON = "reason"
SCORES = "scores"
TIMINGS = "timings"
RECIPE_FILE = "mergesearch_recipe.json"  # in each trial's Tune checkpoint

#: Config keys besides the genome's dimensions.
CONFIG_KEYS = frozenset({CANDIDATE_ID, FIDELITY})
#: Result keys that objectives may not take: ours and the ones Tune fills in.
RESULT_KEYS = frozenset({
    CANDIDATE_ID, WEIGHTED_LOSS, STATUS, REASON, SCORES, TIMINGS, "config", "date", "done",
    "episodes_total", "experiment_id", "experiment_tag", "hostname", "iterations_since_restore",
    "node_ip", "pid", "should_checkpoint", "time_since_restore", "time_this_iter_s",
    "time_total_s", "timestamp", "timesteps_since_restore", "timesteps_total",
    "training_iteration", "trial_id", "checkpoint_dir_name"})

STATE_VERSION = 1


class CandidateFailed(RuntimeError):
    """A candidate could not be merged or scored; raised in a trial so Tune marks it ERROR."""


# -- config and result <-> mergesearch objects -------------------------------------------


def candidate_config(problem: Problem, candidate: Candidate) -> dict[str, Any]:
    """The Tune config of a candidate: its genome by dimension name, its id and fidelity."""
    if candidate.genome is None or candidate.is_probe:
        what = "a probe" if candidate.is_probe else "a recipe it built"
        raise CandidateFailed(f"candidate {candidate.id} is {what}: Tune trials are points of "
                              "the search space; run such strategies with `mergesearch run`")
    config: dict[str, Any] = dict(zip(problem.names, candidate.genome, strict=True))
    config[CANDIDATE_ID] = candidate.id
    config[FIDELITY] = candidate.fidelity
    return config


def config_candidate(config: Mapping[str, Any], names: list[str]) -> Candidate:
    """The candidate a Tune config stands for (the inverse of :func:`candidate_config`)."""
    missing = [n for n in [*names, CANDIDATE_ID] if n not in config]
    if missing:
        raise CandidateFailed(f"trial config lacks {', '.join(missing)}: trials of a "
                              "MergeTrainable must be suggested by a MergeSearcher")
    return Candidate(id=int(config[CANDIDATE_ID]), genome=[float(config[n]) for n in names],
                     fidelity=float(config.get(FIDELITY, 1.0)))


def result_metrics(result: Result, problem: Problem) -> dict[str, Any]:
    """What a trial reports for a result: objectives (NaN when failed), status, scores."""
    out: dict[str, Any] = {CANDIDATE_ID: result.candidate_id, STATUS: result.status}
    for o in problem.objectives:
        out[o.name] = float(result.values[o.name]) if result.ok else math.nan
    if problem.multi_objective:
        out[WEIGHTED_LOSS] = problem.scalar_loss(result.values) if result.ok else math.nan
    if not result.ok:
        out[REASON] = result.reason or "failed"
    out[SCORES] = {task: dict(metrics) for task, metrics in result.scores.items()}
    out[TIMINGS] = dict(result.timings)
    return out


def metrics_result(candidate_id: int, metrics: Mapping[str, Any] | None, problem: Problem,
                   *, error: bool = False) -> Result:
    """The result a strategy is told for what a trial reported (or failed to report)."""
    if error:
        return Result.failed(candidate_id, "the Ray Tune trial raised (see its error file)")
    if not metrics:
        return Result.failed(candidate_id, "Ray Tune stopped the trial before it reported")
    if metrics.get(STATUS, "ok") != "ok":
        return Result.failed(candidate_id, str(metrics.get(REASON) or "failed"))
    missing = [o.name for o in problem.objectives if o.name not in metrics]
    if missing:
        return Result.failed(candidate_id, f"the trial reported no {', '.join(missing)}")
    try:
        values = {o.name: float(metrics[o.name]) for o in problem.objectives}
    except (TypeError, ValueError) as err:
        return Result.failed(candidate_id, f"the trial reported a non-number objective: {err}")
    return Result(candidate_id=candidate_id, values=values).check_finite()


def _check_names(problem: Problem) -> None:
    clash = sorted(set(problem.names) & CONFIG_KEYS)
    if clash:
        raise StrategyError(f"dimension name(s) {clash} are reserved for the Tune config; "
                            "rename the search-space parameter")
    clash = sorted({o.name for o in problem.objectives} & RESULT_KEYS)
    if clash:
        raise StrategyError(f"objective name(s) {clash} clash with keys of a Tune result; "
                            "rename the objective")


# -- the searcher --------------------------------------------------------------------------


class MergeSearcher(Searcher):
    """A Ray Tune searcher that runs a mergesearch strategy (ask -> suggest, tell <- complete).

    ``strategy`` is a built :class:`Strategy`, or a registered strategy's name together
    with the ``problem`` (and ``options``, ``seed``).  ``metric``/``mode`` default as the
    module doc says.  Use :meth:`from_search` to build it from an experiment.
    """

    def __init__(self, strategy: Strategy | str, problem: Problem | None = None, *,
                 options: dict[str, Any] | None = None, seed: int = 0,
                 metric: str | None = None, mode: str | None = None):
        if isinstance(strategy, str):
            if problem is None:
                raise StrategyError(f"MergeSearcher({strategy!r}): a strategy given by name "
                                    "needs the problem")
            strategy = create_strategy(strategy, problem, options, seed=seed)
        elif problem is not None and problem != strategy.problem:
            raise StrategyError("MergeSearcher: the problem differs from the strategy's own")
        _check_names(strategy.problem)
        self.strategy = strategy
        metric = metric or default_metric(strategy.problem)
        super().__init__(metric=metric, mode=mode or self._mode_for(metric))
        self._trials: dict[str, int] = {}  # Tune trial id -> candidate id, while in flight

    @classmethod
    def from_search(cls, search: BoundExperiment | Experiment, **kwargs: Any) -> MergeSearcher:
        """Wrap the strategy a :class:`~mergesearch.controller.BoundExperiment` (or an experiment,
        made into one; this builds the zoo if it names ``zoo:`` models) has built."""
        return cls(_as_search(search).strategy, **kwargs)

    @property
    def problem(self) -> Problem:
        return self.strategy.problem

    def _mode_for(self, metric: str) -> str:
        if metric == WEIGHTED_LOSS:
            return "min"
        for o in self.problem.objectives:
            if o.name == metric:
                return "max" if o.direction == "maximize" else "min"
        raise StrategyError(f"metric {metric!r} is not an objective ("
                            f"{', '.join(o.name for o in self.problem.objectives)}) nor "
                            f"{WEIGHTED_LOSS!r}: pass mode='min' or 'max' with it")

    # -- Tune's Searcher contract ----------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        """Take Tune's metric/mode; refuse a ``param_space`` with search domains (the
        strategy proposes every searched value, Tune then says so clearly)."""
        if config and _has_unresolved_values(config):
            return False
        if metric:
            self._metric = metric
            self._mode = mode or self._mode_for(metric)
        elif mode:
            self._mode = mode
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next candidate's config; None while the strategy waits for results;
        ``FINISHED`` when it is done."""
        if self.strategy.done:
            return Searcher.FINISHED
        asked = self.strategy.ask(1)
        if not asked:
            if self.strategy.done:
                return Searcher.FINISHED
            if not self.strategy.pending:  # nothing in flight would ever unblock it
                log.warning("strategy %s proposes nothing and waits for no result: stopping",
                            self.strategy.name)
                return Searcher.FINISHED
            return None
        cand = asked[0]
        self._trials[trial_id] = cand.id
        return candidate_config(self.problem, cand)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """Tell the strategy what the trial reported; an error or no result is "failed"."""
        cid = self._trials.pop(trial_id, None)
        if cid is None:  # not ours (or already told)
            return
        told = metrics_result(cid, result, self.problem, error=error)
        if not told.ok:
            log.warning("candidate %d (trial %s) failed: %s", cid, trial_id, told.reason)
        self.strategy.tell([told])

    # -- state: JSON only ------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """Plain JSON: the strategy's ``state_dict()`` and the trials in flight."""
        return {"version": STATE_VERSION, "strategy": self.strategy.state_dict(),
                "trials": dict(self._trials), "metric": self._metric, "mode": self._mode}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`'s output into a searcher built for the same problem."""
        if state.get("version") != STATE_VERSION:
            raise StrategyError(f"unsupported MergeSearcher state version {state.get('version')}")
        self.strategy.load_state_dict(state["strategy"])
        self._trials = {str(k): int(v) for k, v in state["trials"].items()}
        self._metric, self._mode = state["metric"], state["mode"]

    def save(self, checkpoint_path: str) -> None:
        # Tune writes to a temporary name and renames it into place (Searcher.save_to_dir).
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))

    def __getstate__(self) -> dict[str, Any]:
        # Tuner pickles its search algorithm: send the recipe to rebuild, not pycma/Optuna.
        s = self.strategy
        return {"cls": type(s), "problem": s.problem, "options": s.options.model_dump(mode="json"),
                "seed": s.seed, "state": self.get_state()}

    def __setstate__(self, data: dict[str, Any]) -> None:
        strategy = data["cls"](data["problem"], data["options"], seed=data["seed"])
        self.__init__(strategy, metric=data["state"]["metric"], mode=data["state"]["mode"])
        self.set_state(data["state"])


def default_metric(problem: Problem) -> str:
    """Tune's metric for a problem: its objective, or ``weighted_loss`` for several."""
    return WEIGHTED_LOSS if problem.multi_objective else problem.objectives[0].name


# -- the trainable -------------------------------------------------------------------------


def space_data(space: Space) -> dict[str, Any]:
    """A bound search space as plain data (what a trial actor needs to rebuild it)."""
    return {"config": space.config.model_dump(mode="json"), "base": space.base,
            "sources": dict(space.sources), "num_layers": space.num_layers,
            "layer_key": space.layer_key, "seed": space.seed}


def bind_space(data: Space | Mapping[str, Any]) -> Space:
    """The inverse of :func:`space_data` (a bound space passes through)."""
    if not isinstance(data, Mapping):  # a bound space passes through
        return data
    return load_space(data["config"], base=data["base"], sources=dict(data["sources"]),
                      num_layers=int(data["num_layers"]), layer_key=data["layer_key"],
                      seed=int(data["seed"]))


class MergeTrainable(tune.Trainable):
    """One candidate per trial, merged and scored by a worker that outlives the trial.

    Bind its set-up arguments with :func:`merge_trainable` (``tune.with_parameters``):
    ``worker_spec`` (a :class:`WorkerSpec` or its fields), ``space`` (from
    :func:`space_data`, or a bound space) and ``raise_on_failure``.
    """

    def setup(self, config: dict[str, Any], *, worker_spec: WorkerSpec | Mapping[str, Any],
              space: Space | Mapping[str, Any], raise_on_failure: bool = True) -> None:
        if not isinstance(worker_spec, WorkerSpec):
            worker_spec = WorkerSpec(**worker_spec)
        self.space = bind_space(space)
        evaluator = EvaluatorConfig.model_validate(worker_spec.evaluator)
        self.problem = Problem(tuple(self.space.dims), tuple(
            Objective(o.name, o.direction, o.weight) for o in evaluator.objectives))
        self.raise_on_failure = raise_on_failure
        self.worker = make_worker(worker_spec)  # loads the models: once per actor
        self.recipe: str | None = None  # the current trial's recipe, as JSON

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        return True  # the worker holds no per-trial state: reuse it as it is

    def step(self) -> dict[str, Any]:
        cand = config_candidate(self.config, self.space.names)
        self.recipe = None
        try:
            cand.recipe = self.space.decode(cand.genome)
        except SpaceError as err:
            result = Result.failed(cand.id, str(err))
        else:
            self.recipe = cand.recipe.to_json()
            result = self.worker.evaluate(cand)
        if not result.ok and self.raise_on_failure:
            raise CandidateFailed(f"candidate {cand.id}: {result.reason}")
        return {**result_metrics(result, self.problem), "done": True}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """A trial's checkpoint is the recipe it scored (Tune checkpoints class trainables
        at the end by default); ``mergesearch merge`` builds the checkpoint from it."""
        if self.recipe is not None:
            Path(checkpoint_dir, RECIPE_FILE).write_text(self.recipe + "\n")

    def load_checkpoint(self, checkpoint: Any) -> None:
        pass  # a trial is one step: nothing to resume


def merge_trainable(spec: BoundExperiment | WorkerSpec, space: Space | None = None, *,
                    raise_on_failure: bool = True,
                    resources: dict[str, float] | None = None) -> type[tune.Trainable]:
    """:class:`MergeTrainable` bound to a worker spec and a space, ready for ``Tuner``.

    ``spec`` is a :class:`~mergesearch.controller.BoundExperiment` (its worker spec and space) or a
    :class:`WorkerSpec` with ``space``.  Each trial asks for ``resources`` (default one
    CPU, plus one GPU when the worker's device is CUDA).
    """
    if isinstance(spec, WorkerSpec):
        if space is None:
            raise TypeError("merge_trainable(worker_spec, space): the space is missing")
        worker_spec = spec
    else:
        worker_spec, space = spec.worker_spec, space or spec.space
    trainable = tune.with_parameters(MergeTrainable, worker_spec=dataclasses.asdict(worker_spec),
                                     space=space_data(space), raise_on_failure=raise_on_failure)
    if resources is None:
        resources = {"cpu": 1}
        if worker_spec.device.startswith("cuda"):
            resources["gpu"] = 1
    return tune.with_resources(trainable, resources)


# -- the one call ----------------------------------------------------------------------------


def tune_search(experiment: Experiment | BoundExperiment, *, num_samples: int | None = None,
                raise_on_failure: bool = True, **tuner_kwargs: Any) -> ResultGrid:
    """Run an experiment's search with Ray Tune; returns Tune's ``ResultGrid``.

    ``num_samples`` defaults to ``budget.evaluations`` (unbounded if unset) and
    ``budget.wall_time`` becomes ``time_budget_s``.  ``tuner_kwargs`` go to
    ``tune.Tuner``: a ``tune_config`` given there is kept (its ``search_alg`` must be
    empty; ``reuse_actors`` is forced on, metric/mode default to the searcher's); the
    default ``run_config`` writes Tune's files under ``<run dir>/tune``.  Nothing is
    written to the mergesearch study: Tune's experiment folder is the record.
    Pass a :class:`~mergesearch.controller.BoundExperiment` to keep a handle on its strategy.
    """
    search = _as_search(experiment)
    exp = search.exp
    searcher = MergeSearcher.from_search(search)
    tune_config = tuner_kwargs.pop("tune_config", None) or tune.TuneConfig()
    if tune_config.search_alg is not None:
        raise ValueError("tune_search builds its own search_alg: leave TuneConfig.search_alg "
                         "unset (or build a tune.Tuner with MergeSearcher yourself)")
    if num_samples is None:
        num_samples = exp.budget.evaluations if exp.budget.evaluations is not None else -1
    changes: dict[str, Any] = {"search_alg": searcher, "num_samples": num_samples,
                               "reuse_actors": True}
    if tune_config.metric is None:
        changes |= {"metric": searcher.metric, "mode": searcher.mode}
    if tune_config.time_budget_s is None and exp.budget.wall_time is not None:
        changes["time_budget_s"] = exp.budget.wall_time
    tune_config = dataclasses.replace(tune_config, **changes)
    run_config = tuner_kwargs.pop("run_config", None) or tune.RunConfig(
        name=search.study_name, storage_path=str((exp.run_dir / "tune").resolve()))
    tuner = tune.Tuner(merge_trainable(search, raise_on_failure=raise_on_failure),
                       tune_config=tune_config, run_config=run_config, **tuner_kwargs)
    return tuner.fit()


def _as_search(search: BoundExperiment | Experiment) -> BoundExperiment:
    from mergesearch.controller import BoundExperiment

    if isinstance(search, BoundExperiment):
        return search
    return BoundExperiment(search, progress=False)
