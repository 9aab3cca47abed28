"""Where searches are recorded: an Optuna study per search, on any SQLAlchemy database.

* :mod:`~mergesearch.storage.trials`: :class:`TrialStore`, one trial per finished
  candidate, the experiment and its fingerprint;
* :mod:`~mergesearch.storage.state`: the strategy-state checkpoints (written whole, then
  appended to);
* :mod:`~mergesearch.storage.lease`: one writer per study (owner + heartbeat);
* :mod:`~mergesearch.storage.rdb`: opening the database (retries, SQLite pragmas, errors).
"""

from mergesearch.storage.rdb import StorageError, StudyExists
from mergesearch.storage.state import LEGACY_STATE, STATE, STATE_APPEND
from mergesearch.storage.trials import TrialRecord, TrialStore

__all__ = ["LEGACY_STATE", "STATE", "STATE_APPEND", "StorageError", "StudyExists", "TrialRecord",
           "TrialStore"]
