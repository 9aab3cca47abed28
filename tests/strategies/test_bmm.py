"""The ``bmm`` strategy (GP-BO over the inner merge's hyperparameters): options reach
Optuna's GPSampler, several objectives are scalarised, and a search over BMM's space on
the zoo (activation Grams on a CalibratingWorker) killed mid-run resumes into exactly
the search an uninterrupted run makes."""

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

import mergesearch.merging.bmm  # noqa: F401  (registers the methods until __init__ does)
from mergesearch.strategies import Dimension, Objective, Problem, create_strategy
from mergesearch.strategies.bmm import BMM
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[2]


def test_options_reach_the_gp_sampler_and_objectives_are_scalarised() -> None:
    problem = Problem((Dimension("x", -1.0, 1.0, 0.0), Dimension("y", -1.0, 1.0, 0.0)),
                      (Objective("a", "maximize", 3.0), Objective("b", "minimize", 1.0)))
    s = create_strategy("bmm", problem, {"n_startup_trials": 3}, seed=2)
    assert isinstance(s, BMM) and not s.multi_objective
    sampler = s.study.sampler
    assert isinstance(sampler, optuna.samplers.GPSampler) and sampler._n_startup_trials == 3
    for _ in range(5):
        (c,) = s.ask(1)
        x, y = c.genome
        s.tell([Result(c.id, {"a": -(x - 0.5) ** 2, "b": (y + 0.5) ** 2})])
    done = s.study.trials
    assert len(done) == 5 and done[0].params == {"x": 0.0, "y": 0.0}  # the init point first
    # one minimised value: the weighted sum of losses
    x, y = done[1].params["x"], done[1].params["y"]
    assert done[1].value == pytest.approx((3 * (x - 0.5) ** 2 + (y + 0.5) ** 2) / 4)


RUN = ("import sys, mergesearch.merging.bmm, mergesearch.strategies.bmm\n"
       "from mergesearch.cli import main\n"
       "sys.exit(main(sys.argv[1:]))")


def write(folder: Path) -> Path:
    data = yaml.safe_load((ROOT / "experiments" / "zoo" / "bmm.yaml").read_text())
    data["evaluator"]["limit"] = 16
    data["budget"] = {"evaluations": 9}
    data["strategy"]["options"] = {"n_startup_trials": 3}
    data["output"] = str(folder / "run")
    data["space"] = str(ROOT / "search_spaces" / "bmm.yaml")
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_sigkill_mid_search_then_resume_continues_the_same_search(zoo, tmp_path):
    from helpers import completed_count

    from mergesearch.cli import main
    from mergesearch.storage import TrialStore

    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", RUN, "run"]
    exp = write(tmp_path)
    db = tmp_path / "run" / "study.db"
    proc = subprocess.Popen([*cmd, str(exp), "-q"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while completed_count(db) < 5:  # past the random start: the GP proposes by now
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= completed_count(db) < 9
    assert main(["run", str(exp), "-q", "--resume"]) == 0  # resumed in this process
    ok = [t for t in TrialStore.open(f"sqlite:///{db}", "zoo-bmm").trials() if t.state == "ok"]
    assert sorted(t.candidate_id for t in ok) == list(range(9))

    other = tmp_path / "whole"
    other.mkdir()
    assert main(["run", str(write(other)), "-q"]) == 0
    whole = TrialStore.open(f"sqlite:///{other / 'run' / 'study.db'}", "zoo-bmm").trials()
    assert {t.candidate_id: t.params for t in ok} == \
        {t.candidate_id: t.params for t in whole if t.state == "ok"}
    assert {t.candidate_id: t.values for t in ok} == \
        {t.candidate_id: t.values for t in whole if t.state == "ok"}
