"""One finished trial written with a handful of SQL statements instead of Optuna's ORM walk.

Optuna's ``create_new_trial`` with a template costs two or three ORM queries per param
and one per user attr (it re-checks each param's distribution against the whole study
and looks each attr up before writing it): about 13 ms for a zoo trial, most of the
controller's overhead per candidate.  The search holds its study's lease, so nothing
else writes its trials; this writes the same rows, in one transaction, with one insert
per table: the trial, its values, its params, its user attrs.  The representations are
Optuna's own (``to_internal_repr``, ``distribution_to_json``, ``value_to_stored_repr``),
the table definitions its models', and the trial number is counted as Optuna counts it.

Used only on the schema version it was written against (``SCHEMA``); on any other, the
store falls back to ``create_new_trial``.
"""

from __future__ import annotations

import json

import sqlalchemy
from optuna.distributions import distribution_to_json
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial

SCHEMA = "v3.2.0.a"  # Optuna's RDB schema (alembic head) for 3.2 up to 5.x

_TRIALS = models.TrialModel.__table__
_VALUES = models.TrialValueModel.__table__
_PARAMS = models.TrialParamModel.__table__
_USER_ATTRS = models.TrialUserAttributeModel.__table__


def supported(storage) -> bool:
    """Whether this database has the schema the direct insert was written for."""
    try:
        return storage.get_current_version() == SCHEMA
    except Exception:  # an unknown storage: let Optuna write
        return False


def insert_trial(engine: sqlalchemy.engine.Engine, study_id: int, trial: FrozenTrial) -> int:
    """Write a finished trial (as :func:`optuna.trial.create_trial` built it); its id."""
    with engine.begin() as conn:
        trial_id = conn.execute(_TRIALS.insert().values(
            study_id=study_id, number=None, state=trial.state,
            datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
        )).inserted_primary_key[0]
        number = conn.execute(
            sqlalchemy.select(sqlalchemy.func.count()).select_from(_TRIALS).where(
                _TRIALS.c.study_id == study_id, _TRIALS.c.trial_id < trial_id)).scalar_one()
        conn.execute(_TRIALS.update().where(_TRIALS.c.trial_id == trial_id)
                     .values(number=number))
        if trial.values is not None:
            rows = []
            for objective, value in enumerate(trial.values):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                rows.append({"trial_id": trial_id, "objective": objective, "value": stored,
                             "value_type": kind})
            conn.execute(_VALUES.insert(), rows)
        if trial.params:
            conn.execute(_PARAMS.insert(), [
                {"trial_id": trial_id, "param_name": name,
                 "param_value": trial.distributions[name].to_internal_repr(value),
                 "distribution_json": distribution_to_json(trial.distributions[name])}
                for name, value in trial.params.items()])
        if trial.user_attrs:
            conn.execute(_USER_ATTRS.insert(), [
                {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                for key, value in trial.user_attrs.items()])
    return trial_id


_SYSTEM_ATTRS = models.TrialSystemAttributeModel.__table__


def set_trial_attrs(engine: sqlalchemy.engine.Engine, user_attrs: dict[int, dict],
                    system_attrs: dict[int, dict]) -> None:
    """Set user and system attrs (by trial id) of trials, finished ones too, in one
    transaction: Optuna refuses to change a finished trial, but its recipe files and
    per-task scores are attached after the fact (see :mod:`mergesearch.dashboard`).
    An attr already there is replaced."""
    with engine.begin() as conn:
        for table, by_trial in ((_USER_ATTRS, user_attrs), (_SYSTEM_ATTRS, system_attrs)):
            rows = []
            for trial_id, attrs in by_trial.items():
                if not attrs:
                    continue
                conn.execute(table.delete().where(table.c.trial_id == trial_id,
                                                  table.c.key.in_(list(attrs))))
                rows += [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                         for key, value in attrs.items()]
            if rows:
                conn.execute(table.insert(), rows)
