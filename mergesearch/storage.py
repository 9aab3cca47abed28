"""Trials on an Optuna RDB storage: one study per search.

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

import logging
import random
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from mergesearch.errors import MergesearchError
from mergesearch.strategies.base import Dimension, Objective
from mergesearch.trial import Candidate, Result

log = logging.getLogger(__name__)

# study user attrs
EXPERIMENT = "mergesearch.experiment"
OBJECTIVES = "mergesearch.objectives"
# study system attrs: the strategy state as last written whole, then what was appended
STATE = "mergesearch.state"
STATE_APPEND = "mergesearch.state+"  # + "{epoch}.{k}"
LEGACY_STATE = "mergesearch.strategy_state"  # user attr of studies from before the appends
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


class StorageError(MergesearchError, ValueError):
    """The study cannot be opened as asked (missing, exists, or belongs to another search)."""


@dataclass
class TrialRecord:
    """A trial as mergesearch reads it back ("running" only in studies other tools wrote)."""

    number: int
    candidate_id: int
    state: str  # "running", "ok", "failed"
    values: dict[str, float]
    params: dict[str, float]  # genome dimension name -> value
    recipe: dict[str, Any] | None
    fidelity: float
    scores: dict[str, dict[str, float]]
    reason: str | None
    cached_from: int | None
    timings: dict[str, float]
    attempts: int = 1

    def result(self) -> Result:
        if self.state == "ok":
            return Result(candidate_id=self.candidate_id, values=dict(self.values),
                          scores=self.scores, timings=self.timings)
        return Result.failed(self.candidate_id, self.reason or "failed")


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


_OPENING = threading.Lock()


def _rdb(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage for a SQLAlchemy URL, with one clear error if it cannot open.

    The first open of a database creates Optuna's tables, which races when several
    searches start on an empty database together (a sweep's threads: serialised here;
    other machines: PostgreSQL refuses the loser's CREATE, which is retried once the
    tables exist).  SQLite files run in WAL mode: `mergesearch status` or a dashboard can
    read while a search writes, and a commit costs no fsync (a killed process loses
    nothing; a power cut may lose the last trials, which a resume then evaluates again).
    """
    for attempt in range(4):
        try:
            with _OPENING:
                storage = optuna.storages.RDBStorage(url)
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            if attempt == 3 or "already exists" not in str(err) and "duplicate key" not in str(err):
                raise StorageError(_cannot_open(url, err)) from None
            time.sleep(0.2 * (attempt + 1) * (1 + random.random()))
        except Exception as err:  # bad URL, missing driver, unreachable server: all user-facing
            raise StorageError(_cannot_open(url, err)) from None
    if url.startswith("sqlite:"):
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # reconnect with the pragmas
    return storage


def _cannot_open(url: str, err: Exception) -> str:
    return f"cannot open storage {url!r}: {type(err).__name__}: {str(err).splitlines()[0]}"


def _sqlite_missing(url: str) -> bool:
    """True for a SQLite URL whose file does not exist (opening it would create it)."""
    return url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists()


def _has_study(storage: optuna.storages.BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def _extends(log: Any, head: dict[str, Any], saved: dict[str, Any]) -> bool:
    """Whether a state is the saved one with events appended (its log only grows)."""
    n = saved["n"]
    return (isinstance(log, list) and saved["head"] == head and len(log) >= n
            and (n == 0 or log[n - 1] == saved["last"]))


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class TrialStore:
    """One search's study: create or reopen it, record trials, keep strategy state."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage,
                 dims: Sequence[Dimension] | None = None):
        self.study = study
        self._storage = storage
        self._study_id = self._storage.get_study_id_from_name(study.study_name)
        attrs = study.user_attrs
        self.objectives = [Objective(**o) for o in attrs.get(OBJECTIVES, [])]
        self._distributions = None
        self._names: list[str] = []
        self._saved: dict[str, Any] | None = None  # what save_state last wrote
        self._epoch: int | None = None  # of the whole state last written
        if dims is not None:
            self.set_dims(dims)

    # -- opening ------------------------------------------------------------------------

    @staticmethod
    def _make_parent(url: str) -> None:
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def exists(cls, url: str, name: str) -> bool:
        _quiet_optuna()
        return not _sqlite_missing(url) and _has_study(_rdb(url), name)

    @classmethod
    def create(cls, url: str, name: str, objectives: Sequence[Objective],
               dims: Sequence[Dimension], experiment: dict[str, Any],
               *, overwrite: bool = False) -> TrialStore:
        _quiet_optuna()
        cls._make_parent(url)
        storage = _rdb(url)
        if overwrite and _has_study(storage, name):
            optuna.delete_study(study_name=name, storage=storage)
        try:
            study = optuna.create_study(storage=storage, study_name=name,
                                        directions=[o.direction for o in objectives])
        except optuna.exceptions.DuplicatedStudyError:
            raise StorageError(f"study {name!r} already exists in {url}") from None
        study.set_user_attr(EXPERIMENT, experiment)
        study.set_user_attr(OBJECTIVES, [vars(o) for o in objectives])
        with warnings.catch_warnings():  # experimental in Optuna, but the dashboard uses it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([o.name for o in objectives])
        return cls(study, storage, dims)

    @classmethod
    def open(cls, url: str, name: str, dims: Sequence[Dimension] | None = None) -> TrialStore:
        _quiet_optuna()
        storage = None if _sqlite_missing(url) else _rdb(url)  # no file created to look
        if storage is None or not _has_study(storage, name):
            raise StorageError(f"no study {name!r} in {url}")
        study = optuna.load_study(study_name=name, storage=storage)
        if EXPERIMENT not in study.user_attrs:
            raise StorageError(f"study {name!r} in {url} was not written by mergesearch")
        return cls(study, storage, dims)

    def set_dims(self, dims: Sequence[Dimension]) -> None:
        self._names = [d.name for d in dims]
        self._distributions = {d.name: FloatDistribution(d.low, d.high) for d in dims}

    @property
    def experiment(self) -> dict[str, Any]:
        return self.study.user_attrs[EXPERIMENT]

    def set_experiment(self, experiment: dict[str, Any]) -> None:
        self._storage.set_study_user_attr(self._study_id, EXPERIMENT, experiment)

    # -- strategy state -----------------------------------------------------------------

    def save_state(self, state: dict[str, Any], in_flight: Sequence[int] = ()) -> None:
        """Checkpoint the strategy state and the candidates now in flight.

        An event-sourced state (``log``) grows by a few events per candidate, so only the
        events since the last save are written, as one small attr; the whole state is
        written when it was not saved before (or does not extend what was), under a new
        epoch so that appends from earlier epochs are ignored.  Either way one
        transaction, so a kill leaves the last complete checkpoint.
        """
        log = state.get("log")
        head = {k: v for k, v in state.items() if k != "log"}
        in_flight = [int(i) for i in in_flight]
        saved = self._saved
        if saved is not None and _extends(log, head, saved):
            saved["k"] += 1
            key = f"{STATE_APPEND}{saved['epoch']}.{saved['k']}"
            self._storage.set_study_system_attr(self._study_id, key, {
                "log": log[saved["n"]:], "in_flight": in_flight})
        else:
            if self._epoch is None:
                top = self._storage.get_study_system_attrs(self._study_id).get(STATE)
                self._epoch = int(top["epoch"]) if top else 0
            self._epoch += 1
            self._storage.set_study_system_attr(self._study_id, STATE, {
                "epoch": self._epoch, "state": state, "in_flight": in_flight})
            saved = self._saved = {"epoch": self._epoch, "k": 0, "head": head}
        if isinstance(log, list):
            saved.update(n=len(log), last=log[-1] if log else None)
        else:
            self._saved = None  # a native state: written whole every time

    def _read_state(self) -> tuple[dict[str, Any], list[int]] | None:
        attrs = self._storage.get_study_system_attrs(self._study_id)
        top = attrs.get(STATE)
        if top is None:
            legacy = self._storage.get_study_user_attrs(self._study_id).get(LEGACY_STATE)
            if legacy is None:
                return None
            top = {"epoch": 0, "state": legacy, "in_flight": []}
        state, in_flight, epoch = dict(top["state"]), top["in_flight"], int(top["epoch"])
        prefix = f"{STATE_APPEND}{epoch}."
        appended = sorted((int(k.removeprefix(prefix)), v) for k, v in attrs.items()
                          if k.startswith(prefix))
        if [k for k, _ in appended] != list(range(1, len(appended) + 1)):
            raise StorageError(f"study {self.study.study_name!r}: strategy state is incomplete "
                               f"(appends {[k for k, _ in appended]})")
        if appended:
            state["log"] = list(state["log"])
            for _, part in appended:
                state["log"] += part["log"]
                in_flight = part["in_flight"]
        log = state.get("log")
        self._epoch = epoch
        self._saved = {"epoch": epoch, "k": len(appended),
                       "head": {k: v for k, v in state.items() if k != "log"},
                       "n": len(log), "last": log[-1] if log else None} \
            if isinstance(log, list) and STATE in attrs else None  # legacy: rewrite whole
        return state, in_flight

    def load_state(self) -> dict[str, Any] | None:
        """The strategy state last saved (None before the first save)."""
        read = self._read_state()
        return None if read is None else read[0]

    def in_flight(self, trials: Sequence[TrialRecord] | None = None) -> list[int]:
        """Candidates dispatched at the last checkpoint and not recorded since (among
        ``trials``, read from the study when not given)."""
        read = self._read_state()
        if read is None:
            return []
        done = {t.candidate_id for t in (self.trials() if trials is None else trials)}
        return [i for i in read[1] if i not in done]

    # -- trials -------------------------------------------------------------------------

    def add(self, candidate: Candidate, result: Result, *,
            cached_from: int | None = None) -> int:
        """Write a finished candidate as one trial, in one transaction; returns its id."""
        params = dict(zip(self._names, candidate.genome, strict=True))
        attrs: dict[str, Any] = {CANDIDATE: candidate.id, FIDELITY: candidate.fidelity}
        if candidate.recipe is not None:
            attrs[RECIPE] = candidate.recipe.to_dict()
        if result.scores:
            attrs[SCORES] = result.scores
        if result.correct:
            attrs[CORRECT] = {k: "".join("1" if c else "0" for c in v)
                              for k, v in result.correct.items()}
        if result.timings:
            attrs[TIMINGS] = {k: round(v, 6) for k, v in result.timings.items()}
        if cached_from is not None:
            attrs[CACHED_FROM] = cached_from
        if result.attempts > 1:
            attrs[ATTEMPTS] = result.attempts
        if result.ok:
            state, values = TrialState.COMPLETE, [float(result.values[o.name])
                                                  for o in self.objectives]
        else:
            state, values = TrialState.FAIL, None
            attrs[REASON] = result.reason or "failed"
        template = create_trial(state=state, values=values, params=params,
                                distributions=self._distributions, user_attrs=attrs)
        return self._storage.create_new_trial(self._study_id, template_trial=template)

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
        return TrialRecord(
            number=t.number, candidate_id=int(a.get(CANDIDATE, -1)), state=state, values=values,
            params=dict(t.params), recipe=a.get(RECIPE),
            fidelity=float(a.get(FIDELITY, 1.0)),
            scores=a.get(SCORES, {}), reason=a.get(REASON), cached_from=a.get(CACHED_FROM),
            timings=a.get(TIMINGS, {}), attempts=int(a.get(ATTEMPTS, 1)))

    def trial_number(self, trial_id: int) -> int:
        return self._storage.get_trial_number_from_id(trial_id)

    def trial_id(self, number: int) -> int:
        return self._storage.get_trial_id_from_study_id_trial_number(self._study_id, number)

    def pareto_front(self) -> list[TrialRecord]:
        """Completed trials no other completed trial dominates (Optuna's best_trials)."""
        if not any(t.state == TrialState.COMPLETE for t in self.study.get_trials(deepcopy=False)):
            return []
        return [self._record(t) for t in self.study.best_trials]
