"""One writer per study: a lease with an owner and a heartbeat, kept in the study itself.

A search that writes a study first takes its lease: a row of Optuna's
``study_system_attributes`` table (key ``mergesearch.lease``) naming the
holder (host, pid, since when) and its last heartbeat.  Taking it is an
atomic insert; taking over a stale one (its heartbeat older than its ``ttl``,
or its process gone from this host) is a compare-and-set update; so two
searches that start together on SQLite or PostgreSQL cannot both win.  A
background thread renews the heartbeat; the search checks before every write
that the lease is still its own, and stops if another process took it.

Readers (``status``, ``pareto``, ``export``, dashboards) never take the lease
and are never blocked by it.  Heartbeats use the holder's clock: hosts sharing
a study should keep their clocks within a fraction of the ``ttl``.

The table is Optuna's (stable across its 3.x-5.x schema); the statements are
plain SQL that SQLite and PostgreSQL both run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy
from sqlalchemy import text

from mergesearch.storage.rdb import StorageError

log = logging.getLogger(__name__)

LEASE = "mergesearch.lease"
TTL = 60.0  # seconds without a heartbeat after which a lease is stale

_SELECT = text("SELECT value_json FROM study_system_attributes WHERE study_id = :s AND key = :k")
_INSERT = text("INSERT INTO study_system_attributes (study_id, key, value_json) "
               "VALUES (:s, :k, :v)")
_SWAP = text("UPDATE study_system_attributes SET value_json = :v "
             "WHERE study_id = :s AND key = :k AND value_json = :old")
_DELETE = text("DELETE FROM study_system_attributes "
               "WHERE study_id = :s AND key = :k AND value_json = :old")


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    """``host H, pid P since T (heartbeat N s ago)``."""
    now = time.time() if now is None else now
    return (f"host {holder.get('host')}, pid {holder.get('pid')} since {holder.get('since')} "
            f"(heartbeat {max(0.0, now - float(holder.get('heartbeat', 0))):.0f} s ago)")


def held(where: str, holder: dict[str, Any]) -> StorageError:
    """The refusal a search meets on a study another live search writes."""
    return StorageError(
        f"{where} is being written by another search: {describe(holder)}. Wait for it to "
        f"finish or stop it (a killed search's lease expires {float(holder.get('ttl', TTL)):g} "
        "s after its last heartbeat), or pass --study NAME to run a separate search")


def stale(holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why a lease no longer protects anybody (None while its holder is alive)."""
    now = time.time() if now is None else now
    age = now - float(holder.get("heartbeat", 0))
    if age > float(holder.get("ttl", TTL)):
        return f"its heartbeat is {age:.0f} s old"
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return "its process is gone"
        except (PermissionError, ValueError, OverflowError):
            pass
    return None


class Lease:
    """The right to write one study, held while a search runs (use as a context manager)."""

    def __init__(self, engine: sqlalchemy.engine.Engine, study_id: int, where: str,
                 *, ttl: float = TTL):
        self._engine = engine
        self._study = study_id
        self._where = where  # "study 'x' in sqlite:///...", for messages
        self.ttl = float(ttl)
        self.owner = uuid.uuid4().hex
        self._value: str | None = None  # the row as we last wrote it
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- holding ------------------------------------------------------------------------

    def _mine(self) -> str:
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "since": self._since, "heartbeat": time.time(), "ttl": self.ttl})

    def acquire(self) -> Lease:
        """Take the lease, or raise :class:`StorageError` naming whoever holds it."""
        self._since = datetime.now(UTC).astimezone().isoformat(timespec="seconds")
        for _ in range(20):  # a lost race tries again; a live holder refuses at once
            try:
                if self._try_acquire():
                    break
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
                time.sleep(0.05 + 0.1 * random.random())  # another writer went first
                continue
        else:
            raise StorageError(f"{self._where}: could not take the lease (too much contention)")
        self._thread = threading.Thread(target=self._beat, name="mergesearch-lease", daemon=True)
        self._thread.start()
        return self

    def _try_acquire(self) -> bool:
        args = {"s": self._study, "k": LEASE}
        with self._engine.begin() as conn:
            row = conn.execute(_SELECT, args).scalar()
            mine = self._mine()
            if row is None:
                conn.execute(_INSERT, args | {"v": mine})
                self._value = mine  # the insert raised if another process inserted first
                return True
            holder = json.loads(row)
            why = stale(holder)
            if why is None:
                raise held(self._where, holder)
            if conn.execute(_SWAP, args | {"v": mine, "old": row}).rowcount != 1:
                return False
            log.warning("%s: took over the lease of %s: %s", self._where, describe(holder), why)
            self._value = mine
            return True

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception as err:  # the database is down: say so at the next write
                log.warning("%s: lease heartbeat failed: %s", self._where, err)

    def renew(self) -> None:
        """Write a fresh heartbeat, or note that another process took the lease."""
        with self._lock:
            if self._value is None or self._lost:
                return
            new = self._mine()
            with self._engine.begin() as conn:
                args = {"s": self._study, "k": LEASE}
                if conn.execute(_SWAP, args | {"v": new, "old": self._value}).rowcount == 1:
                    self._value = new
                    return
                row = conn.execute(_SELECT, args).scalar()
            holder = json.loads(row) if row else {}
            self._lost = (f"another search took it over: {describe(holder)}" if holder
                          else "it was removed from the study")

    def check(self) -> None:
        """Raise :class:`StorageError` if this lease is no longer ours (before a write)."""
        if self._lost:
            raise StorageError(f"{self._where}: this search lost its lease ({self._lost}); "
                               "it stops without writing more")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._value is None:
                return
            try:
                with self._engine.begin() as conn:
                    conn.execute(_DELETE, {"s": self._study, "k": LEASE, "old": self._value})
            except Exception as err:  # expires by itself
                log.warning("%s: could not release the lease: %s", self._where, err)
            self._value = None

    def __enter__(self) -> Lease:
        return self.acquire() if self._value is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(engine: sqlalchemy.engine.Engine, study_id: int) -> dict[str, Any] | None:
    """Who holds a study's lease, if anybody (read-only)."""
    with engine.connect() as conn:
        row = conn.execute(_SELECT, {"s": study_id, "k": LEASE}).scalar()
    return json.loads(row) if row else None
