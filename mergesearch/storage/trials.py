"""Trials on an Optuna RDB storage: one study per search, one trial per finished candidate.

Each candidate becomes one finished Optuna trial, written in one transaction
the moment its result arrives: params are the named genome dimensions, values
the objectives, user attrs the recipe, per-task scores, per-item correctness,
timings and, for failures, the reason.  The experiment config lives in study
user attrs, the strategy's JSON state in study system attrs, appended to
rather than rewritten (see :meth:`TrialStore.save_state`).  So
optuna-dashboard shows any search, and a PostgreSQL URL shares one study
across machines.
"""

from __future__ import annotations

import datetime
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from mergesearch.storage import insert, lease
from mergesearch.storage.rdb import (
    StorageError,
    StudyExists,
    has_study,
    open_rdb,
    quiet_optuna,
    sqlite_missing,
    sqlite_path,
)
from mergesearch.storage.state import StateLog
from mergesearch.strategies.base import Dimension, Objective
from mergesearch.strategies.optuna_samplers import distribution
from mergesearch.trial import (
    SCORE,
    Candidate,
    Result,
    pack_bits,
    pack_ids,
    unpack_bits,
    unpack_ids,
)

log = logging.getLogger(__name__)

# study user attrs
EXPERIMENT = "mergesearch.experiment"
REPORT = "mergesearch.report"  # the chosen trial on the report items (controller.score_report)
OBJECTIVES = "mergesearch.objectives"
FINGERPRINT = "mergesearch.fingerprint"  # what the search's results depend on, by content
SEARCH_EPOCH = "mergesearch.search_epoch"  # > 0 once continued with another fingerprint
# trial user attrs
CANDIDATE = "candidate_id"
RECIPE = "recipe"
FIDELITY = "fidelity"
SCORES = "scores"
CORRECT = "correct"
TIMINGS = "timings"
REASON = "fail_reason"
CACHED_FROM = "cached_from"
ATTEMPTS = "attempts"
GENOME = "genome"  # kept when storage refused the params, so nothing evaluated is lost
META = "meta"  # the strategy's JSON notes on a candidate (parents, generation, predictions)
EPOCH = "epoch"  # the search epoch a trial belongs to (written only after the first)
TRACKED = "tracked"  # evaluator.track: metrics recorded beside the objectives, not optimised
# probe records (in the search's probe study, never among its trials)
KIND = "kind"
PAYLOAD = "payload"
COST = "cost"
PROBES = ".probes"  # suffix of the probe study's name


@dataclass
class TrialRecord:
    """A trial (or a probe) as mergesearch reads it back ("running" only in studies other
    tools wrote)."""

    number: int
    candidate_id: int
    state: str  # "running", "ok", "failed"
    values: dict[str, float]
    params: dict[str, Any]  # genome dimension name -> value (a categorical's choice)
    recipe: dict[str, Any] | None
    fidelity: float
    scores: dict[str, dict[str, float]]
    reason: str | None
    cached_from: int | None
    timings: dict[str, float]
    attempts: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    correct: dict[str, list[bool]] = field(default_factory=dict)
    items: dict[str, list[int]] = field(default_factory=dict)
    kind: str = SCORE
    payload: dict[str, Any] | None = None
    cost: float = 0.0
    finished_at: float = 0.0  # when it was written (seconds since the epoch)
    epoch: int = 0  # the search epoch it was run in (see TrialStore.start_epoch)
    tracked: dict[str, float] = field(default_factory=dict)  # evaluator.track's values

    def result(self) -> Result:
        """The result as the strategy was told it."""
        if self.state == "ok":
            return Result(candidate_id=self.candidate_id, values=dict(self.values),
                          scores=self.scores, correct=self.correct, items=self.items,
                          payload=self.payload, cost=self.cost, timings=self.timings)
        return Result.failed(self.candidate_id, self.reason or "failed")


class TrialStore:
    """One search's study: create or reopen it, record trials, keep strategy state."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.RDBStorage, url: str,
                 dims: Sequence[Dimension] | None = None):
        self.study = study
        self.url = url
        self._storage = storage
        self._study_id = self._storage.get_study_id_from_name(study.study_name)
        attrs = study.user_attrs
        self.objectives = [Objective(**o) for o in attrs.get(OBJECTIVES, [])]
        self._distributions = None
        self._dims: list[Dimension] = []
        self._probes: TrialStore | None = None
        self._state = StateLog(storage, self._study_id, study.study_name)
        self._direct = insert.supported(storage)  # trials written in a few SQL statements
        self._lease: lease.Lease | None = None
        self._epoch: int | None = None
        if dims is not None:
            self.set_dims(dims)

    @property
    def where(self) -> str:
        return f"study {self.study.study_name!r} in {self.url}"

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def exists(cls, url: str, name: str) -> bool:
        return not sqlite_missing(url) and has_study(open_rdb(url), name)

    @classmethod
    def create(cls, url: str, name: str, objectives: Sequence[Objective],
               dims: Sequence[Dimension], experiment: dict[str, Any],
               *, overwrite: bool = False, make_parent: bool = False) -> TrialStore:
        """A new study (``make_parent``: create a SQLite file's folder if missing)."""
        path = sqlite_path(url)
        if path is not None and make_parent:
            path.parent.mkdir(parents=True, exist_ok=True)
        if path is not None and not path.parent.is_dir():
            raise StorageError(f"storage {url!r}: the folder {str(path.parent)!r} does not "
                               "exist: create it, or fix the path")
        storage = open_rdb(url)
        with quiet_optuna():
            for old in (name, name + PROBES) if overwrite else ():
                if has_study(storage, old):
                    optuna.delete_study(study_name=old, storage=storage)
            try:
                study = optuna.create_study(storage=storage, study_name=name,
                                            directions=[o.direction for o in objectives])
            except optuna.exceptions.DuplicatedStudyError:
                raise StudyExists(f"study {name!r} already exists in {url}") from None
        study.set_user_attr(EXPERIMENT, experiment)
        study.set_user_attr(OBJECTIVES, [vars(o) for o in objectives])
        with warnings.catch_warnings():  # experimental in Optuna, but the dashboard uses it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([o.name for o in objectives])
        return cls(study, storage, url, dims)

    @classmethod
    def open(cls, url: str, name: str, dims: Sequence[Dimension] | None = None) -> TrialStore:
        storage = None if sqlite_missing(url) else open_rdb(url)  # no file created to look
        if storage is None or not has_study(storage, name):
            raise StorageError(f"no study {name!r} in {url}; {_existing(storage)}")
        with quiet_optuna():
            study = optuna.load_study(study_name=name, storage=storage)
        if EXPERIMENT not in study.user_attrs:
            raise StorageError(f"study {name!r} in {url} was not written by mergesearch")
        return cls(study, storage, url, dims)

    def set_dims(self, dims: Sequence[Dimension]) -> None:
        self._dims = list(dims)
        self._distributions = {d.name: distribution(d) for d in dims}

    @property
    def experiment(self) -> dict[str, Any]:
        return self.study.user_attrs[EXPERIMENT]

    def set_experiment(self, experiment: dict[str, Any]) -> None:
        self._storage.set_study_user_attr(self._study_id, EXPERIMENT, experiment)

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        """What the recorded results depend on, by content (None in older studies)."""
        return self._storage.get_study_user_attrs(self._study_id).get(FINGERPRINT)

    def set_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        self._storage.set_study_user_attr(self._study_id, FINGERPRINT, fingerprint)

    @property
    def epoch(self) -> int:
        """The search epoch new trials belong to (0 until a study is continued with a
        different fingerprint)."""
        if self._epoch is None:
            attrs = self._storage.get_study_user_attrs(self._study_id)
            self._epoch = int(attrs.get(SEARCH_EPOCH, 0))
        return self._epoch

    def start_epoch(self, fingerprint: dict[str, Any], state: dict[str, Any]) -> int:
        """Continue this study as a new search epoch: the trials so far stay (and count
        toward the budget), the strategy starts again from ``state``, and only trials of the
        new epoch are told to it or served from the cache.  Returns the new epoch."""
        self._check_lease()
        epoch = self.epoch + 1
        self._storage.set_study_user_attr(self._study_id, SEARCH_EPOCH, epoch)
        self.set_fingerprint(fingerprint)
        self._state.save(state, [])
        self._epoch = epoch
        if self._probes is not None:
            self._probes._epoch = epoch
        return epoch

    # -- the writer's lease -------------------------------------------------------------

    def take_lease(self, *, ttl: float = lease.TTL) -> lease.Lease:
        """Become the one writer of this study (refused while another search holds it);
        every later write checks that the lease is still ours."""
        self._lease = lease.Lease(self._storage.engine, self._study_id, self.where,
                                  ttl=ttl).acquire()
        return self._lease

    def release_lease(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def lease_holder(self) -> dict[str, Any] | None:
        """Who is writing this study now, if anybody (never blocks)."""
        return lease.holder(self._storage.engine, self._study_id)

    def _check_lease(self) -> None:
        if self._lease is not None:
            self._lease.check()

    # -- strategy state -----------------------------------------------------------------

    def save_state(self, state: dict[str, Any], in_flight: Sequence[int] = ()) -> None:
        """Checkpoint the strategy state and the candidates now in flight (see
        :mod:`mergesearch.storage.state`)."""
        self._check_lease()
        self._state.save(state, in_flight)

    def load_state(self) -> dict[str, Any] | None:
        """The strategy state last saved (None before the first save)."""
        read = self._state.read()
        return None if read is None else read[0]

    def in_flight(self, trials: Sequence[TrialRecord] | None = None) -> list[int]:
        """Candidates dispatched at the last checkpoint and not recorded since (among
        ``trials``, read from the study when not given)."""
        read = self._state.read()
        if read is None:
            return []
        done = {t.candidate_id for t in (self.trials() if trials is None else trials)
                if t.epoch == self.epoch}
        return [i for i in read[1] if i not in done]

    # -- trials -------------------------------------------------------------------------

    def add(self, candidate: Candidate, result: Result, *, cached_from: int | None = None,
            started: float | None = None, finished: float | None = None,
            tracked: dict[str, float] | None = None) -> int:
        """Write a finished candidate as one trial, in one transaction; returns its id.

        ``started`` and ``finished`` (seconds since the epoch) are when the candidate was
        dispatched and its result arrived: the trial's ``datetime_start`` and
        ``datetime_complete``.  Without them it finished now, and started the sum of its
        result's timings earlier.  ``tracked`` holds the values of the metrics the
        experiment tracks (``evaluator.track``), kept in the ``tracked`` user attr.

        If Optuna refuses the trial (a param outside its distribution: a strategy bug the
        ask-time checks should have caught), the result is still kept, as a failed trial
        whose user attrs hold the genome, the values and the reason.
        """
        self._check_lease()
        if candidate.genome is not None:
            params = {d.name: d.label(g) for d, g in zip(self._dims, candidate.genome,
                                                         strict=True)}
            distributions = self._distributions
        else:  # a recipe the strategy built: no point of the space
            params, distributions = {}, {}
        attrs: dict[str, Any] = {CANDIDATE: candidate.id, FIDELITY: candidate.fidelity}
        if self.epoch:
            attrs[EPOCH] = self.epoch
        if candidate.recipe is not None:
            attrs[RECIPE] = candidate.recipe.to_dict()
        if candidate.meta:
            attrs[META] = candidate.meta
        if result.scores:
            attrs[SCORES] = result.scores
        if tracked:
            attrs[TRACKED] = dict(tracked)
        if result.correct:
            attrs[CORRECT] = {t: {"correct": pack_bits(v), "items": pack_ids(result.items[t])}
                              if t in result.items else pack_bits(v)
                              for t, v in result.correct.items()}
        if result.timings:
            attrs[TIMINGS] = {k: round(v, 6) for k, v in result.timings.items()}
        if cached_from is not None:
            attrs[CACHED_FROM] = cached_from
        if result.attempts > 1:
            attrs[ATTEMPTS] = result.attempts
        if candidate.is_probe:
            attrs |= {KIND: candidate.kind, COST: result.cost}
            if result.payload is not None:
                attrs[PAYLOAD] = result.payload
        if result.ok and not candidate.is_probe:
            state, values = TrialState.COMPLETE, [float(result.values[o.name])
                                                  for o in self.objectives]
        elif result.ok:  # a probe: its one value is what it cost
            state, values = TrialState.COMPLETE, [float(result.cost)]
        else:
            state, values = TrialState.FAIL, None
            attrs[REASON] = result.reason or "failed"
        try:
            template = create_trial(state=state, values=values, params=params,
                                    distributions=distributions, user_attrs=attrs)
        except ValueError as err:
            log.error("%s: storage refused candidate %d (%s); kept as a failed trial with its "
                      "genome and values in user attrs", self.where, candidate.id, err)
            attrs |= {GENOME: list(candidate.genome), "values": dict(result.values),
                      REASON: f"storage refused the trial: {err}"}
            template = create_trial(state=TrialState.FAIL, user_attrs=attrs)
        end = template.datetime_complete if finished is None \
            else datetime.datetime.fromtimestamp(finished)
        start = end - datetime.timedelta(seconds=sum(result.timings.values())) \
            if started is None else datetime.datetime.fromtimestamp(min(started, end.timestamp()))
        template.datetime_start, template.datetime_complete = start, end
        if self._direct:
            return insert.insert_trial(self._storage.engine, self._study_id, template)
        return self._storage.create_new_trial(self._study_id, template_trial=template)

    # -- probes ---------------------------------------------------------------------------

    def _probe_store(self, *, create: bool) -> TrialStore | None:
        """The study beside this one that keeps its probes: recorded like trials (one
        transaction each, the strategy hears of them from the state log), but never
        counted as trials, in the front, the budget of evaluations or `status`."""
        if self._probes is None:
            name = self.study.study_name + PROBES
            if has_study(self._storage, name):
                with quiet_optuna():
                    study = optuna.load_study(study_name=name, storage=self._storage)
            elif create:
                with quiet_optuna():
                    study = optuna.create_study(storage=self._storage, study_name=name,
                                                directions=["minimize"])
                study.set_user_attr(EXPERIMENT, {"probes_of": self.study.study_name})
                study.set_user_attr(OBJECTIVES, [vars(Objective("cost", "minimize"))])
            else:
                return None
            self._probes = TrialStore(study, self._storage, self.url, self._dims)
        self._probes._lease = self._lease
        self._probes._epoch = self.epoch
        return self._probes

    def add_probe(self, candidate: Candidate, result: Result, *,
                  started: float | None = None, finished: float | None = None) -> int:
        """Record a probe's answer (its payload, cost, recipe and metadata)."""
        return self._probe_store(create=True).add(candidate, result, started=started,
                                                  finished=finished)

    def probes(self) -> list[TrialRecord]:
        store = self._probe_store(create=False)
        return [] if store is None else store.trials()

    def fail_running(self, reason: str) -> int:
        """Mark trials left RUNNING (by other tools or older versions) failed; how many."""
        n = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = self.trial_id(t.number)
            self._storage.set_trial_user_attr(trial_id, REASON, reason)
            self._storage.set_trial_state_values(trial_id, TrialState.FAIL)
            n += 1
        return n

    def trials(self) -> list[TrialRecord]:
        return [self._record(t) for t in self.study.get_trials(deepcopy=False)]

    def _record(self, t: FrozenTrial) -> TrialRecord:
        state = {TrialState.COMPLETE: "ok", TrialState.RUNNING: "running"}.get(t.state, "failed")
        values = {}
        if t.values is not None:
            values = {o.name: v for o, v in zip(self.objectives, t.values, strict=True)}
        a = t.user_attrs
        correct, items = {}, {}
        for task, packed in a.get(CORRECT, {}).items():
            if isinstance(packed, dict):
                correct[task], items[task] = unpack_bits(packed["correct"]), \
                    unpack_ids(packed["items"])
            else:  # studies from before item ids were kept
                correct[task] = unpack_bits(packed)
        kind = a.get(KIND, SCORE)
        cost = float(a[COST]) if COST in a else (
            float(sum(map(len, correct.values()))) if a.get(CACHED_FROM) is None else 0.0)
        return TrialRecord(
            number=t.number, candidate_id=int(a.get(CANDIDATE, -1)), state=state,
            values=values if kind == SCORE else {}, params=dict(t.params), recipe=a.get(RECIPE),
            fidelity=float(a.get(FIDELITY, 1.0)),
            scores=a.get(SCORES, {}), reason=a.get(REASON), cached_from=a.get(CACHED_FROM),
            timings=a.get(TIMINGS, {}), attempts=int(a.get(ATTEMPTS, 1)), meta=a.get(META, {}),
            correct=correct, items=items, kind=kind, payload=a.get(PAYLOAD), cost=cost,
            epoch=int(a.get(EPOCH, 0)), tracked=dict(a.get(TRACKED) or {}),
            finished_at=t.datetime_complete.timestamp() if t.datetime_complete else 0.0)

    def tracked_names(self, trials: Sequence[TrialRecord] | None = None) -> list[str]:
        """The metrics this study tracks, in the experiment's order (``evaluator.track`` of
        the experiment it was last run with), then any other a trial of ``trials`` holds
        (tracked by an earlier run)."""
        try:
            evaluator = self.experiment.get("evaluator") or {}
        except KeyError:
            evaluator = {}
        names = list(evaluator.get("track") or [])
        for t in trials or ():
            names += [n for n in t.tracked if n not in names]
        return names

    def trial_number(self, trial_id: int) -> int:
        return self._storage.get_trial_number_from_id(trial_id)

    def trial_id(self, number: int) -> int:
        return self._storage.get_trial_id_from_study_id_trial_number(self._study_id, number)

    def pareto_front(self) -> list[TrialRecord]:
        """Distinct recipes no completed trial dominates (Optuna's best_trials), each once:
        a trial served from the cache, or a recipe scored again, stands behind the first
        trial that scored it.  Only trials at the highest fidelity present (1 as soon as
        any trial is full) take part: a multi-fidelity search's cheap looks, scored on
        part of the items, neither join the front nor hide full-fidelity trials."""
        done = [t for t in self.study.get_trials(deepcopy=False)
                if t.state == TrialState.COMPLETE]
        if not done:
            return []
        top = max(float(t.user_attrs.get(FIDELITY, 1.0)) for t in done)
        if all(float(t.user_attrs.get(FIDELITY, 1.0)) == top for t in done):
            best = self.study.best_trials
        else:
            from optuna.study._multi_objective import _get_pareto_front_trials_by_trials

            best = _get_pareto_front_trials_by_trials(
                [t for t in done if float(t.user_attrs.get(FIDELITY, 1.0)) == top],
                self.study.directions)
        return distinct_recipes(self._record(t) for t in sorted(best, key=lambda t: t.number))


def distinct_recipes(records) -> list[TrialRecord]:
    """Each recipe once, as the first of ``records`` that scored it (trials served from the
    cache left out): how a front lists its points."""
    out, seen = [], set()
    for record in records:
        key = json.dumps(record.recipe, sort_keys=True) if record.recipe else record.number
        if record.cached_from is None and key not in seen:
            seen.add(key)
            out.append(record)
    return out


def _existing(storage: optuna.storages.BaseStorage | None, shown: int = 10) -> str:
    """The studies a storage holds (probe studies left out), for a "no such study" error."""
    if storage is None:
        return "the file does not exist yet (run the experiment first)"
    names = sorted(s.study_name for s in storage.get_all_studies()
                   if not s.study_name.endswith(PROBES))
    if not names:
        return "it holds no study yet (run the experiment first)"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"the studies there: {', '.join(names[:shown])}{more}"
