"""``mergesearch dashboard``: optuna-dashboard over a search's storage, with more in it.

optuna-dashboard already shows any mergesearch study (objective names, the Pareto front,
the trial table).  This adds, to every trial that lacks them, and again every few seconds
while it serves (so a running search's new trials appear):

* the trial's recipe files as Optuna artifacts, downloadable from its trial page: the
  same ``recipe.json``, ``mergekit.yml`` (or ``mergekit.txt`` saying why mergekit cannot
  express it) and ``scores.json`` that ``mergesearch export`` writes; the files live in
  an artifact folder beside the study (``<folder of study.db>/artifacts``);
* per-task scores as user attrs of their own, ``score.<task>.<metric>`` (numbers the
  trial table can sort and filter, where the ``scores`` attr is one JSON object);
* mergesearch's plots (:mod:`mergesearch.report.plots`) as the study's custom plots:
  hypervolume (or best-so-far) history, per-layer heatmaps of the front's recipes, the
  chosen data-flow recipe's layer path, and for more than two objectives the front in
  parallel coordinates.

The files and attrs are attached by the dashboard, not by the search: a search pays
nothing for them, and studies recorded before this existed get them too.  Optuna refuses
to change a finished trial through its API, so the attrs go in with one SQL transaction
per refresh (:func:`mergesearch.storage.insert.set_trial_attrs`).

The server binds 127.0.0.1 unless another host is asked for explicitly.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
import tempfile
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from mergesearch.errors import MergesearchError
from mergesearch.storage import insert
from mergesearch.storage.rdb import open_rdb, quiet_optuna, sqlite_missing, sqlite_path
from mergesearch.storage.trials import EXPERIMENT, PROBES, TrialStore

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PORT = 8080
REFRESH = 10.0  # seconds between refreshes while serving
FILES = "mergesearch.files"  # trial system attr: {file name: artifact id} once attached
SCORE = "score."  # prefix of the per-task score user attrs: score.<task>.<metric>
MIMETYPES = {".json": "application/json", ".yml": "text/plain", ".txt": "text/plain"}
PLOTS = ("mergesearch-history", "mergesearch-front", "mergesearch-layers",
         "mergesearch-layer-path")  # the graph object ids of the custom plots
MAX_HEATMAP_TRIALS = 20  # front recipes in the heatmap's menu (the chosen one first)
_BATCH = 200  # trials per attr transaction (keeps the SQLite write lock short)


class DashboardError(MergesearchError, ValueError):
    """The dashboard cannot start as asked (port in use, no such study or storage)."""


@dataclass
class Target:
    """What a dashboard serves: a storage, the mergesearch studies in it to keep up to date,
    and the folder of their artifacts."""

    url: str
    studies: list[str] | None  # None: every mergesearch study there, as they appear
    artifacts: Path

    def present(self, storage: optuna.storages.BaseStorage) -> list[str]:
        """The target's studies that exist now (a later stage may start after the
        dashboard did)."""
        there = _studies(storage)
        return there if self.studies is None else [n for n in self.studies if n in there]


def is_storage_url(text: str) -> bool:
    return "://" in text


def resolve(target: str, study: str | None = None, overrides: Sequence[str] = (),
            artifacts: str | Path | None = None) -> Target:
    """The storage and studies of ``target``: an experiment file (its study, or each of
    its stages' studies), a storage URL (every mergesearch study in it) or a SQLite
    file; ``study`` picks one (with stages, its stages).  Errors name the studies there."""
    run_dir = None
    names: list[str] | None = None
    path = Path(target)
    if is_storage_url(target):
        url = target
    elif path.suffix in (".db", ".sqlite", ".sqlite3") or _is_sqlite_file(path):
        if not path.is_file():
            raise DashboardError(f"{target}: no such SQLite file; give an experiment file, a "
                                 "storage URL or an existing study.db")
        url = f"sqlite:///{path.as_posix()}"
    else:
        from mergesearch.experiment import Experiment

        exp = Experiment.load(path, list(overrides))
        url, run_dir = exp.storage_url, exp.run_dir
        base = study or exp.name
        names = [f"{base}.{st.name}" for st in exp.stages] if exp.stages else [base]
    if overrides and run_dir is None:
        raise DashboardError("--set applies to an experiment file, not to a storage URL")
    existing = mergesearch_studies(url)
    if not existing:
        raise DashboardError(f"no mergesearch study in {url} yet: run the search first "
                             "(mergesearch run EXPERIMENT)")
    if names is None and study is not None:
        names = [study]
    if names is not None and not any(n in existing for n in names):
        asked = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"
        raise DashboardError(f"no study {asked!r} in {url}; the studies there: "
                             f"{', '.join(existing)} (choose one with --study)")
    if artifacts is None:
        db = sqlite_path(url)
        if db is not None:
            artifacts = db.parent / "artifacts"
        elif run_dir is not None:
            artifacts = run_dir / "artifacts"
        else:
            raise DashboardError(f"{url} is not a SQLite file: say where the artifact files "
                                 "go with --artifacts DIR (the same folder every time)")
    return Target(url=url, studies=names, artifacts=Path(artifacts))


def _is_sqlite_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def mergesearch_studies(url: str) -> list[str]:
    """The studies mergesearch wrote in a storage (probe studies left out), by name."""
    if sqlite_missing(url):
        return []
    storage = open_rdb(url)
    try:
        return _studies(storage)
    finally:
        storage.engine.dispose()


def _studies(storage: optuna.storages.BaseStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies()
                  if not s.study_name.endswith(PROBES) and EXPERIMENT in s.user_attrs)


# -- attaching files, scores and plots ---------------------------------------------------


@dataclass
class Refreshed:
    """What one refresh did."""

    trials: int = 0  # trials that got their recipe files or scores now
    plots: int = 0  # custom plots written now
    studies: list[str] = field(default_factory=list)  # studies that had anything new


class Annotator:
    """Attaches recipe files, per-task score attrs and custom plots to a target's studies;
    each :meth:`refresh` does only what new trials need."""

    def __init__(self, target: Target, storage: optuna.storages.RDBStorage | None = None):
        self.target = target
        self.storage = storage if storage is not None else open_rdb(target.url)
        self._direct = insert.supported(self.storage)
        self._seen: dict[str, tuple[int, int]] = {}  # study -> (finished trials, last number)
        self._warned: set[str] = set()  # warnings given once

    def refresh(self, *, plots: bool = True) -> Refreshed:
        done = Refreshed()
        for name in self.target.present(self.storage):
            with quiet_optuna():
                study = optuna.load_study(study_name=name, storage=self.storage)
            store = TrialStore(study, self.storage, self.target.url)
            frozen = study.get_trials(deepcopy=False)
            finished = [t for t in frozen if t.state.is_finished()]
            seen = (len(finished), max((t.number for t in finished), default=-1))
            if self._seen.get(name) == seen and self._files_there(finished):
                continue
            records = {r.number: r for r in store.trials()}
            n = self._attach(study, finished, records)
            p = self._plot(study, store, list(records.values())) if plots else 0
            self._seen[name] = seen
            done.trials += n
            done.plots += p
            if n or p:
                done.studies.append(name)
        return done

    def _files_there(self, trials: Sequence[optuna.trial.FrozenTrial]) -> bool:
        """Whether the artifact files of the trials marked as having them exist (someone
        may point the dashboard at another artifact folder, or empty it)."""
        for t in trials[-1:]:  # the cheap check: the newest one
            ids = t.system_attrs.get(FILES) or {}
            if not all((self.target.artifacts / i).is_file() for i in ids.values()):
                return False
        return True

    def _attach(self, study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial],
                records: dict[int, Any]) -> int:
        if not self._direct:
            if "schema" not in self._warned:
                log.warning("%s: this Optuna schema is not the one mergesearch writes "
                            "directly; recipe files and score attrs are not attached",
                            self.target.url)
                self._warned.add("schema")
            return 0
        user: dict[int, dict] = {}
        system: dict[int, dict] = {}
        for t in trials:
            record = records.get(t.number)
            if record is None:
                continue
            scores = _score_attrs(record.scores)
            missing = {k: v for k, v in scores.items() if k not in t.user_attrs}
            if missing:
                user[t._trial_id] = missing
            if record.recipe is not None:
                files = t.system_attrs.get(FILES) or {}
                if not files or not all((self.target.artifacts / i).is_file()
                                        for i in files.values()):
                    system[t._trial_id] = self._write_files(study, t._trial_id, record)
        ids = sorted(set(user) | set(system))
        for start in range(0, len(ids), _BATCH):
            batch = ids[start:start + _BATCH]
            insert.set_trial_attrs(self.storage.engine,
                                   {i: user[i] for i in batch if i in user},
                                   {i: system[i] for i in batch if i in system})
        return len(ids)

    def _write_files(self, study: optuna.Study, trial_id: int, record: Any) -> dict[str, Any]:
        """Write one trial's recipe files into the artifact folder (each atomically, under
        an id fixed by study, trial and file name, so writing again replaces them) and return
        the trial system attrs that make them its artifacts."""
        from mergesearch.atomic import atomic_write_text
        from mergesearch.report.pareto import write_trial

        self.target.artifacts.mkdir(parents=True, exist_ok=True)
        attrs: dict[str, Any] = {}
        files = {}
        with tempfile.TemporaryDirectory() as tmp:
            write_trial(record, Path(tmp))
            for path in sorted(Path(tmp).iterdir()):
                artifact_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "mergesearch:"
                                             f"{study.study_name}/{trial_id}/{path.name}"))
                atomic_write_text(self.target.artifacts / artifact_id, path.read_text())
                meta = {"artifact_id": artifact_id, "filename": path.name,
                        "mimetype": MIMETYPES.get(path.suffix, "application/octet-stream"),
                        "encoding": None}
                attrs[f"artifacts:{artifact_id}"] = json.dumps(meta)  # as Optuna writes it
                files[path.name] = artifact_id
        attrs[FILES] = files
        return attrs

    def _plot(self, study: optuna.Study, store: TrialStore, trials: list[Any]) -> int:
        from optuna_dashboard import save_plotly_graph_object

        try:
            figures = custom_figures(store, trials)
        except ImportError as err:  # plotly missing: the dashboard still serves
            if "plots" not in self._warned:
                log.warning("no custom plots (%s): pip install 'mergesearch[dashboard]'", err)
                self._warned.add("plots")
            return 0
        for graph_id, figure in figures.items():
            save_plotly_graph_object(study, figure, graph_object_id=graph_id)
        return len(figures)


def _score_attrs(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{task: {metric: value}}`` as ``{"score.<task>.<metric>": value}``."""
    out = {}
    for task, metrics in (scores or {}).items():
        for metric, value in (metrics or {}).items():
            if isinstance(value, (int, float)):
                out[f"{SCORE}{task}.{metric}"] = value
    return out


def custom_figures(store: TrialStore, trials: list[Any]) -> dict[str, Any]:
    """The custom plots of a study by graph object id (those that have anything to show)."""
    from mergesearch.report import choose, plots

    objectives = store.objectives
    figures: dict[str, Any] = {PLOTS[0]: plots.history_figure(trials, objectives)}
    front = store.pareto_front()
    if len(objectives) > 2:
        figures[PLOTS[1]] = plots.front_figure(trials, objectives, front)
    if front:
        chosen = choose(front, objectives)  # first, as in the static report
        ordered = [chosen] + [t for t in front if t.number != chosen.number]
        heatmap = plots.layer_heatmap_figure(ordered[:MAX_HEATMAP_TRIALS])
        if heatmap is not None:
            figures[PLOTS[2]] = heatmap
        if chosen.recipe and chosen.recipe.get("layer_path"):
            path = plots.layer_path_figure(chosen.recipe)
            if path is not None:
                path.update_layout(title=f"Layer path of trial {chosen.number} (the front "
                                   "point chosen by the objectives' weights)")
                figures[PLOTS[3]] = path
    return figures


# -- serving -----------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a page's parallel requests answered together


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s " + format, self.address_string(), *args)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken (before any slow work), naming the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind((host, port))
        except OSError as err:
            raise _bind_error(host, port, err) from None


def _bind_error(host: str, port: int, err: OSError) -> DashboardError:
    if err.errno == errno.EADDRINUSE:
        return DashboardError(f"port {port} on {host} is in use (another dashboard?); "
                              "choose another with --port N")
    if err.errno == errno.EACCES:
        return DashboardError(f"port {port} on {host}: permission denied; choose a port "
                              "above 1023 with --port N")
    return DashboardError(f"cannot listen on {host}:{port}: {err.strerror or err}; "
                          "choose another --host or --port")


class Dashboard:
    """optuna-dashboard over a target's storage, its studies refreshed every ``interval``
    seconds (0: once, at start) while it serves."""

    def __init__(self, target: Target, *, host: str = HOST, port: int = PORT,
                 interval: float = REFRESH):
        self.target, self.host, self.port, self.interval = target, host, port, interval
        self._server: WSGIServer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.storage = open_rdb(target.url)
        self.annotator = Annotator(target, self.storage)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = self._server.server_port if self._server else self.port
        names = self.target.present(self.storage)
        if not names:
            return f"http://{host}:{port}/dashboard/"
        study_id = self.storage.get_study_id_from_name(names[-1])  # the last stage's
        return f"http://{host}:{port}/dashboard/studies/{study_id}"

    def start(self) -> Refreshed:
        """Check the port, attach what the trials lack, and listen (not yet serving)."""
        check_port(self.host, self.port)
        first = self.annotator.refresh()
        from optuna.artifacts import FileSystemArtifactStore
        from optuna_dashboard import wsgi

        self.target.artifacts.mkdir(parents=True, exist_ok=True)
        app = wsgi(self.storage, artifact_store=FileSystemArtifactStore(self.target.artifacts))
        server_class = _Server6 if ":" in self.host else _Server
        try:
            self._server = make_server(self.host, self.port, app, server_class=server_class,
                                       handler_class=_QuietHandler)
        except OSError as err:  # taken since the check
            raise _bind_error(self.host, self.port, err) from None
        if self.interval > 0:
            self._thread = threading.Thread(target=self._refresh_loop, name="dashboard-refresh",
                                            daemon=True)
            self._thread.start()
        return first

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                done = self.annotator.refresh()
                if done.studies:
                    log.info("refreshed %s: %d trial(s), %d plot(s)", ", ".join(done.studies),
                             done.trials, done.plots)
            except Exception:  # a refresh failing must not stop the server
                log.exception("dashboard refresh failed; trying again in %g s", self.interval)

    def serve_forever(self) -> None:
        try:
            self._server.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=30)
