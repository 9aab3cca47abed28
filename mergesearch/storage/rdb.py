"""Opening Optuna's RDB storage for a SQLAlchemy URL: one clear error, retries, pragmas."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import sqlalchemy

from mergesearch.errors import MergesearchError


class StorageError(MergesearchError, ValueError):
    """The study cannot be opened as asked (missing, exists, held, or belongs to another
    search); the message names it and the fix."""


class StudyExists(StorageError):
    """A study to be created is already there (another search may have just created it)."""


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines (study created, trial finished) silenced while mergesearch
    opens or writes a study, and the caller's verbosity restored afterwards."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(before, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


_OPENING = threading.Lock()


def open_rdb(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage for a SQLAlchemy URL, with one clear error if it cannot open.

    The first open of a database creates Optuna's tables, which races when several
    searches start on an empty database together (a sweep's threads: serialised here;
    other machines: PostgreSQL refuses the loser's CREATE, which is retried once the
    tables exist; on SQLite the loser finds the file locked, and retries too).  SQLite
    files run in WAL mode: `mergesearch status` or a dashboard can
    read while a search writes, and a commit costs no fsync (a killed process loses
    nothing; a power cut may lose the last trials, which a resume then evaluates again).
    """
    attempts = 8
    for attempt in range(attempts):
        try:
            with _OPENING, quiet_optuna():
                storage = optuna.storages.RDBStorage(url)
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                sqlalchemy.exc.OperationalError) as err:
            # another process creating the tables (PostgreSQL) or holding SQLite's lock
            racing = any(s in str(err) for s in ("already exists", "duplicate key", "locked",
                                                  "UNIQUE constraint failed"))
            if attempt == attempts - 1 or not racing:
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


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases)."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def sqlite_missing(url: str) -> bool:
    """True for a SQLite URL whose file does not exist (opening it would create it)."""
    path = sqlite_path(url)
    return path is not None and not path.exists()


def has_study(storage: optuna.storages.BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")  # a lease heartbeat may hold the lock briefly
    cursor.close()
