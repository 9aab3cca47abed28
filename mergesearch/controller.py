"""The search loop: ask -> dispatch -> record + checkpoint -> wait -> tell, until the budget.

The controller is the one place that knows every part.  Its durability rule,
in two halves: a trial is written only after a checkpoint of the strategy
state that knows its candidate (was asked), and a checkpoint holds a ``tell``
only after that result's trial is written.  So after a kill at any moment
every recorded trial belongs to a candidate the saved state knows, told or
pending; resuming tells the strategy the pending ones already recorded, in the
order they were recorded, and dispatches the rest again.  No recorded trial
is lost or evaluated twice.

Within that rule a freed worker waits for nothing but the next ``ask``: when
a result arrives the strategy hears of it at once, the next candidates are
asked for and dispatched, and only then is the result written and the state
checkpointed, while Ray workers already evaluate (the local executor runs its
candidate in the next ``wait``).  One write per trial, one small append per
checkpoint (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mergesearch import fingerprint
from mergesearch.errors import MergesearchError
from mergesearch.evaluation import EvaluatorConfig
from mergesearch.evaluation.base import EvaluationError
from mergesearch.execution.worker import WorkerSpec
from mergesearch.experiment import Experiment, ExperimentError
from mergesearch.merging.layers import layer_key
from mergesearch.models.checkpoint import ModelLoadError
from mergesearch.models.lora import open_checkpoint
from mergesearch.objectives import exact_objectives
from mergesearch.space import SpaceError, load_space
from mergesearch.spaces import read_space
from mergesearch.storage import StorageError, StudyExists, TrialRecord, TrialStore, lease
from mergesearch.storage.trials import REPORT
from mergesearch.strategies import Objective, Problem, Strategy, create_strategy
from mergesearch.trial import Candidate, Result, split_tracked, tracked_values

log = logging.getLogger(__name__)


class SearchError(MergesearchError, ValueError):
    """A search cannot start as configured; the message names the problem and the fix."""


@dataclass
class RunSummary:
    """How a run ended, and where to find what it wrote."""

    study: str
    storage: str
    run_dir: Path
    objectives: list[Objective]
    finished: int  # trials finished in the study (ok + failed), all runs together
    ok: int
    failed: int
    cached: int
    evaluated_now: int  # evaluations run by this invocation
    stopped: str  # "budget", "wall time", "strategy done"
    elapsed: float
    front: list[TrialRecord] = field(default_factory=list)
    probes: int = 0  # probes answered, all runs together (not trials)
    cost: float = 0.0  # items scored by every trial and probe, all runs together
    report: dict[str, Any] | None = None  # the chosen trial on the report items (score_report)


def resolve_model(ref: str, exp: Experiment, *, progress: bool = False) -> str:
    """A model reference as the merger opens it: zoo names built on demand, relative
    paths found, recipe-defined models and anything else passed on (a hub id).  With
    ``models.loader`` a reference is whatever the loader takes: one that looks like a
    path and is found becomes absolute, any other is passed on as written."""
    if ref.startswith("recipe:"):
        return ref
    if exp.models.loader is not None:
        found = exp.find(ref) if ref.startswith((".", "~")) or "/" in ref else None
        return str(found) if found is not None else ref
    if ref.startswith("zoo:"):
        name = ref.removeprefix("zoo:")
        if name.startswith("hard/"):
            from mergesearch.zoo.hard import build_hard_zoo

            zoo, name = build_hard_zoo(progress=progress), name.removeprefix("hard/")
        else:
            from mergesearch.zoo import build_zoo

            zoo = build_zoo(progress=progress)
        try:
            return str(zoo.model_path(name))
        except KeyError as err:
            raise ExperimentError(f"models: {err.args[0]}") from None
    found = exp.find(ref)
    if found is not None:
        return str(found)
    # "org/name" is a hub id unless "org" is a folder here: then it is a path that is missing
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") != 1 \
        or exp.find(ref.split("/")[0]) is not None
    if looks_local:
        raise ExperimentError(f"models: {ref!r} not found (no such directory; relative paths "
                              "are looked up from here and from the experiment's folder)")
    return ref  # a hub id: fetched (or found in the hub cache) when opened


class BoundExperiment:
    """An experiment made concrete: models found, space bound, problem and worker spec built.

    Nothing is written to disk here; every check a user can fail runs first.
    """

    def __init__(self, exp: Experiment, *, study: str | None = None, progress: bool = True):
        self.exp = exp
        self.study_name = study or exp.name
        device = check_device(exp.execution.device, local=exp.execution.backend == "local")
        models = exp.models
        self.base = resolve_model(models.base, exp, progress=progress) if models.base else None
        self.sources = {n: resolve_model(r, exp, progress=progress)
                        for n, r in models.sources.items()}
        first = self.base or next(iter(self.sources.values()))
        try:
            if models.loader is not None:  # any torch module: layers read from its names
                from mergesearch.models.generic import LoadedCheckpoint

                ckpt = LoadedCheckpoint.load(models.loader, first)
            else:
                ckpt = open_checkpoint(first, allow_pickle=models.allow_pickle, base=self.base)
            num_layers = ckpt.num_layers
            key = layer_key(ckpt.names)
        except ModelLoadError as err:
            raise ExperimentError(f"models: {err}") from None
        space_src = exp.space
        if isinstance(space_src, str):
            found = exp.find(space_src)
            if found is None:
                raise ExperimentError(f"space: search space file {space_src!r} not found")
            space_src = found
        try:
            config, kind = read_space(space_src)
            counts = None
            if kind.name == "layer_path":  # a path may run models of different depths
                counts = {n: open_checkpoint(r, allow_pickle=models.allow_pickle,
                                             base=self.base).num_layers
                          for n, r in self.sources.items() if not r.startswith("recipe:")}
            self.space = load_space(config, base=self.base, sources=self.sources,
                                    num_layers=num_layers, layer_key=key, seed=exp.seed,
                                    tensor_names=ckpt.names, layer_counts=counts)
        except SpaceError as err:
            raise ExperimentError(str(err)) from None
        objectives = tuple(Objective(o.name, o.direction, o.weight)
                           for o in exp.evaluator.objectives)
        self.problem = Problem(tuple(self.space.dims), objectives, decode=self.space.decode,
                               exact=exact_objectives(self.space.decode,
                                                      exp.evaluator.objectives))
        self.strategy = create_strategy(exp.strategy.name, self.problem, exp.strategy.options,
                                        seed=exp.seed)
        if self.problem.multi_objective and not self.strategy.multi_objective:
            log.info("%s optimises one scalar: the weighted sum of %d objectives",
                     self.strategy.name, len(objectives))
        evaluator, suite = exp.evaluator.model_dump(mode="json"), None
        if exp.evaluator.backend != "python":  # hf, vllm, lm_eval: a tokenizer, maybe a suite
            if exp.evaluator.suite is not None:
                suite = exp.find(exp.evaluator.suite)
                if suite is None:
                    raise ExperimentError(f"evaluator.suite: {exp.evaluator.suite!r} not found")
                evaluator["suite"] = str(suite)
            estimator = evaluator.get("estimator")
            if isinstance(estimator, dict) and estimator.get("sources"):  # paths as the models'
                estimator["sources"] = [r if r.startswith("zoo:") else str(exp.find(r) or r)
                                        for r in estimator["sources"]]
        else:  # a function by import path: checked here, before the workers start
            from mergesearch.models.generic import import_function

            try:
                import_function(exp.evaluator.function, "evaluator.function")
            except ModelLoadError as err:
                raise ExperimentError(str(err)) from None
        # tasks, data files, objective and tracked metrics: checked before any worker starts
        self.tracked = check_evaluator(exp.evaluator, suite)
        start = self.space.start
        dtype = exp.execution.dtype or start.dtype
        self.worker_spec = WorkerSpec(
            # the python backend needs no tokenizer
            tokenizer=None if exp.evaluator.backend == "python" else first,
            evaluator=evaluator, device=exp.execution.device, dtype=dtype,
            hold_sources=exp.execution.hold_sources,
            allow_pickle=models.allow_pickle, trust_remote_code=models.trust_remote_code,
            check_recipe=start.to_dict(),
            worker_class=exp.execution.worker_class,
            loader=models.loader)
        self.device_type = "cuda" if exp.execution.gpus_per_worker > 0 else device.type
        self.suite = suite

    def evaluate(self, recipe) -> Result:
        """Score one recipe as a trial would be scored, on a worker built for it in this
        process (whatever the execution backend; models loaded once more)."""
        from mergesearch.execution import make_worker

        worker = make_worker(self.worker_spec)
        try:
            return worker.evaluate(Candidate(id=0, genome=[], recipe=recipe))
        finally:
            worker.close()

    def fingerprint(self) -> dict[str, Any]:
        """What this search's results depend on, by content: a resumed study must match it
        (see :mod:`mergesearch.fingerprint`)."""
        return fingerprint.of_search(self)

    def make_executor(self):
        """The executor the experiment asks for, its workers started (models loaded)."""
        from mergesearch.execution import LocalExecutor, make_worker

        ex = self.exp.execution
        if ex.backend == "local":
            try:
                return LocalExecutor(make_worker(self.worker_spec))
            except ValueError as err:  # a bad worker_class
                raise ExperimentError(str(err)) from None
        from mergesearch.execution.ray_executor import RayExecutor

        return RayExecutor(self.worker_spec, workers=ex.workers, address=ex.address,
                           cpus_per_worker=ex.cpus_per_worker, gpus_per_worker=ex.gpus_per_worker,
                           queue=ex.queue, max_retries=ex.max_retries,
                           start_timeout=ex.start_timeout)

    # -- storage ------------------------------------------------------------------------

    def check_not_held(self) -> None:
        """Refuse at once if another live search is writing this study (read-only: the
        lease itself is taken by :meth:`open_store`)."""
        url, name = self.exp.storage_url, self.study_name
        if not TrialStore.exists(url, name):
            return
        store = TrialStore.open(url, name)
        holder = store.lease_holder()
        if holder is not None and lease.stale(holder) is None:
            raise lease.held(store.where, holder)

    def open_store(self, *, resume: bool | None, overwrite: bool,
                   new_epoch: bool = False) -> TrialStore:
        """Create the study, or reopen it to resume (``resume=None``: if it exists).

        Either way this search becomes the study's one writer (its lease); a study another
        live search writes is refused, and so is resuming one whose fingerprint differs.
        """
        url, name = self.exp.storage_url, self.study_name
        exists = TrialStore.exists(url, name)
        if resume and not exists:
            raise StorageError(f"--resume: there is no study {name!r} in {url} to resume")
        record = self.exp.model_dump(mode="json") | {"study": name}
        now = self.fingerprint()
        if exists:
            store = TrialStore.open(url, name, self.space.dims)
            store.take_lease()  # refused while another search writes it: before any change
            try:
                if overwrite:
                    store.release_lease()
                else:
                    self._check_same(store, now, new_epoch=new_epoch)
                    store.set_experiment(record)
                    return store
            except BaseException:
                store.release_lease()
                raise
        try:
            store = TrialStore.create(url, name, self.problem.objectives, self.space.dims,
                                      record, overwrite=overwrite,
                                      make_parent=self.exp.storage is None)
        except StudyExists:  # another search created it a moment ago: its lease says who
            TrialStore.open(url, name, self.space.dims).take_lease().release()
            raise
        store.take_lease()
        store.set_fingerprint(now)
        return store

    def _check_same(self, store: TrialStore, now: dict[str, Any], *,
                    new_epoch: bool = False) -> None:
        before = store.fingerprint
        if before is None:  # a study from before fingerprints: compare the experiment
            old = Experiment.from_dict(
                {k: v for k, v in store.experiment.items() if k != "study"}).fingerprint()
            new = self.exp.fingerprint()
            before, now_cmp = old, new
        else:
            now_cmp = now
        keys = fingerprint.differences(before, now_cmp)
        if keys and new_epoch:
            epoch = store.start_epoch(now, self.strategy.state_dict())
            log.warning("%s continues as search epoch %d (different %s): its trials so far "
                        "are kept and counted; the strategy starts afresh", store.where,
                        epoch, "; ".join(keys))
        elif keys:
            raise StorageError(
                f"{store.where} was run with a different {'; '.join(keys)}: resume with the "
                "same experiment, pass --study NEW_NAME to start another search, "
                "--overwrite to replace it, or --new-epoch to continue it with a fresh "
                "strategy (its trials kept)")
        elif store.fingerprint is None:
            store.set_fingerprint(now)


def check_evaluator(config: EvaluatorConfig, suite: Path | None
                    ) -> dict[str, list[str] | None]:
    """Check what the evaluator is asked for against its suite, before any worker starts,
    and resolve ``evaluator.track``: each tracked name -> the tasks its mean is over.

    ``track`` names a metric (its mean over every task of the evaluator that produces it)
    or ``task/metric`` (one task's).  With the hf and vllm backends (one task reader, one
    set of metrics) the suite's task files are read (their data files found, not loaded)
    and checked: ``evaluator.tasks``, each objective's tasks and metric, and each tracked
    name; the python and lm_eval backends' metrics are only known once they score (a
    tracked bare name is then the mean over the tasks whose scores hold it: None)."""
    objectives = {o.name for o in config.objectives}
    tracked: dict[str, list[str] | None] = {}
    for name in config.track:
        task, metric = split_tracked(name)
        if not metric or task == "" or name != name.strip():
            raise EvaluationError(f"evaluator.track: {name!r} is not a metric name; give a "
                                  "metric (its mean over the tasks that produce it) or "
                                  "task/metric (one task's)")
        if name in tracked:
            raise EvaluationError(f"evaluator.track names {name!r} twice")
        if name in objectives:
            raise EvaluationError(f"evaluator.track: {name!r} is also the name of an "
                                  "objective (its values are recorded already); rename the "
                                  "objective or drop it from track")
        tracked[name] = None if task is None else [task]
    if config.backend == "lm_eval" and config.lm_eval is not None:
        from mergesearch.evaluation.lm_eval_config import check_task_names

        check_task_names(config.lm_eval, suite)
    if config.backend not in ("hf", "vllm") or suite is None:
        return tracked
    from mergesearch.evaluation.tasks import load_suite

    specs = load_suite(suite)  # a task file that cannot be read, or data not found: here
    names = list(dict.fromkeys(config.tasks or sorted(specs)))
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise EvaluationError(f"evaluator.tasks names unknown tasks {unknown}; the suite "
                              f"{config.suite!r} has {sorted(specs)}")
    loaded = {n: specs[n] for n in names}
    for o in config.objectives:
        if o.source != "evaluator":
            continue
        tasks = o.tasks or names
        missing = [t for t in tasks if t not in loaded]
        if missing:
            raise EvaluationError(f"objective {o.name!r} names tasks {missing} that the "
                                  f"evaluator does not load; choose from {names} (or add "
                                  "them to evaluator.tasks)")
        for t in tasks:
            if o.metric not in loaded[t].metrics:
                raise EvaluationError(
                    f"objective {o.name!r}: metric {o.metric!r} cannot be computed for task "
                    f"{t!r} ({loaded[t].output_type}); choose one of "
                    f"{list(loaded[t].metrics)}")
    for name, tasks in tracked.items():
        metric = split_tracked(name)[1]
        if tasks is None:
            tracked[name] = [t for t, spec in loaded.items() if metric in spec.metrics]
            if not tracked[name]:
                produced = sorted({m for spec in loaded.values() for m in spec.metrics})
                raise EvaluationError(f"evaluator.track: no task of the evaluator produces "
                                      f"{metric!r}{_other_source(metric)}; its tasks produce "
                                      f"{produced} (mergesearch metrics EXPERIMENT lists them "
                                      "per task)")
            continue
        task = tasks[0]
        if task not in loaded:
            raise EvaluationError(f"evaluator.track: {name!r} names task {task!r}, which the "
                                  f"evaluator does not load; choose from {names}")
        if metric not in loaded[task].metrics:
            raise EvaluationError(f"evaluator.track: {name!r}: task {task!r} "
                                  f"({loaded[task].output_type}) does not produce {metric!r}"
                                  f"{_other_source(metric)}; it produces "
                                  f"{list(loaded[task].metrics)}")
    return tracked


def _other_source(metric: str) -> str:
    """`` (... is a recipe metric ...)`` when ``metric`` is one, else empty."""
    from mergesearch.objectives import SOURCES, known_metrics

    for source in SOURCES[1:]:
        if metric in known_metrics(source):
            return (f" ({metric!r} is a {source} metric: only evaluator metrics can be "
                    f"tracked; make it an objective with source: {source})")
    return ""




def check_device(device: str, *, local: bool):
    """``execution.device`` parsed, and checked to exist here when workers run here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ExperimentError(f"execution.device: {device!r} is not a device (use cpu, cuda, "
                              "cuda:1, mps)") from None
    if not local or dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ExperimentError(f"execution.device: {device!r}, but torch sees no CUDA GPU "
                                  "here: use device: cpu, or run on a GPU machine")
        if dev.index is not None and dev.index >= count:
            raise ExperimentError(f"execution.device: {device!r}, but there are only {count} "
                                  f"GPU(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ExperimentError(f"execution.device: {device!r} is not available here")
    elif dev.type not in ("cuda", "mps"):
        raise ExperimentError(f"execution.device: {device!r}: mergesearch runs on cpu, cuda "
                              "or mps")
    return dev


def run(exp: Experiment, *, study: str | None = None, resume: bool | None = None,
        overwrite: bool = False, progress: bool = True,
        on_result: Callable[[Result], None] | None = None,
        new_epoch: bool = False) -> RunSummary:
    """Run (or resume) the search an experiment describes; returns how it ended.

    ``resume=None`` continues an existing study with the same experiment and starts
    a new one otherwise; ``True`` requires the study to exist; ``overwrite`` replaces it.
    """
    if exp.stages:
        return run_stages(exp, study=study, resume=resume, overwrite=overwrite,
                          progress=progress, on_result=on_result)[-1]
    search = BoundExperiment(exp, study=study, progress=progress)
    search.check_not_held()  # before minutes of model loading
    executor = search.make_executor()  # loads models: fails here, before anything is written
    try:
        store = search.open_store(resume=resume, overwrite=overwrite, new_epoch=new_epoch)
    except BaseException:
        executor.close()
        raise
    summary = SearchLoop(search, store, executor, progress, on_result).run()
    summary.report = score_report(exp, summary)
    return summary


def score_report(exp: Experiment, summary: RunSummary) -> dict[str, Any] | None:
    """Score the trial a run chose (``mergesearch export``'s default: the best weighted
    sum over the front) on the experiment's ``report`` items, once: the values are kept
    with the study and reused while the chosen trial and the report evaluator stay the
    same.  Returns ``{"trial", "values", "search", "evaluator"}``, or None without
    ``report`` or a completed trial.  It builds its own worker (models loaded once more)."""
    from mergesearch.recipe import Recipe
    from mergesearch.report import choose

    report = exp.report_experiment()
    if report is None or not summary.front:
        return None
    chosen = choose(summary.front, summary.objectives)
    evaluator = report.evaluator.model_dump(mode="json")
    store = TrialStore.open(exp.storage_url, summary.study)
    kept = store.study.user_attrs.get(REPORT)
    if kept and kept.get("trial") == chosen.number and kept.get("evaluator") == evaluator:
        return kept
    log.info("scoring trial %d on the report items", chosen.number)
    bound = BoundExperiment(report, study=summary.study, progress=False)
    result = bound.evaluate(Recipe.from_dict(chosen.recipe))
    if result.status != "ok":
        log.warning("trial %d could not be scored on the report items: %s", chosen.number,
                    result.reason)
        return None
    kept = {"trial": chosen.number, "values": dict(result.values),
            "search": {o.name: chosen.values[o.name] for o in summary.objectives},
            "evaluator": evaluator}
    store.study.set_user_attr(REPORT, kept)
    return kept


def stage_study(exp: Experiment, stage: str, study: str | None = None) -> str:
    """The study of one stage: ``<study>.<stage>``."""
    return f"{study or exp.name}.{stage}"


def run_stages(exp: Experiment, *, study: str | None = None, resume: bool | None = None,
               overwrite: bool = False, progress: bool = True,
               on_result: Callable[[Result], None] | None = None) -> list[RunSummary]:
    """Run the stages of an experiment in order, each into its own study; a stage's
    ``sources_from`` adds the trial an earlier stage chose (the best by the objectives'
    weights) as a model rebuilt from its recipe.  Resuming skips the stages already done
    (without loading their models) and continues inside the one a kill interrupted."""
    from mergesearch.models.recipe_model import recipe_ref
    from mergesearch.report import choose

    done: dict[str, RunSummary] = {}
    for i, st in enumerate(exp.stages):
        extra = {}
        for source, earlier in st.sources_from.items():
            summary = done[earlier]
            if not summary.front:
                raise SearchError(f"stage {st.name!r}: stage {earlier!r} has no completed "
                                  f"trial to take as source {source!r}")
            extra[source] = recipe_ref(choose(summary.front, summary.objectives).recipe)
        stage_exp = exp.stage(i, extra)
        name = stage_study(exp, st.name, study)
        summary = None if overwrite else _finished_stage(stage_exp, name)
        if summary is None:
            log.info("stage %d/%d: %s", i + 1, len(exp.stages), st.name)
            summary = run(stage_exp, study=name, resume=resume if i == 0 else None,
                          overwrite=overwrite, progress=progress, on_result=on_result)
        done[st.name] = summary
    return list(done.values())


def _finished_stage(exp: Experiment, study: str) -> RunSummary | None:
    """The summary of a stage whose study already holds its whole budget of trials and was
    run as the experiment says now (else None: it must run, or refuse, as any search)."""
    url = exp.storage_url
    budget = exp.budget.evaluations
    if budget is None or not TrialStore.exists(url, study):
        return None
    store = TrialStore.open(url, study)
    recorded = {k: v for k, v in store.experiment.items() if k != "study"}
    if Experiment.from_dict(recorded).fingerprint() != exp.fingerprint():
        return None
    trials = store.trials()
    if len(trials) < budget:
        return None
    ok = sum(t.state == "ok" for t in trials)
    return RunSummary(
        study=study, storage=url, run_dir=exp.run_dir, objectives=store.objectives,
        finished=len(trials), ok=ok, failed=len(trials) - ok,
        cached=sum(t.cached_from is not None for t in trials), evaluated_now=0,
        stopped="budget", elapsed=0.0, front=store.pareto_front())


@dataclass
class _Scored:
    """A recipe's scores, from the first trial that evaluated it (the result cache)."""

    values: dict[str, float]
    scores: dict
    correct: dict[str, list[bool]] = field(default_factory=dict)
    items: dict[str, list[int]] = field(default_factory=dict)
    number: int | None = None  # trial number, looked up when first served
    trial_id: int | None = None  # set once that trial is written

    def result(self, candidate_id: int) -> Result:
        """What a cache hit tells the strategy: everything the first evaluation saw."""
        return Result(candidate_id=candidate_id, values=dict(self.values), scores=self.scores,
                      correct=self.correct, items=self.items)


class SearchLoop:
    """The search itself: keeps the executor busy, records and tells every result, and
    checkpoints the strategy, until the budget (see the module docstring for the order)."""

    def __init__(self, search: BoundExperiment, store: TrialStore, executor, progress: bool,
                 on_result: Callable[[Result], None] | None):
        self.search = search
        self.space = search.space
        self.store = store
        self.executor = executor
        self.strategy: Strategy = search.strategy
        self.budget = search.exp.budget
        self.progress = progress
        self.on_result = on_result
        # candidate id -> (candidate, cache key of its recipe; None if it did not decode)
        self.in_flight: dict[int, tuple[Candidate, str | None]] = {}
        self.cache: dict[str, _Scored] = {}  # recipe + fidelity -> its scores
        # results that need no worker (served from the cache, or failed to decode), each
        # with the cache entry it came from
        self.ready: list[tuple[Result, _Scored | None]] = []
        # told, not yet written: (candidate, result, cache entry served from, own new entry)
        self.unwritten: list[tuple[Candidate, Result, _Scored | None, _Scored | None]] = []
        # candidate id -> [when dispatched, when its result came] (seconds since the epoch)
        self.clock: dict[int, list[float]] = {}
        self.asked = False  # since the last checkpoint
        self._critical = 0  # > 0 while a Ctrl-C must wait (see _uninterrupted)
        self._interrupted = False
        self.best: dict[str, float] = {}
        self.ok = self.failed = self.cached = self.evaluated_now = self.probes = 0
        self.spent = 0.0  # evaluation cost (items scored) of every trial and probe so far
        self._untracked: set[str] = set()  # tracked metrics a result lacked (said once)

    # -- resume -------------------------------------------------------------------------

    def _restore(self) -> None:
        """Load the strategy state, reconcile it with the recorded trials, and dispatch the
        pending candidates nobody recorded again."""
        if self.store.fail_running("interrupted"):  # left by another tool or an older version
            log.info("trials left running in the study were marked failed")
        epoch = self.store.epoch
        records = self.store.trials()
        for r in records:
            self.spent += r.cost
            if r.state == "ok":
                self.ok += 1
                if r.fidelity >= 1:  # the best shown is a full-fidelity one, as the front's
                    self._track_best(r.values)
                if r.recipe is not None and r.cached_from is None and r.epoch == epoch:
                    self.cache.setdefault(_key(r.recipe, r.fidelity), _Scored(
                        r.values, r.scores, r.correct, r.items, number=r.number))
            else:
                self.failed += 1
            if r.cached_from is not None:
                self.cached += 1
        probes = self.store.probes()
        self.probes = len(probes)
        self.spent += sum(p.cost for p in probes)
        state = self.store.load_state()
        if state is None:
            return
        self.strategy.load_state_dict(state)
        recorded = {r.candidate_id: r for r in [*records, *probes] if r.epoch == epoch}
        pending = self.strategy.pending
        # recorded, then killed before the next checkpoint: tell them as they were told
        for rec in sorted((recorded[c.id] for c in pending if c.id in recorded),
                          key=lambda r: r.finished_at):
            self.strategy.tell([rec.result()])
        for cand in pending:
            if cand.id not in recorded:
                self._route(cand)
        self.store.save_state(self.strategy.state_dict(), in_flight=list(self.in_flight))

    # -- the loop -----------------------------------------------------------------------

    @property
    def finished(self) -> int:
        return self.ok + self.failed

    def _room(self) -> int:
        """How many more candidates may be dispatched now (probes are not trials: only the
        cost budget counts them)."""
        room = self.executor.free
        if self.budget.evaluations is not None:
            trials = sum(not c.is_probe for c, _ in self.in_flight.values())
            room = min(room, self.budget.evaluations - self.finished - trials)
        if self.budget.cost is not None and self.spent >= self.budget.cost:
            room = 0
        return max(room, 0)

    def run(self) -> RunSummary:
        start = time.monotonic()
        deadline = start + self.budget.wall_time if self.budget.wall_time else None
        bar = None
        stopped = "budget"
        try:
            with self._deferring_sigint():
                self._restore()
                bar = tqdm(total=self.budget.evaluations, initial=self.finished, unit="trial",
                           desc=self.search.study_name, disable=not self.progress,
                           dynamic_ncols=True)
                while True:
                    if deadline is not None and time.monotonic() >= deadline:
                        stopped = "wall time"
                    elif self.strategy.done and not self.in_flight:
                        stopped = "strategy done"
                    else:
                        self._dispatch()
                    self._checkpoint()  # while the workers evaluate what was just dispatched
                    if not self.in_flight:
                        break
                    for result, source in self._results():
                        self._take(result, source, bar)
            if self.budget.evaluations is not None and self.finished < self.budget.evaluations \
                    and stopped == "budget":
                stopped = "strategy done"
        except (KeyboardInterrupt, Exception):
            # keep what was evaluated: write the told results, then the state that knows them
            try:
                self._checkpoint()
            except Exception as err:  # the store itself failed: the resume redoes the rest
                log.warning("could not save the last results: %s", err)
            raise
        finally:
            if bar is not None:
                bar.close()
            self.executor.close()
            self.store.release_lease()
        return RunSummary(
            study=self.search.study_name, storage=self.search.exp.storage_url,
            run_dir=self.search.exp.run_dir, objectives=list(self.search.problem.objectives),
            finished=self.finished, ok=self.ok, failed=self.failed, cached=self.cached,
            evaluated_now=self.evaluated_now, probes=self.probes, cost=self.spent,
            stopped=stopped,
            elapsed=time.monotonic() - start, front=self.store.pareto_front())

    @contextlib.contextmanager
    def _deferring_sigint(self) -> Iterator[None]:
        """While the loop runs, a Ctrl-C that lands inside :meth:`_uninterrupted` waits for
        the end of that block (elsewhere it interrupts at once).  Only the main thread gets
        signals; searches in other threads (sweeps, Tune) keep Python's handler."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._critical:
                self._interrupted = True
            else:
                raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def _uninterrupted(self) -> Iterator[None]:
        """A block a Ctrl-C must not split: telling a result and queueing its write, or
        writing trials and the checkpoint that follows them."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            if not self._critical and self._interrupted:
                self._interrupted = False
                raise KeyboardInterrupt

    def _dispatch(self) -> None:
        """Ask for and dispatch candidates while there is room (a result that needs no
        worker stops it, so the strategy hears of it before the next ask)."""
        while not self.ready and (room := self._room()) > 0:
            cands = self.strategy.ask(room)
            if not cands:
                return
            self.asked = True
            for cand in cands:
                self._route(cand)

    def _route(self, cand: Candidate) -> None:
        """Decode a candidate and send it to a worker, or straight to ``ready`` when its
        recipe was scored before or it does not decode."""
        self.clock[cand.id] = [time.time()]
        if cand.genome is not None:  # a recipe the strategy built goes as it is
            try:
                cand.recipe = self.space.decode(cand.genome)
            except SpaceError as err:
                self.in_flight[cand.id] = (cand, None)
                self.ready.append((Result.failed(cand.id, str(err)), None))
                return
        if cand.is_probe:  # answered fresh every time: a probe is cheap and not a score
            self.in_flight[cand.id] = (cand, None)
            self.executor.submit(cand)
            return
        key = _key(cand.recipe.to_dict(), cand.fidelity)
        self.in_flight[cand.id] = (cand, key)
        hit = self.cache.get(key)
        if hit is None:
            self.executor.submit(cand)
        else:
            self.ready.append((hit.result(cand.id), hit))

    def _results(self) -> list[tuple[Result, _Scored | None]]:
        """The next results: those that needed no worker, else what the executor returns."""
        if self.ready:
            out, self.ready = self.ready, []
            return out
        return [(r, None) for r in self.executor.wait()]

    def _take(self, result: Result, source: _Scored | None, bar) -> None:
        """Count a result, queue its write and tell the strategy (it is written at the next
        checkpoint, before any state that knows the tell)."""
        with self._uninterrupted():
            cand, key = self.in_flight.pop(result.candidate_id)
            self.clock.setdefault(cand.id, []).append(time.time())
            entry = None
            self.spent += result.cost
            if cand.is_probe:
                self.probes += 1
                if not result.ok:
                    log.warning("probe %d (%s) failed: %s", cand.id, cand.kind, result.reason)
            elif result.ok:
                self.ok += 1
                if cand.fidelity >= 1:
                    self._track_best(result.values)
                if source is None and key is not None and key not in self.cache:
                    entry = self.cache[key] = _Scored(dict(result.values), result.scores,
                                                      result.correct, result.items)
            else:
                self.failed += 1
                log.warning("candidate %d failed: %s", result.candidate_id, result.reason)
            if source is not None:
                self.cached += 1
            elif not cand.is_probe:
                self.evaluated_now += 1
            self.unwritten.append((cand, result, source, entry))
            self.strategy.tell([result])
        if self.on_result is not None:
            self.on_result(result)
        if cand.is_probe:
            return
        bar.update(1)
        bar.set_postfix_str(
            "best " + " ".join(f"{k}={v:.4g}" for k, v in self.best.items()), refresh=False)

    def _checkpoint(self) -> None:
        """Write the results told since the last checkpoint, then save the strategy state
        (with the candidates in flight).  Each trial leaves the queue once written, so a
        checkpoint cut short and tried again writes nothing twice."""
        if not (self.unwritten or self.asked):
            return
        with self._uninterrupted():
            while self.unwritten:
                cand, result, source, entry = self.unwritten[0]
                cached_from = None
                if source is not None:  # its source was written first: it was told first
                    if source.number is None:
                        source.number = self.store.trial_number(source.trial_id)
                    cached_from = source.number
                clock = self.clock.get(cand.id, [])
                started, finished = (clock[0], clock[-1]) if len(clock) == 2 else (None, None)
                if cand.is_probe:
                    trial_id = self.store.add_probe(cand, result, started=started,
                                                    finished=finished)
                else:
                    tracked = self._tracked(cand, result)
                    trial_id = self.store.add(cand, result, cached_from=cached_from,
                                              started=started, finished=finished,
                                              tracked=tracked)
                self.unwritten.pop(0)
                self.clock.pop(cand.id, None)
                if entry is not None:
                    entry.trial_id = trial_id
            self.store.save_state(self.strategy.state_dict(), in_flight=list(self.in_flight))
            self.asked = False

    def _tracked(self, cand: Candidate, result: Result) -> dict[str, float] | None:
        """The tracked metrics of a completed trial, from its scores (a name the scores
        lack is said once, and left out)."""
        if not (result.ok and self.search.tracked):
            return None
        values = tracked_values(result.scores, self.search.tracked)
        for name in self.search.tracked:
            if name not in values and name not in self._untracked:
                self._untracked.add(name)
                log.warning("evaluator.track: %r is not in the scores of candidate %d (tasks "
                            "and metrics: %s); it is left out where missing", name, cand.id,
                            {t: sorted(m) for t, m in result.scores.items()})
        return values

    def _track_best(self, values: dict[str, float]) -> None:
        for o in self.search.problem.objectives:
            if o.name in values:
                old = self.best.get(o.name)
                new = values[o.name]
                if old is None or o.sign * new < o.sign * old:
                    self.best[o.name] = new


def _key(recipe: dict[str, Any], fidelity: float) -> str:
    """Cache key: identical recipes scored at the same fidelity give the same result."""
    return json.dumps(recipe, sort_keys=True) + f"|{fidelity:g}"
