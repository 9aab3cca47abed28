"""The Ray executor on a local cluster: full budgets, killed workers, crashing candidates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import completed_count

from mergesearch.controller import BoundExperiment, SearchLoop, run
from mergesearch.execution.ray_executor import ExecutionError, RayExecutor
from mergesearch.execution.worker import WorkerSpec
from mergesearch.experiment import Experiment
from mergesearch.storage import TrialStore

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]
SKILLS = ("rev", "srt", "dup", "evn")


def experiment(tmp_path, *, name="t", limit=16, evaluations=8, **execution) -> Experiment:
    return Experiment.from_dict({
        "name": name,
        "models": {"base": "zoo:base", "sources": {s: f"zoo:{s}" for s in SKILLS}},
        "space": "search_spaces/task_arithmetic.yaml",
        "strategy": {"name": "random"},
        "evaluator": {"suite": "evaluators/zoo", "limit": limit, "objectives": [
            {"name": "rev", "tasks": ["zoo_rev"], "metric": "char_accuracy"},
            {"name": "mean", "metric": "char_accuracy"}]},
        "budget": {"evaluations": evaluations},
        "execution": {"backend": "ray", "workers": 2} | execution,
        "output": str(tmp_path / name),
        "seed": 0,
    })


def trials(exp: Experiment, study: str = "t"):
    return TrialStore.open(exp.storage_url, study).trials()


def test_two_workers_record_every_trial_and_match_the_local_executor(zoo, ray_cluster,
                                                                     tmp_path):
    exp = experiment(tmp_path)
    summary = run(exp, progress=False)
    assert (summary.finished, summary.ok) == (8, 8)
    on_ray = {tuple(t.params.values()): t.values for t in trials(exp)}
    assert len(on_ray) == 8
    local = Experiment.from_dict(exp.model_dump() | {
        "execution": {"backend": "local"}, "output": str(tmp_path / "local")})
    run(local, progress=False)
    on_local = {tuple(t.params.values()): t.values for t in trials(local)}
    assert on_ray == on_local  # same candidates, same scores, whatever the order


def test_a_killed_worker_is_replaced_and_its_candidate_retried(zoo, ray_cluster, tmp_path):
    exp = experiment(tmp_path, limit=64, evaluations=8)
    search = BoundExperiment(exp, progress=False)
    executor = search.make_executor()
    store = search.open_store(resume=None, overwrite=False)
    killed: list[int] = []

    def kill_a_busy_worker(result):
        if killed:
            return
        busy = [s for s in executor._slots if s.outstanding > 0]
        if busy:
            killed.append(busy[0].pid)
            os.kill(busy[0].pid, signal.SIGKILL)

    summary = SearchLoop(search, store, executor, False, kill_a_busy_worker).run()
    assert killed and executor.replaced >= 1
    assert (summary.finished, summary.ok, summary.failed) == (8, 8, 0)
    done = trials(exp)
    assert sorted(t.candidate_id for t in done) == list(range(8))
    assert any(t.attempts == 2 for t in done)  # the killed worker's candidate, run again


def test_a_candidate_that_always_kills_its_worker_fails_and_the_search_completes(
        zoo, ray_cluster, tmp_path):
    exp = experiment(tmp_path, evaluations=6, max_retries=1,
                     worker_class="execution.crashy:CrashyWorker")
    summary = run(exp, progress=False)
    assert (summary.finished, summary.ok, summary.failed) == (6, 5, 1)
    (failed,) = [t for t in trials(exp) if t.state == "failed"]
    assert failed.candidate_id == 2 and failed.attempts == 2
    assert failed.reason.startswith("worker died 2 time(s) running it")


def test_more_gpus_than_the_cluster_has(zoo, ray_cluster, tmp_path):
    exp = experiment(tmp_path, gpus_per_worker=1)
    with pytest.raises(ExecutionError, match=r"2 GPUs requested, but the Ray cluster has 0"):
        run(exp, progress=False)
    assert not (tmp_path / "t").exists()


def test_a_worker_that_cannot_load_a_model_names_it_and_its_node(zoo, ray_cluster, tmp_path):
    import socket

    spec = WorkerSpec(tokenizer=str(zoo.base), evaluator={
        "suite": str(ROOT / "evaluators/zoo"),
        "objectives": [{"name": "m", "metric": "char_accuracy"}]},
        check_recipe={"method": "task_arithmetic", "base": str(zoo.base),
                      "models": [{"model": "/no/such/model", "parameters": {"weight": 1}}]})
    with pytest.raises(ExecutionError) as info:
        RayExecutor(spec, workers=1)
    assert "/no/such/model" in str(info.value)
    assert f"node {socket.gethostname()}" in str(info.value)


def test_unreachable_address_is_one_clear_error(tmp_path):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text((ROOT / "experiments/zoo/random.yaml").read_text())
    out = subprocess.run(
        [sys.executable, "-m", "mergesearch.cli", "run", str(exp_file), "-q",
         "--ray-address", "127.0.0.1:9", "--set", f"output={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=os.environ | {"RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 2, out.stderr
    assert "cannot connect to Ray at '127.0.0.1:9'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_killed_controller_leaves_no_actors_and_resumes(zoo, ray_cluster, tmp_path):
    import psutil  # comes with Ray

    address = ray_cluster.get_runtime_context().gcs_address
    exp = experiment(tmp_path, limit=64, evaluations=10, address=address)
    path = tmp_path / "exp.yaml"
    import yaml

    path.write_text(yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False))
    db = tmp_path / "t" / "study.db"
    proc = subprocess.Popen([sys.executable, "-m", "mergesearch.cli", "run", str(path), "-q"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ | {"RAY_AUTH_MODE": "disabled"})

    def alive():
        """Worker actor processes on this machine (Ray titles them ray::WorkerActor...)."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any("ray::WorkerActor" in part for part in proc.info["cmdline"] or ()):
                    found.append(proc.pid)
            except psutil.Error:
                pass
        return found

    deadline = time.monotonic() + 240
    while completed_count(db) < 2:  # read with sqlite3: opening the study could race its creation
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert len(alive()) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while alive():
        assert time.monotonic() < deadline, "worker actors outlived their controller"
        time.sleep(0.5)
    summary = run(exp, progress=False)  # resume on the same cluster
    assert summary.finished == 10
    done = [t for t in trials(exp) if t.state == "ok"]
    assert sorted(t.candidate_id for t in done) == list(range(10))


def _slow_spec(zoo, limit=256) -> WorkerSpec:
    return WorkerSpec(tokenizer=str(zoo.base), evaluator={
        "suite": str(ROOT / "evaluators/zoo"), "limit": limit,
        "objectives": [{"name": "m", "metric": "char_accuracy"}]})


def _candidates(zoo, n):
    from mergesearch.recipe import Recipe
    from mergesearch.trial import Candidate

    return [Candidate(i, [0.0], recipe=Recipe.from_dict({
        "method": "task_arithmetic", "base": str(zoo.base),
        "models": [{"model": str(zoo.experts["rev"]), "parameters": {"weight": 0.1 * i}}]}))
        for i in range(n)]


def test_a_lost_worker_with_no_room_for_a_replacement_is_a_bounded_wait(zoo, ray_cluster):
    """A node lost with no spare capacity: the replacement cannot be placed (it needs a
    resource nobody has), so after start_timeout it is given up; the search goes on with the
    workers left, and with none left stops with a clear error, results in hand returned."""
    executor = RayExecutor(_slow_spec(zoo), workers=2, start_timeout=120)
    executor.start_timeout = 3.0
    import ray

    from mergesearch.execution.ray_executor import WorkerActor

    executor._remote = ray.remote(WorkerActor).options(
        num_cpus=1, resources={"node-that-is-gone": 1}, max_restarts=0)
    for cand in _candidates(zoo, 4):
        executor.submit(cand)
    doomed = executor._slots[0].pid
    os.kill(doomed, signal.SIGKILL)
    results, start = [], time.monotonic()
    while len(results) < 4:
        results += executor.wait()
        assert time.monotonic() - start < 120
    assert sorted(r.candidate_id for r in results) == [0, 1, 2, 3]
    assert all(r.ok for r in results), [r.reason for r in results if not r.ok]
    # one worker did it all; the replacement is still waiting for room, or given up
    live = [s for s in executor._slots if not s.starting]
    assert len(live) == 1 and live[0].pid != doomed and len(executor._slots) <= 2
    # now the last worker goes too: what it finished comes back, then a clear error
    for cand in _candidates(zoo, 2):
        executor.submit(cand)
    os.kill(live[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(ExecutionError, match=r"no Ray worker left to run .* could not start "
                       r"within 3 s"):
        while True:
            executor.wait()
    assert time.monotonic() - start < 60
    executor.close()


def test_an_unavailable_actor_is_retried_not_replaced(zoo, ray_cluster, monkeypatch):
    import ray

    executor = RayExecutor(_slow_spec(zoo, limit=8), workers=1)
    pid = executor._slots[0].pid
    real_get, failed = ray.get, []

    def flaky_get(ref, *args, **kwargs):
        if not failed and not isinstance(ref, list):  # the first result fetched
            failed.append(ref)
            raise ray.exceptions.ActorUnavailableError("unreachable for now (simulated)", None)
        return real_get(ref, *args, **kwargs)

    monkeypatch.setattr(ray, "get", flaky_get)
    executor.submit(_candidates(zoo, 1)[0])
    results = []
    while not results:
        results = executor.wait()
    assert failed and results[0].ok and results[0].attempts == 2
    assert executor.replaced == 0 and executor._slots[0].pid == pid  # models kept loaded
    executor.close()


def test_a_cluster_mergesearch_starts_keeps_token_authentication(tmp_path):
    """Ray's GCS and raylet listen on every interface: a private cluster must not run
    without authentication (RAY_AUTH_MODE=disabled is the one way to turn it off)."""
    script = ("from mergesearch.execution.ray_executor import connect\n"
              "connect('local', num_cpus=1)\n"
              "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
              "print('TOKEN', get_authentication_mode() == AuthenticationMode.TOKEN)\n"
              "import ray; ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # its token file goes here
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TOKEN True" in out.stdout.splitlines(), out.stdout
