"""`mergesearch run/status/pareto/export` as a user runs them: real processes, real kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import completed_count

from mergesearch.cli import main
from mergesearch.recipe import Recipe
from mergesearch.storage import TrialStore

ROOT = Path(__file__).resolve().parents[1]


def write_experiment(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "experiments" / "toy.yaml").read_text())
    data["evaluator"]["limit"] = 16
    data["budget"] = {"evaluations": 8}
    data["output"] = str(tmp_path / "run")
    data.update(changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_sigkill_mid_search_then_resume_records_the_budget_exactly(zoo, tmp_path):
    exp = write_experiment(tmp_path, strategy={"name": "random"}, budget={"evaluations": 14})
    db = tmp_path / "run" / "study.db"
    cmd = [sys.executable, "-m", "mergesearch.cli", "run", str(exp), "-q"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while completed_count(db) < 5:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the search made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = completed_count(db)
    assert 5 <= killed_at < 14
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    store = TrialStore.open(f"sqlite:///{db}", "toy")
    trials = store.trials()
    ok = [t for t in trials if t.state == "ok"]
    assert len(ok) == 14
    assert sorted(t.candidate_id for t in ok) == list(range(14))  # none twice, none lost
    assert len({tuple(t.params.values()) for t in ok}) == 14
    assert len(trials) == 14  # the interrupted candidate left no failed or running trial
    assert "Pareto front" in done.stdout


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_run_status_pareto_export_in_process(zoo, tmp_path, capsys):
    exp = write_experiment(tmp_path, budget={"evaluations": 5}, strategy={"name": "random"})
    assert main(["run", str(exp), "-q", "--set", "evaluator.limit=8"]) == 0
    out = capsys.readouterr().out
    assert "5 trials (5 ok, 0 failed" in out and "Pareto front" in out
    front_dir = tmp_path / "run" / "front"
    exported = sorted(front_dir.iterdir())
    assert exported and (exported[0] / "recipe.json").exists()
    assert (exported[0] / "mergekit.yml").exists()

    assert main(["status", str(exp), "--set", "evaluator.limit=8"]) == 0
    out = capsys.readouterr().out
    assert "5 ok, 0 failed, 0 in flight (budget 5)" in out and "best rev (maximize)" in out

    assert main(["pareto", str(exp)]) == 0
    table = capsys.readouterr().out
    assert "rev" in table and "evn" in table

    store = TrialStore.open(f"sqlite:///{tmp_path / 'run' / 'study.db'}", "toy")
    front = store.pareto_front()
    best_rev = max(front, key=lambda t: t.values["rev"])
    out_dir = tmp_path / "export"
    assert main(["export", str(exp), "--weights", "rev=1", "--out", str(out_dir),
                 "--checkpoint"]) == 0
    assert f"trial {best_rev.number} " in capsys.readouterr().out
    assert Recipe.load(out_dir / "recipe.json") == Recipe.from_dict(best_rev.recipe)
    assert json.loads((out_dir / "scores.json").read_text())["trial"] == best_rev.number
    assert (out_dir / "model" / "config.json").exists()
    assert main(["export", str(exp), "--trial", "99", "--out", str(out_dir)]) == 2
    assert "trial 99" in capsys.readouterr().err
    assert main(["export", str(exp), "--weights", "nope=1", "--out", str(out_dir)]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_overrides_and_study_names_keep_sweeps_apart(zoo, tmp_path, capsys):
    exp = write_experiment(tmp_path, budget={"evaluations": 2}, strategy={"name": "random"})
    for seed in (1, 2):
        assert main(["run", str(exp), "-q", "--study", f"s{seed}", "--set", f"seed={seed}"]) == 0
    url = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    a, b = (TrialStore.open(url, f"s{s}").trials() for s in (1, 2))
    assert len(a) == len(b) == 2 and a[1].params != b[1].params
    # the same study with another seed is a different search: refused, nothing changed
    assert main(["run", str(exp), "-q", "--study", "s1", "--set", "seed=2"]) == 2
    assert "different seed" in capsys.readouterr().err
    assert main(["run", str(exp), "-q", "--study", "s9", "--resume"]) == 2
    assert "no study 's9'" in capsys.readouterr().err
    assert main(["run", str(exp), "-q", "--study", "s1", "--set", "seed=2", "--overwrite"]) == 0


BAD = {
    "malformed YAML": ("name: [unclosed", "not valid YAML"),
    "unknown key": ({"budgett": {"evaluations": 3}}, "budgett: unknown key"),
    "unknown nested key": ({"strategy": {"name": "random", "optionz": {}}},
                           "strategy.optionz: unknown key"),
    "unknown strategy": ({"strategy": {"name": "simulated-annealing"}},
                         "unknown strategy 'simulated-annealing'"),
    "bad strategy option": ({"strategy": {"name": "cmaes", "options": {"sigma": 1}}},
                            "sigma"),
    "objective metric": ({"evaluator": {"suite": "evaluators/zoo", "objectives": [
        {"name": "x", "metric": "bleu"}]}}, "bleu"),
    "objective task": ({"evaluator": {"suite": "evaluators/zoo", "objectives": [
        {"name": "x", "metric": "char_accuracy", "tasks": ["zoo_add"]}]}}, "zoo_add"),
    "missing model": ({"models": {"base": "zoo:base", "sources": {"a": "./no/such/model"}}},
                      "./no/such/model"),
    "missing zoo model": ({"models": {"base": "zoo:base", "sources": {"a": "zoo:add"}}},
                          "no model 'add'"),
    "budget 0": ({"budget": {"evaluations": 0}}, "budget.evaluations"),
    "no budget": ({"budget": {}}, "set evaluations, wall_time and/or cost"),
    "missing space": ({"space": "search_spaces/nope.yaml"}, "nope.yaml"),
    "bad storage URL": ({"storage": "nonsense://db"}, "cannot open storage 'nonsense://db'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_experiments_exit_2_with_one_line_and_write_nothing(zoo, tmp_path, capsys, case):
    change, message = BAD[case]
    if isinstance(change, str):
        path = tmp_path / "exp.yaml"
        path.write_text(change)
    else:
        path = write_experiment(tmp_path, **change)
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_bad_override_and_missing_file(tmp_path, capsys):
    exp = write_experiment(tmp_path)
    assert main(["run", str(exp), "--set", "budget"]) == 2
    assert "expected dotted.key=value" in capsys.readouterr().err
    assert main(["run", str(exp), "--set", "name.x=1"]) == 2
    assert "name is not a mapping" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["status", str(exp)]) == 2
    assert "no study 'toy'" in capsys.readouterr().err


def test_strategies_lists_each_with_its_kind(capsys):
    from mergesearch.strategies import strategies

    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name, cls in strategies().items():
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        assert ("multi-objective" in line) == cls.multi_objective
        assert cls.description in line


def test_every_shipped_experiment_and_sweep_is_valid():
    from mergesearch.experiment import Experiment
    from mergesearch.sweep import plan_sweep

    files = sorted((ROOT / "experiments").rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        if "grid" in yaml.safe_load(path.read_text()):
            planned, _ = plan_sweep([path])
            assert planned, path
        else:
            exp = Experiment.load(path)
            spaces = [exp.space] if exp.stages is None else \
                [st.space or exp.space for st in exp.stages]
            assert all(isinstance(s, dict) or exp.find(s) is not None for s in spaces), path
            if exp.evaluator.backend == "hf":
                assert exp.find(exp.evaluator.suite) is not None, path


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_status_pareto_and_listing_start_without_torch(zoo, tmp_path):
    """Reading a study must not pay for torch, transformers or pycma (seconds): checked in
    a fresh interpreter, on a real study. (Printing recipes, ``pareto --recipes``, needs
    the merge-method registry, hence torch.)"""
    exp = write_experiment(tmp_path, budget={"evaluations": 2})
    assert main(["run", str(exp), "-q"]) == 0
    code = ("import sys; from mergesearch.cli import main\n"
            f"for argv in (['status', {str(exp)!r}], ['pareto', {str(exp)!r}],"
            " ['strategies'], ['status', 'no-such.yaml']):\n"
            "    print(main(argv))\n"
            "heavy = ('torch', 'transformers', 'cma', 'pandas')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "trials: 2 ok, 0 failed, 0 in flight" in out.stdout and "trial 0:" in out.stdout
    assert [line for line in lines if line in ("0", "2")] == ["0", "0", "0", "2"]
    assert lines[-1] == "['pandas']"  # the front's table; nothing heavier
