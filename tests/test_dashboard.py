"""`mergesearch dashboard`: recipe files, score attrs and plots attached to a finished zoo
study; the live dashboard and the static report opened in headless Chromium; bad inputs.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages separated by NUL on file descriptors 3 and 4), which needs no websocket
library and hears every console message and uncaught exception of the page.
Screenshots go to ``$MERGESEARCH_SCREENSHOTS`` (default: a temporary folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import zoo_experiment

from mergesearch.cli import main
from mergesearch.storage import TrialStore
from mergesearch.strategies.base import Objective

ROOT = Path(__file__).resolve().parents[1]


def _chromium() -> str | None:
    for name in (os.environ.get("MERGESEARCH_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


needs_chromium = pytest.mark.skipif(
    _chromium() is None, reason="no chromium on PATH: install it (Debian: apt-get install -y "
    "chromium; .ci/run does where apt works) or set MERGESEARCH_CHROMIUM")


# -- a headless browser over the DevTools protocol ----------------------------------------


class Browser:
    """One headless Chromium page driven over ``--remote-debugging-pipe``."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1000):
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()

        def on_fds_3_and_4() -> None:  # Chromium reads commands on 3, answers on 4
            import fcntl

            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome)]
            os.dup2(high[0], 3)  # dup2 makes them inheritable
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [_chromium(), "--headless=new", "--disable-gpu", "--no-sandbox",
             "--no-first-run", "--no-default-browser-check", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
            preexec_fn=on_fds_3_and_4)  # (close_fds would close 3 and 4)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer = b""
        self._next = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=self.session)
        self.call("Emulation.setDeviceMetricsOverride", session=self.session, width=width,
                  height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive(timeout=60)
            if reply.get("id") == self._next:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})
            self.events.append(reply)

    def _receive(self, timeout: float) -> dict:
        import select

        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, "chromium did not answer"
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                chunk = os.read(self._read, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=self.session, url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=self.session, expression=expression,
                           returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        """The value of ``expression`` once it is truthy (polled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for: {expression}")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (e.g. failed loads)
        of the page so far."""
        self.evaluate("0")  # collect the events sent meanwhile
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description", "")))
                                    for a in p.get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def screenshot(self, path: Path) -> Path:
        import base64

        height = self.evaluate("document.documentElement.scrollHeight") or 1000
        data = self.call("Page.captureScreenshot", session=self.session, format="png",
                         captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": 1400, "height": min(height, 6000),
                               "scale": 1})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._read)
        os.close(self._write)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "chromium-profile")
    yield b
    b.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    where = os.environ.get("MERGESEARCH_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- a finished zoo study ------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, zoo):
    """A finished two-objective zoo search (per-layer-group TIES), as an experiment file."""
    from mergesearch.controller import run

    tmp = tmp_path_factory.mktemp("dashboard")
    exp = zoo_experiment(tmp, name="dash", space="search_spaces/ties_layer_groups.yaml",
                         budget={"evaluations": 12})
    run(exp, progress=False)
    path = tmp / "dash.yaml"
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json", exclude_none=True)))
    return path, exp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_dashboard(*args: str) -> tuple[subprocess.Popen, str]:
    """`mergesearch dashboard ARGS` in a subprocess; it and the URL it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "mergesearch.cli", "dashboard", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()
    if not line.startswith("dashboard: "):
        proc.kill()
        raise AssertionError(f"no URL printed: {line!r} {proc.communicate()[1][-2000:]}")
    return proc, line.split()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- attaching files, scores and plots -----------------------------------------------------


@pytest.mark.slow
def test_every_trial_gets_its_recipe_files_scores_and_the_plots(finished, tmp_path):
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    from mergesearch.controller import run
    from mergesearch.dashboard import FILES, PLOTS, Annotator, resolve
    from mergesearch.report.pareto import write_trial

    path, exp = finished
    target = resolve(str(path))
    assert target.url == exp.storage_url and target.studies == ["dash"]
    assert target.artifacts == exp.run_dir / "artifacts"
    annotator = Annotator(target)
    first = annotator.refresh()
    assert first.trials == 12 and first.studies == ["dash"]
    store = TrialStore.open(exp.storage_url, "dash")
    for t, frozen in zip(store.trials(), store.study.get_trials(), strict=True):
        want = tmp_path / f"t{t.number}"
        want.mkdir()
        write_trial(t, want)  # what `mergesearch export` writes
        files = frozen.system_attrs[FILES]
        assert sorted(files) == sorted(p.name for p in want.iterdir())
        assert {"mergekit.yml", "recipe.json", "scores.json"} <= set(files)
        for name, artifact_id in files.items():
            assert (target.artifacts / artifact_id).read_text() == (want / name).read_text()
            meta = json.loads(frozen.system_attrs[f"artifacts:{artifact_id}"])
            assert meta["filename"] == name
        for task, metrics in t.scores.items():
            for metric, value in metrics.items():
                assert frozen.user_attrs[f"score.{task}.{metric}"] == value
        assert frozen.datetime_complete > frozen.datetime_start
    graphs = get_plotly_graph_objects(store._storage.get_study_system_attrs(store._study_id))
    assert {PLOTS[0], PLOTS[2]} <= set(graphs)  # history and the front's heatmaps
    assert PLOTS[3] not in graphs  # no layer path in these recipes
    history = json.loads(graphs[PLOTS[0]])
    assert history["data"] and "ypervolume" in json.dumps(history["layout"])

    assert annotator.refresh().trials == 0  # nothing new: nothing done
    run(exp.model_copy(update={"budget": exp.budget.model_copy(update={"evaluations": 14})}),
        progress=False)  # the search goes on: two more trials
    again = annotator.refresh()
    assert again.trials == 2 and again.plots >= 2
    shutil.rmtree(target.artifacts)  # a lost artifact folder is written again
    assert annotator.refresh().trials == 14


def _synthetic(tmp_path, n: int) -> tuple[str, TrialStore]:
    """A two-objective study with ``n`` recipe trials (no models needed), the last failed."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = TrialStore.create(url, "syn", [Objective("a", "maximize"), Objective("b", "maximize")],
                              [], {"name": "syn"})
    for i in range(n):
        _add(store, i, failed=i == n - 1)
    return url, store


def _add(store: TrialStore, i: int, *, failed: bool = False) -> None:
    from mergesearch.recipe import Recipe
    from mergesearch.trial import Candidate, Result

    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": "/x/base", "models": [
        {"model": "/x/a", "parameters": {"weight": [{"filter": "layers.0.", "value": i / 10},
                                                    {"filter": "layers.1.", "value": 0.5},
                                                    {"value": 0.5}]}},
        {"model": "/x/b", "parameters": {"weight": 1 - i / 10}}]})
    result = Result.failed(i, "out of memory") if failed else Result(
        i, values={"a": i / 10, "b": 1 - i / 10}, scores={"t": {"acc": i / 10, "loss": 2.0}},
        timings={"evaluate": 0.5})
    store.add(Candidate(i, None, recipe=recipe), result)


def _fresh(url: str) -> list:
    """The study's trials read again (a study object caches finished trials)."""
    import optuna

    return optuna.load_study(study_name="syn", storage=url).get_trials()


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_the_dashboard_keeps_up_with_new_trials(tmp_path):
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    from mergesearch.dashboard import FILES, PLOTS, Dashboard, resolve

    url, store = _synthetic(tmp_path, 3)
    target = resolve(str(tmp_path / "study.db"))
    assert target.studies is None and target.artifacts == tmp_path / "artifacts"
    board = Dashboard(target, port=_free_port(), interval=0.2)
    first = board.start()
    try:
        assert first.trials == 3 and first.studies == ["syn"]
        threading.Thread(target=board.serve_forever, daemon=True).start()
        page = urllib.request.urlopen(board.url, timeout=30).read().decode()
        assert "<div id=\"dashboard\">" in page or "bundle.js" in page
        frozen = _fresh(url)
        assert frozen[0].user_attrs["score.t.acc"] == 0.0 and "score.t.acc" not in \
            frozen[2].user_attrs  # a failed trial has no scores, but has its recipe files
        assert set(frozen[2].system_attrs[FILES]) == {"recipe.json", "mergekit.yml",
                                                      "scores.json"}
        _add(store, 3)  # a search still running records another trial
        deadline = time.monotonic() + 30
        while FILES not in _fresh(url)[3].system_attrs:
            assert time.monotonic() < deadline, "the new trial got no files"
            time.sleep(0.1)
        new = _fresh(url)[3]
        assert new.user_attrs["score.t.acc"] == 0.3
        with open(target.artifacts / new.system_attrs[FILES]["mergekit.yml"]) as f:
            assert "value: 0.3" in f.read()
        time.sleep(0.5)  # the plots are saved after the files
        graphs = get_plotly_graph_objects(store._storage.get_study_system_attrs(
            store._study_id))
        assert {PLOTS[0], PLOTS[2]} <= set(graphs) and "trial 3" in graphs[PLOTS[2]]
    finally:
        board._server.shutdown()
        board.close()


# -- the live dashboard and the static report in Chromium -----------------------------------


FRONT_POINTS = """(() => {
  const g = document.getElementById('graph-pareto-front');
  if (!g || !g.data) return null;
  return g.data.map(t => ({hover: t.hovertemplate || '', n: (t.x || []).length}));
})()"""


@pytest.mark.slow
@needs_chromium
def test_dashboard_in_chromium(finished, browser, screenshots):
    from mergesearch.mergekit_config import to_mergekit_yaml
    from mergesearch.recipe import Recipe

    path, exp = finished
    proc, url = _start_dashboard(str(path), "--port", str(_free_port()), "--refresh", "1")
    try:
        store = TrialStore.open(exp.storage_url, "dash")
        best = len(store.study.best_trials)
        done = sum(t.state == "ok" for t in store.trials())
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/dashboard/studies/\d+", url)
        browser.open(url)
        traces = browser.wait_for(f"(() => {{ const t = {FRONT_POINTS}; return t && "
                                  f"t.reduce((a, b) => a + b.n, 0) >= {done} ? t : null }})()")
        best_shown = sum(t["n"] for t in traces if "Best Trial" in t["hover"])
        assert best_shown == best and sum(t["n"] for t in traces) == done
        # the front's points are drawn, not only held: one SVG marker each
        assert browser.evaluate("document.querySelectorAll('#graph-pareto-front "
                                "path.point').length") == done
        custom = browser.wait_for("(() => { const p = [...document.querySelectorAll("
                                  "'[id^=\"user-defined-plot:\"]')].filter(d => d.data); "
                                  "return p.length >= 2 ? p.map(d => d.id) : null })()")
        assert "user-defined-plot:mergesearch-history" in custom
        browser.screenshot(screenshots / "dashboard-study.png")
        assert browser.errors() == []

        # a front trial's page lists its files; its mergekit YAML downloads from there
        study_id = int(url.rsplit("/", 1)[1])
        trial = store.pareto_front()[0]
        api = json.load(urllib.request.urlopen(f"{url.split('/dashboard')[0]}/api/studies/"
                                               f"{study_id}", timeout=30))
        shown = next(t for t in api["trials"] if t["number"] == trial.number)
        artifacts = {a["filename"]: a["artifact_id"] for a in shown["artifacts"]}
        assert {"recipe.json", "mergekit.yml", "scores.json"} <= set(artifacts)
        browser.open(f"{url}/trials?numbers={trial.number}")
        names = browser.wait_for(
            "(() => { const t = document.body ? document.body.innerText : ''; return "
            "t.includes('mergekit.yml') && t.includes('recipe.json') ? t : null })()")
        assert f"Trial {trial.number}" in names
        browser.screenshot(screenshots / f"dashboard-trial-{trial.number}.png")
        link = f"{url.split('/dashboard')[0]}/artifacts/{study_id}/{shown['trial_id']}/" \
               f"{artifacts['mergekit.yml']}"
        text = browser.evaluate(f"fetch({json.dumps(link)}).then(r => r.text())")
        assert text == to_mergekit_yaml(Recipe.from_dict(trial.recipe))
        recipe = json.loads(urllib.request.urlopen(link.replace(artifacts["mergekit.yml"],
                                                                artifacts["recipe.json"]),
                                                   timeout=30).read())
        assert recipe == Recipe.from_dict(trial.recipe).to_dict()
        assert browser.errors() == []
    finally:
        _stop(proc)


@pytest.mark.slow
@needs_chromium
def test_static_report_in_chromium(finished, browser, screenshots, tmp_path):
    html = pytest.importorskip("mergesearch.report.html", reason="no static report yet")
    from mergesearch.report.plots import FRONT

    _, exp = finished
    store = TrialStore.open(exp.storage_url, "dash")
    page = tmp_path / "report.html"
    page.write_text(html.build_report([store]))
    browser.open(page.as_uri())
    points = browser.wait_for(
        "(() => { for (const d of document.querySelectorAll('.js-plotly-plot')) "
        f"for (const t of d.data || []) if (t.name === {json.dumps(FRONT)}) "
        "return (t.x || t.dimensions[0].values).length; return null })()")
    assert points == len(store.pareto_front())
    assert browser.evaluate("document.querySelectorAll('.js-plotly-plot').length") >= 2
    browser.screenshot(screenshots / "report.png")
    assert browser.errors() == []


# -- bad inputs ----------------------------------------------------------------------------


@pytest.fixture
def empty_study(tmp_path) -> str:
    """A mergesearch study with no trials (enough for the errors a dashboard can give)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    TrialStore.create(url, "only", [Objective("score", "maximize")], [], {"name": "only"})
    return url


def test_a_port_in_use_is_one_line_naming_the_fix(empty_study, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", empty_study, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: port {port} on 127.0.0.1 is in use (another dashboard?); "
                   "choose another with --port N")


def test_an_unknown_study_lists_the_studies_there(empty_study, capsys):
    assert main(["dashboard", empty_study, "--study", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no study 'nope' in sqlite:///") and "there: only" in err
    assert "\n" not in err


def test_an_empty_or_missing_storage_says_to_run_first(tmp_path, capsys):
    assert main(["dashboard", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "run the search first" in capsys.readouterr().err
    assert main(["dashboard", str(tmp_path / "none.db")]) == 2
    assert "no such SQLite file" in capsys.readouterr().err


def test_another_host_only_when_asked_and_with_a_warning(empty_study, capsys):
    from mergesearch.dashboard import HOST, is_loopback

    assert HOST == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with socket.socket() as taken:  # so that the command stops after the warning
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", empty_study, "--host", "0.0.0.0", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("warning: serving on 0.0.0.0: anyone who can reach this machine")
    assert f"error: port {port} on 0.0.0.0 is in use" in err
