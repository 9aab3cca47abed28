"""The strategy-state log in a study's system attrs: written whole once, then appended to.

An event-sourced strategy state (``log``) grows by a few events per candidate,
so a checkpoint writes only the events since the last one, as one small attr
``mergesearch.state+{epoch}.{k}``.  The whole state (``mergesearch.state``) is
written when nothing was saved before, or when the state does not extend what
was saved; it starts a new epoch, so appends of earlier epochs are ignored.
Every write is one transaction, so a kill leaves the last complete checkpoint,
and the append counter moves only once its write has succeeded: a failed write
leaves no gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from mergesearch.storage.rdb import StorageError

STATE = "mergesearch.state"
STATE_APPEND = "mergesearch.state+"  # + "{epoch}.{k}"
LEGACY_STATE = "mergesearch.strategy_state"  # user attr of studies from before the appends


def _extends(log: Any, head: dict[str, Any], saved: dict[str, Any]) -> bool:
    """Whether a state is the saved one with events appended (its log only grows)."""
    n = saved["n"]
    return (isinstance(log, list) and saved["head"] == head and len(log) >= n
            and (n == 0 or log[n - 1] == saved["last"]))


class StateLog:
    """Checkpoints of one study's strategy state and the candidates then in flight."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_id: int, study_name: str):
        self._storage = storage
        self._study_id = study_id
        self._name = study_name
        self._saved: dict[str, Any] | None = None  # what save last wrote
        self._epoch: int | None = None  # of the whole state last written

    def save(self, state: dict[str, Any], in_flight: Sequence[int] = ()) -> None:
        """Checkpoint ``state`` and the ids in flight, appending when it extends the last."""
        log = state.get("log")
        head = {k: v for k, v in state.items() if k != "log"}
        in_flight = [int(i) for i in in_flight]
        saved = self._saved
        if saved is not None and _extends(log, head, saved):
            k = saved["k"] + 1
            key = f"{STATE_APPEND}{saved['epoch']}.{k}"
            self._storage.set_study_system_attr(
                self._study_id, key, {"log": log[saved["n"]:], "in_flight": in_flight})
            saved["k"] = k
        else:
            if self._epoch is None:
                top = self._storage.get_study_system_attrs(self._study_id).get(STATE)
                self._epoch = int(top["epoch"]) if top else 0
            epoch = self._epoch + 1
            self._storage.set_study_system_attr(self._study_id, STATE, {
                "epoch": epoch, "state": state, "in_flight": in_flight})
            self._epoch = epoch
            saved = self._saved = {"epoch": epoch, "k": 0, "head": head}
        if isinstance(log, list):
            saved.update(n=len(log), last=log[-1] if log else None)
        else:
            self._saved = None  # a native state: written whole every time

    def read(self) -> tuple[dict[str, Any], list[int]] | None:
        """The last saved state and the ids then in flight (None before the first save)."""
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
            raise StorageError(f"study {self._name!r}: strategy state is incomplete "
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
