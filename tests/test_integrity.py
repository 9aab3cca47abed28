"""The durable loop's guarantees under the ways a careful user finds to break them.

One writer per study, resumes that cannot attach results to other genomes, nothing told
that is not written (Ctrl-C included), proposals checked before they are evaluated,
score-changing settings refused on resume, fronts of distinct recipes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from contract_strategies import Repeat
from helpers import completed_count, zoo_experiment

from mergesearch import fingerprint
from mergesearch.controller import BoundExperiment, SearchLoop, run
from mergesearch.execution.local import LocalExecutor
from mergesearch.experiment import Experiment
from mergesearch.storage import StorageError, TrialStore
from mergesearch.strategies import Objective, Problem, Strategy
from mergesearch.strategies.base import Dimension, ReplayError, StrategyError
from mergesearch.strategies.random_search import RandomSearch

ROOT = Path(__file__).resolve().parents[1]


def ids(exp: Experiment, study: str = "t") -> list[int]:
    return sorted(t.candidate_id for t in TrialStore.open(exp.storage_url, study).trials())


def write(tmp_path: Path, exp: Experiment) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "mergesearch.cli", *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


# -- one writer per study -----------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_on_a_study_being_written_is_refused_and_a_dead_ones_is_taken_over(
        zoo, tmp_path, capsys, caplog):
    # The first run's budget is never reached, so it still holds its lease when it is killed,
    # however fast the machine; the third run resumes to a budget set from what it left.
    # The first is another process; the second and third run in this one.
    from mergesearch.cli import main

    exp = zoo_experiment(tmp_path, budget={"evaluations": 100_000}, evaluator__limit=48)
    path = write(tmp_path, exp)
    db = Path(exp.storage_url.removeprefix("sqlite:///"))
    first = cli("run", path, "-q")
    deadline = time.monotonic() + 240
    while completed_count(db) < 1:
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    capsys.readouterr()
    assert main(["run", str(path), "--resume", "-q"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "is being written by another search" in lines[0]
    assert f"pid {first.pid}" in lines[0]
    assert first.poll() is None, "the refused run must not have disturbed the first"
    first.send_signal(signal.SIGKILL)  # its lease stays behind, held by a dead process
    first.wait()
    budget = completed_count(db) + 4
    caplog.set_level("INFO", logger="mergesearch")
    assert main(["-v", "run", str(path), "--resume", "-q", "--set",
                 f"budget.evaluations={budget}"]) == 0
    assert "took over the lease" in caplog.text and "its process is gone" in caplog.text
    assert ids(exp) == list(range(budget))  # exactly the budget, nothing twice
    assert TrialStore.open(exp.storage_url, "t").lease_holder() is None  # released


def test_the_lease_refuses_a_live_holder_and_readers_are_never_blocked(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    dims = [Dimension("x", 0.0, 1.0, 0.5)]
    TrialStore.create(url, "s", [Objective("y")], dims, {"name": "s"})
    one, two = TrialStore.open(url, "s", dims), TrialStore.open(url, "s", dims)
    one.take_lease()
    with pytest.raises(StorageError, match=rf"being written by another search: host \S+, "
                       rf"pid {os.getpid()} since"):
        two.take_lease()
    reader = TrialStore.open(url, "s")
    assert reader.lease_holder()["pid"] == os.getpid() and reader.trials() == []
    one.release_lease()
    two.take_lease()  # free again
    two.release_lease()


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops_writing(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    dims = [Dimension("x", 0.0, 1.0, 0.5)]
    TrialStore.create(url, "s", [Objective("y")], dims, {"name": "s"})
    old, new = TrialStore.open(url, "s", dims), TrialStore.open(url, "s", dims)
    lease = old.take_lease(ttl=0.2)
    lease._stop.set()  # a holder that hangs: no more heartbeats
    time.sleep(0.3)
    new.take_lease()
    assert "heartbeat is" in caplog.text and "took over the lease" in caplog.text
    lease.renew()  # the old holder's next heartbeat finds the lease gone
    with pytest.raises(StorageError, match="lost its lease"):
        old.save_state({"log": []})
    new.release_lease()


# -- resumes cannot mis-attribute ---------------------------------------------------------

def test_a_space_file_edited_between_kill_and_resume_is_refused(zoo, tmp_path):
    space = tmp_path / "space.yaml"
    text = (ROOT / "search_spaces/task_arithmetic.yaml").read_text()
    space.write_text(text)
    exp = zoo_experiment(tmp_path, space=str(space), strategy={"name": "cmaes"},
                         budget={"evaluations": 2})
    run(exp, progress=False)
    space.write_text(text.replace("bounds: [0.0, 1.0]", "bounds: [0.0, 2.0]"))
    assert "bounds: [0.0, 2.0]" in space.read_text()
    before = ids(exp)
    with pytest.raises(StorageError, match=r"was run with a different space"):
        run(zoo_experiment(tmp_path, space=str(space), strategy={"name": "cmaes"},
                           budget={"evaluations": 4}), progress=False)
    assert ids(exp) == before


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
@pytest.mark.parametrize("change, named", [
    ({"execution": {"dtype": "bfloat16"}}, r"execution.dtype \(float32 -> bfloat16\)"),
    ({"evaluator__limit": 8}, "evaluator"),
])
def test_settings_that_change_scores_are_refused_on_resume(zoo, tmp_path, change, named):
    exp = zoo_experiment(tmp_path, budget={"evaluations": 2})
    run(exp, progress=False)
    with pytest.raises(StorageError, match=named):
        run(zoo_experiment(tmp_path, budget={"evaluations": 3}, **change), progress=False)
    assert ids(exp) == [0, 1]
    # budget and Ray settings that leave scores alone still resume
    assert run(zoo_experiment(tmp_path, budget={"evaluations": 3}),
               progress=False).finished == 3


def test_a_library_upgrade_under_the_strategy_is_named(zoo, tmp_path, monkeypatch):
    exp = zoo_experiment(tmp_path, strategy={"name": "tpe"}, budget={"evaluations": 2})
    run(exp, progress=False)
    real = fingerprint._version
    monkeypatch.setattr(fingerprint, "_version",
                        lambda lib: "99.0" if lib == "optuna" else real(lib))
    with pytest.raises(StorageError, match=rf"library optuna {optuna.__version__} -> 99.0"):
        run(exp, progress=False)


def test_a_replay_that_proposes_other_genomes_is_refused():
    objectives = (Objective("y"),)
    before = RandomSearch(Problem((Dimension("x", 0.0, 1.0, 0.5),), objectives), seed=0)
    before.ask(3)
    state = before.state_dict()
    assert all(len(event[2]) == 3 for event in state["log"] if event[0] == "ask")
    widened = RandomSearch(Problem((Dimension("x", 0.0, 2.0, 0.5),), objectives), seed=0)
    with pytest.raises(ReplayError, match=r"different candidate 1 .*genome hash"):
        widened.load_state_dict(state)
    same = RandomSearch(Problem((Dimension("x", 0.0, 1.0, 0.5),), objectives), seed=0)
    same.load_state_dict(state)  # the same problem replays
    assert [c.genome for c in same.pending] == [c.genome for c in before.pending]


def test_states_logged_before_genome_hashes_still_replay():
    problem = Problem((Dimension("x", 0.0, 1.0, 0.5),), (Objective("y"),))
    before = RandomSearch(problem, seed=0)
    before.ask(2)
    state = before.state_dict()
    state["log"] = [event[:2] for event in state["log"]]  # the old ["ask", n] events
    again = RandomSearch(problem, seed=0)
    again.load_state_dict(state)
    assert [c.genome for c in again.pending] == [c.genome for c in before.pending]


# -- nothing told that is not written -----------------------------------------------------

class _TwoAtOnce(LocalExecutor):
    """Hands results back two at a time, as a Ray wait often does."""

    slots = 2

    def wait(self):
        out = [self.worker.evaluate(c) for c in self._queue]
        self._queue.clear()
        return out


def test_ctrl_c_while_two_results_are_in_hand_loses_neither(zoo, tmp_path, monkeypatch):
    exp = zoo_experiment(tmp_path, budget={"evaluations": 6})
    original = RandomSearch._tell
    sent = []

    def interrupted_tell(self, told):
        original(self, told)
        if any(c.id == 1 for c, _ in told) and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # the real signal, in the middle of a tell
            for _ in range(1000):  # Python runs the handler at the next bytecodes
                pass

    monkeypatch.setattr(RandomSearch, "_tell", interrupted_tell)
    search = BoundExperiment(exp, progress=False)
    from mergesearch.execution import make_worker

    executor = _TwoAtOnce(make_worker(search.worker_spec))
    store = search.open_store(resume=None, overwrite=False)
    with pytest.raises(KeyboardInterrupt):
        SearchLoop(search, store, executor, False, None).run()
    assert sent
    assert ids(exp) == [0, 1]  # both results of that wait were written
    monkeypatch.setattr(RandomSearch, "_tell", original)
    summary = run(exp, progress=False)
    assert summary.finished == 6 and ids(exp) == list(range(6))


class _OutOfBounds(Strategy):
    """Proposes the start point, then once a genome a hair above its upper bound."""

    name = "out-of-bounds-for-test"
    description = "test only"
    multi_objective = True

    def _setup(self):
        self._i = 0

    def _ask(self, n):
        out = []
        for _ in range(n):
            genome = self.problem.x0 * (1 - 0.1 * self._i)
            if self._i == 2:
                genome[0] = self.problem.dims[0].high + 1e-9
            self._i += 1
            out.append((genome, 1.0))
        return out

    def _tell(self, told):
        pass


def test_a_genome_just_outside_its_bounds_is_refused_at_ask_before_any_evaluation(
        zoo, tmp_path, monkeypatch):
    from mergesearch.execution.worker import Worker

    evaluated = []
    original = Worker.evaluate
    monkeypatch.setattr(Worker, "evaluate",
                        lambda self, c: evaluated.append(c.id) or original(self, c))
    exp = zoo_experiment(tmp_path)
    search = BoundExperiment(exp, progress=False)
    search.strategy = _OutOfBounds(search.problem)
    store = search.open_store(resume=None, overwrite=False)
    with pytest.raises(StrategyError, match=r"proposed weight\[rev\] = 1.000000001 for "
                       r"candidate 2, outside \[0.0, 1.0\] \(a strategy bug"):
        SearchLoop(search, store, search.make_executor(), False, None).run()
    assert evaluated == [0, 1] and ids(exp) == [0, 1]  # what was evaluated is recorded


def test_a_trial_storage_refuses_is_kept_as_a_failed_trial(tmp_path):
    from mergesearch.trial import Candidate, Result

    url = f"sqlite:///{tmp_path / 'study.db'}"
    dims = [Dimension("x", 0.0, 1.0, 0.5)]
    store = TrialStore.create(url, "s", [Objective("y")], dims, {"name": "s"})
    store.add(Candidate(0, [1.5]), Result(0, values={"y": 0.7}))  # outside its distribution
    (trial,) = store.trials()
    assert trial.state == "failed" and "storage refused the trial" in trial.reason
    raw = store.study.trials[0].user_attrs
    assert raw["genome"] == [1.5] and raw["values"] == {"y": 0.7}


def test_a_failed_checkpoint_write_leaves_no_gap(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    dims = [Dimension("x", 0.0, 1.0, 0.5)]
    store = TrialStore.create(url, "s", [Objective("y")], dims, {"name": "s"})
    store.save_state({"seed": 0, "log": [1]})
    storage = store._storage
    original = storage.set_study_system_attr
    calls = []

    def failing_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("database went away")
        return original(*args)

    monkeypatch.setattr(storage, "set_study_system_attr", failing_once)
    with pytest.raises(RuntimeError):
        store.save_state({"seed": 0, "log": [1, 2]})
    store.save_state({"seed": 0, "log": [1, 2, 3]})  # the caller survived and goes on
    assert TrialStore.open(url, "s").load_state() == {"seed": 0, "log": [1, 2, 3]}


# -- fronts, logging ----------------------------------------------------------------------

def test_a_front_holds_distinct_recipes(zoo, tmp_path):
    exp = zoo_experiment(tmp_path)
    search = BoundExperiment(exp, progress=False)
    search.strategy = Repeat(search.problem)
    store = search.open_store(resume=None, overwrite=False)
    summary = SearchLoop(search, store, search.make_executor(), False, None).run()
    assert summary.cached == 4
    recipes = [str(t.recipe) for t in summary.front]
    assert summary.front and len(recipes) == len(set(recipes))
    assert all(t.cached_from is None for t in summary.front)
    # the cached trials are still in the study, equal to their sources
    assert len(store.study.best_trials) > len(summary.front)


def test_opening_a_study_leaves_the_callers_optuna_logging_alone(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        url = f"sqlite:///{tmp_path / 'study.db'}"
        TrialStore.create(url, "s", [Objective("y")], [Dimension("x", 0.0, 1.0, 0.5)],
                          {"name": "s"})
        TrialStore.open(url, "s")
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- inputs the controller checks ---------------------------------------------------------

@pytest.mark.parametrize("device, message", [
    ("cude", r"execution.device: 'cude' is not a device"),
    ("cuda", r"execution.device: 'cuda', but torch sees no CUDA GPU"),
])
def test_an_unknown_or_missing_device_is_refused_before_models_load(tmp_path, device, message,
                                                                   monkeypatch):
    import torch

    from mergesearch.experiment import ExperimentError

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    loaded = []
    monkeypatch.setattr("mergesearch.controller.resolve_model",
                        lambda ref, exp, progress=False: loaded.append(ref) or ref)
    exp = zoo_experiment(tmp_path, execution={"device": device})
    with pytest.raises(ExperimentError, match=message):
        BoundExperiment(exp, progress=False)
    assert loaded == []


def test_a_missing_relative_model_path_is_not_tried_as_a_hub_id(tmp_path, monkeypatch):
    from mergesearch.controller import resolve_model
    from mergesearch.experiment import ExperimentError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    exp = Experiment.from_dict(zoo_experiment(tmp_path).model_dump())
    with pytest.raises(ExperimentError, match=r"'models/math' not found"):
        resolve_model("models/math", exp)
    assert resolve_model("org/model", exp) == "org/model"  # no such folder: a hub id


def test_sources_listed_in_another_order_are_another_search(zoo, tmp_path):
    """The order of the sources is the genome's layout: weight[rev] first, or weight[dup]."""
    exp = zoo_experiment(tmp_path, budget={"evaluations": 2})
    run(exp, progress=False)
    shuffled = dict(sorted(exp.models.sources.items()))
    assert list(shuffled) != list(exp.models.sources)
    with pytest.raises(StorageError, match=r"different space.dimensions"):
        run(zoo_experiment(tmp_path, budget={"evaluations": 3},
                           models={"base": "zoo:base", "sources": shuffled}), progress=False)


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_new_epoch_continues_a_changed_study_with_a_fresh_strategy(zoo, tmp_path):
    exp = zoo_experiment(tmp_path, budget={"evaluations": 2})
    run(exp, progress=False)
    changed = zoo_experiment(tmp_path, budget={"evaluations": 4},
                             execution={"dtype": "bfloat16"})
    summary = run(changed, progress=False, new_epoch=True)
    assert (summary.finished, summary.evaluated_now, summary.cached) == (4, 2, 0)
    trials = TrialStore.open(exp.storage_url, "t").trials()
    assert [(t.epoch, t.candidate_id) for t in trials] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # the fresh strategy starts where the first did, but under the new scoring nothing old
    # is served from the cache
    assert trials[2].params == trials[0].params and trials[2].cached_from is None
    again = run(changed, progress=False)  # the new epoch resumes like any search
    assert again.finished == 4 and again.evaluated_now == 0
    with pytest.raises(StorageError, match="--new-epoch"):
        run(exp, progress=False)  # the old settings now differ from the study's
