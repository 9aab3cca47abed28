"""Studies on a real PostgreSQL server: what several machines sharing one study rely on.

A private server is started for this module (``initdb`` + ``pg_ctl``), listening on a
unix socket only, in a throwaway folder; it is stopped and removed afterwards.  The
module is skipped when the PostgreSQL binaries or ``psycopg2`` are missing.  As root
(PostgreSQL refuses to run as root) the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy
import yaml
from helpers import zoo_experiment

from mergesearch.cli import main
from mergesearch.controller import run
from mergesearch.experiment import Experiment
from mergesearch.recipe import Recipe
from mergesearch.storage import TrialStore

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60  # seconds for initdb, and again for the server to accept connections
DATABASE = "mergesearch_test"


def _pg_bin_dir() -> Path | None:
    """A folder holding both initdb and pg_ctl: PATH first, then Debian's layout."""
    dirs = []
    if found := shutil.which("initdb"):
        dirs.append(Path(found).parent)
    dirs += sorted((Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")),
                   key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
                   reverse=True)
    for d in dirs:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def _free_port() -> int:
    # The socket file is named after the port (.s.PGSQL.<port>); the server also derives
    # its shared-memory key from it, so pick one nothing else here is using.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(no server log: {err})"


@pytest.fixture(scope="module")
def postgres_url():
    """A SQLAlchemy URL of an empty database on a private, throwaway PostgreSQL server."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed "
                                   "(pip install psycopg2-binary)")
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                    "/usr/lib/postgresql/*/bin")
    as_user: dict = {}
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no 'postgres' user to run the server")
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    # A short path: unix socket paths are limited to about 100 characters.
    top = Path(tempfile.mkdtemp(prefix="mspg", dir="/tmp"))
    data, sockdir, log = top / "data", top / "sock", top / "server.log"
    sockdir.mkdir(mode=0o700)
    if as_user:
        for p in (top, sockdir):
            os.chown(p, as_user["user"], as_user["group"])
    port = _free_port()

    def fail(what: str, detail: str) -> None:
        raise RuntimeError(f"PostgreSQL test server: {what}\n{detail}\n--- server log tail:\n"
                           f"{_tail(log)}")

    def pg(*args: str, timeout: float) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(top), "LC_ALL": "C"}
        try:
            return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=top, env=env,
                                  capture_output=True, text=True, timeout=timeout, **as_user)
        except subprocess.TimeoutExpired:
            fail(f"{args[0]} {args[1]} did not finish in {timeout:.0f} s", "")

    started = False
    try:
        done = pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", timeout=START_TIMEOUT)
        if done.returncode != 0:
            fail("initdb failed", done.stderr[-2000:])
        options = (f"-c listen_addresses='' -k {sockdir} -p {port} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        started = True  # from here on, teardown tries to stop it
        # -w -t: wait until it accepts connections, at most START_TIMEOUT seconds
        done = pg("pg_ctl", "start", "-D", str(data), "-l", str(log), "-w",
                  "-t", str(START_TIMEOUT), "-o", options, timeout=START_TIMEOUT + 30)
        if done.returncode != 0:
            fail("pg_ctl start failed", (done.stdout + done.stderr)[-2000:])

        con = psycopg2.connect(host=str(sockdir), port=port, user="postgres",
                               dbname="postgres", connect_timeout=10)
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            con.close()
        yield f"postgresql+psycopg2://postgres@/{DATABASE}?host={sockdir}&port={port}"
    finally:
        if started:
            try:
                pg("pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w", timeout=60)
            except RuntimeError:  # timed out; removing its folder is all that is left
                pass
        shutil.rmtree(top, ignore_errors=True)


# -- helpers --------------------------------------------------------------------------


def write_experiment(tmp_path: Path, storage: str, name: str, **changes) -> Path:
    """The zoo search of ``helpers.zoo_experiment`` with a few small evaluations, storing
    its study at ``storage``, as a YAML file (relative paths resolve from the repo root)."""
    changes = {"evaluator__limit": 8, "budget": {"evaluations": 4}} | changes
    exp = zoo_experiment(tmp_path, name=name, storage=storage, **changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json", exclude_none=True),
                                   sort_keys=False))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m mergesearch.cli ARGS`` in a fresh process, from the repository root."""
    return subprocess.run([sys.executable, "-m", "mergesearch.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def as_rows(trials) -> list[tuple]:
    return sorted((t.number, t.candidate_id, t.state, t.values, t.params) for t in trials)


def completed(engine: sqlalchemy.Engine, study: str) -> int:
    """COMPLETE trials of a study, counted in SQL on Optuna's tables (0 before it exists)."""
    query = sqlalchemy.text("SELECT count(*) FROM trials JOIN studies USING (study_id) "
                            "WHERE study_name = :name AND state = 'COMPLETE'")
    try:
        with engine.connect() as con:
            return con.execute(query, {"name": study}).scalar()
    except sqlalchemy.exc.ProgrammingError:  # tables not created yet
        return 0


def parse_recipes(out: str) -> dict[int, tuple[dict[str, str], str]]:
    """``pareto --recipes`` output: trial number -> (values as printed, recipe YAML)."""
    front = {}
    for block in out.split("# trial ")[1:]:
        head, _, recipe = block.partition("\n")
        number, _, values = head.partition(": ")
        front[int(number)] = (dict(v.split("=") for v in values.split(", ")), recipe.strip())
    return front


# -- tests ----------------------------------------------------------------------------


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_search_on_postgres_reads_back_the_same_from_another_process(zoo, postgres_url,
                                                                     tmp_path):
    path = write_experiment(tmp_path, postgres_url, "pg_front", budget={"evaluations": 5})
    summary = run(Experiment.load(path), progress=False)
    assert (summary.ok, summary.failed, summary.stopped) == (5, 0, "budget")
    assert summary.storage == postgres_url

    store = TrialStore.open(postgres_url, "pg_front")
    trials = store.trials()
    assert [t.state for t in trials] == ["ok"] * 5
    assert sorted(t.candidate_id for t in trials) == list(range(5))
    front = store.pareto_front()
    assert front and {t.number for t in front} == {t.number for t in summary.front}
    assert as_rows(front) == as_rows(summary.front)

    status = cli("status", str(path))
    assert status.returncode == 0, status.stderr
    assert f"study 'pg_front' in {postgres_url}" in status.stdout
    assert "trials: 5 ok, 0 failed, 0 in flight (budget 5)" in status.stdout
    for o in store.objectives:
        best = max(t.values[o.name] for t in trials)
        assert f"best {o.name} ({o.direction}): {best:.4f}" in status.stdout

    pareto = cli("pareto", str(path), "--recipes")
    assert pareto.returncode == 0, pareto.stderr
    seen = parse_recipes(pareto.stdout)
    assert seen == {t.number: ({k: f"{v:.4f}" for k, v in t.values.items()},
                               Recipe.from_dict(t.recipe).to_yaml().strip()) for t in front}


@pytest.mark.slow  # subprocesses on a PostgreSQL server: ~10 s
def test_two_studies_in_one_database_keep_their_own_trials(zoo, postgres_url, tmp_path):
    """Study b runs in another process while study a is mid-search: a waits after its
    first trial until b has written, so the two write to one database interleaved."""
    path = write_experiment(tmp_path, postgres_url, "pg_pair")
    # Opening the storage creates Optuna's tables once, before two processes race to
    # create them on an empty database.
    assert not TrialStore.exists(postgres_url, "a") and not TrialStore.exists(postgres_url, "b")
    other = subprocess.Popen(
        [sys.executable, "-m", "mergesearch.cli", "run", str(path), "-q", "--study", "b",
         "--set", "seed=2", "--set", "budget.evaluations=2", "--set", f"output={tmp_path / 'b'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    engine = sqlalchemy.create_engine(postgres_url)
    b_done_while_a_ran = []

    def wait_for_b(result) -> None:
        if b_done_while_a_ran:
            return
        deadline = time.monotonic() + 240
        while (done := completed(engine, "b")) == 0 and other.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        b_done_while_a_ran.append(done)

    try:
        mine = run(Experiment.load(path, ["seed=1", "budget.evaluations=3"]), study="a",
                   progress=False, on_result=wait_for_b)
        out, err = other.communicate(timeout=300)
    finally:
        engine.dispose()
        if other.poll() is None:
            other.kill()
            other.wait()
    assert other.returncode == 0, err
    assert "b: 2 trials (2 ok, 0 failed" in out
    assert mine.ok == 3
    assert b_done_while_a_ran[0] >= 1  # b wrote while a had 1 trial of 3

    a = TrialStore.open(postgres_url, "a").trials()
    b = TrialStore.open(postgres_url, "b").trials()
    assert [t.state for t in a] == ["ok"] * 3 and [t.state for t in b] == ["ok"] * 2
    assert sorted(t.candidate_id for t in a) == [0, 1, 2]
    assert sorted(t.candidate_id for t in b) == [0, 1]
    assert [t.number for t in a] == [0, 1, 2] and [t.number for t in b] == [0, 1]
    # both start at the space's start point; after it, each seed draws its own genomes
    assert a[0].params == b[0].params and a[1].params != b[1].params
    assert len({json.dumps(t.params, sort_keys=True) for t in a}) == 3
    seeds = {name: TrialStore.open(postgres_url, name).experiment["seed"] for name in "ab"}
    assert seeds == {"a": 1, "b": 2}
    assert as_rows(mine.front) == as_rows(TrialStore.open(postgres_url, "a").pareto_front())


@pytest.mark.slow  # subprocesses on a PostgreSQL server: ~10 s
def test_resume_from_another_process_with_a_larger_budget(zoo, postgres_url, tmp_path,
                                                         capsys):
    path = write_experiment(tmp_path, postgres_url, "pg_resume", budget={"evaluations": 3})
    first = run(Experiment.load(path), progress=False)
    assert first.ok == 3
    before = as_rows(TrialStore.open(postgres_url, "pg_resume").trials())

    done = cli("run", str(path), "--resume", "-q", "--set", "budget.evaluations=6")
    assert done.returncode == 0, done.stderr
    assert "pg_resume: 6 trials (6 ok, 0 failed, 0 from cache); 3 evaluated in this run" \
        in done.stdout

    trials = TrialStore.open(postgres_url, "pg_resume").trials()
    assert len(trials) == 6 and all(t.state == "ok" for t in trials)
    assert sorted(t.candidate_id for t in trials) == list(range(6))  # none twice, none lost
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 6
    assert as_rows(trials)[:3] == before  # the first run's trials are kept as they were

    # resuming with a change that defines another search is refused, and writes nothing
    assert main(["run", str(path), "--resume", "-q", "--set", "seed=5"]) == 2
    assert "different seed" in capsys.readouterr().err
    assert len(TrialStore.open(postgres_url, "pg_resume").trials()) == 6


@pytest.mark.parametrize("where", ["no server", "no database"])
def test_unreachable_postgres_is_one_clear_line_and_exit_2(zoo, postgres_url, tmp_path,
                                                          capsys, where):
    if where == "no server":  # a socket folder that does not exist (kept short: a long
        # socket path is refused with another message)
        url = f"postgresql+psycopg2://postgres@/{DATABASE}?host=/nonexistent/mspg&port=5432"
        reason = "No such file or directory"
    else:  # the live server, a database it does not have
        url = postgres_url.replace(f"/{DATABASE}?", "/no_such_db?")
        reason = 'database "no_such_db" does not exist'
    path = write_experiment(tmp_path, url, "pg_bad")

    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot open storage {url!r}: OperationalError")
    assert reason in err and "\n" not in err
    assert not (tmp_path / "run").exists()
    assert main(["status", str(path)]) == 2
    assert capsys.readouterr().err.strip() == err


def _fresh_database(postgres_url: str, name: str) -> str:
    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    finally:
        engine.dispose()
    return postgres_url.replace(f"/{DATABASE}?", f"/{name}?")


OPEN_AT_ONCE = """
import sys, time
from mergesearch.storage import TrialStore
from mergesearch.strategies import Dimension, Objective
url, name, at = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, at - time.time()))
TrialStore.create(url, name, [Objective("score", "maximize")],
                  [Dimension("a", 0.0, 1.0, 0.5)], {"name": name})
"""


@pytest.mark.slow  # subprocesses on a PostgreSQL server: ~10 s
def test_searches_opening_an_empty_database_at_once_all_start(postgres_url):
    """The first open of a database creates Optuna's tables: machines (processes) and a
    sweep's searches (threads) starting together must not trip over each other."""
    import threading

    from mergesearch.strategies import Dimension, Objective

    url = _fresh_database(postgres_url, "mergesearch_race")
    at = time.time() + 8  # after the processes' imports
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, url, f"p{i}", str(at)],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for i in range(3)]
    errors = []

    def open_study(i: int) -> None:
        time.sleep(max(0.0, at - time.time()))
        try:
            TrialStore.create(url, f"t{i}", [Objective("score", "maximize")],
                              [Dimension("a", 0.0, 1.0, 0.5)], {"name": f"t{i}"})
        except Exception as err:  # reported below, with the processes' errors
            errors.append(repr(err))

    threads = [threading.Thread(target=open_study, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in procs:
        _, err = p.communicate(timeout=120)
        if p.returncode:
            errors.append(err[-1500:])
    assert not errors
    assert all(TrialStore.exists(url, n) for n in ("p0", "p1", "p2", "t0", "t1", "t2"))


@pytest.mark.slow
def test_a_second_writer_on_a_postgres_study_is_refused(zoo, postgres_url, tmp_path, capsys):
    """Two `mergesearch run` processes on one study (the second one this test's): the one
    that holds the lease runs to its budget, the other stops with one line naming the
    holder; readers are never blocked."""
    from mergesearch.cli import main

    path = write_experiment(tmp_path, postgres_url, "pg_lease", evaluator__limit=64,
                            budget={"evaluations": 24})
    engine = sqlalchemy.create_engine(postgres_url)
    first = subprocess.Popen([sys.executable, "-m", "mergesearch.cli", "run", str(path), "-q"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 240
    while completed(engine, "pg_lease") < 1:
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    capsys.readouterr()
    assert main(["run", str(path), "--resume", "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is being written by another search" in lines[0]
    assert f"pid {first.pid}" in lines[0]
    assert main(["status", str(path)]) == 0  # a reader, while the writer runs
    assert "trials:" in capsys.readouterr().out
    assert first.poll() is None, "the writer finished before the checks: raise its budget"
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    trials = TrialStore.open(postgres_url, "pg_lease").trials()
    assert sorted(t.candidate_id for t in trials) == list(range(24))
    engine.dispose()
