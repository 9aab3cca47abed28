"""`mergesearch compare`: best-at-budget, hypervolume, trials-to-target and seed groups,
checked against numbers computed here from Optuna's trials and pymoo directly."""

from __future__ import annotations

import csv
import json
import math
import os
import select
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from pymoo.indicators.hv import HV

from mergesearch.cli import main
from mergesearch.report.compare import Run, compare, format_comparison, load_curves
from mergesearch.storage import TrialStore
from mergesearch.strategies.base import Objective

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = [{"name": "accuracy", "metric": "accuracy"},
              {"name": "l2", "source": "weights", "metric": "delta_l2", "direction": "minimize"}]
# name -> (strategy, seed, trials); the last runs in this process, the others as processes
STUDIES = {
    "rand0": ({"name": "random", "options": {}}, 0, 12),
    "tpe0": ({"name": "tpe", "options": {"n_startup_trials": 4}}, 0, 10),
    "nsga0": ({"name": "nsga2", "options": {"population_size": 4}}, 0, 14),
    "rand1": ({"name": "random", "options": {}}, 1, 12),
}
BUDGETS = [5, 10, 12]
TARGET = 0.7  # accuracy


def experiment(tmp: Path, url: str, name: str) -> Path:
    strategy, seed, n = STUDIES[name]
    data = yaml.safe_load((ROOT / "experiments" / "digits" / "task_arithmetic.yaml").read_text())
    data |= {"name": name, "strategy": strategy, "seed": seed, "budget": {"evaluations": n},
             "output": str(tmp / f"run-{name}"), "storage": url}
    data["evaluator"]["objectives"] = OBJECTIVES
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def searches(tmp_path_factory):
    """Four digits searches in one SQLite file, written at once: three by `mergesearch run`
    processes (random, tpe, nsga2), one (random, another seed) by this process."""
    from mergesearch.controller import run
    from mergesearch.experiment import Experiment
    from mergesearch.zoo import digits

    tmp = tmp_path_factory.mktemp("compare")
    url = f"sqlite:///{(tmp / 'searches.db').as_posix()}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERGESEARCH_DIGITS", str(tmp / "digits"))
        digits.build_digits()
        paths = {name: experiment(tmp, url, name) for name in STUDIES}
        procs = [subprocess.Popen([sys.executable, "-m", "mergesearch", "run", str(paths[n]),
                                   "-q"], cwd=tmp, env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for n in ("rand0", "tpe0", "nsga0")]
        run(Experiment.load(paths["rand1"]), progress=False)  # while they run
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out
        yield {"tmp": tmp, "url": url, "paths": paths}


def by_hand(url: str) -> dict[str, list[tuple[bool, float | None, float | None]]]:
    """Each study's trials in number order as (complete, accuracy, l2), read with Optuna."""
    out = {}
    for name in optuna.get_all_study_names(url):
        study = optuna.load_study(study_name=name, storage=url)
        assert study.metric_names == ["accuracy", "l2"]
        rows = []
        for t in sorted(study.trials, key=lambda t: t.number):
            done = t.state == optuna.trial.TrialState.COMPLETE
            rows.append((done, *(t.values if done else (None, None))))
        out[name] = rows
    return out


def hand_ref(trials: dict) -> tuple[float, float]:
    acc = [a for rows in trials.values() for ok, a, _ in rows if ok]
    l2 = [v for rows in trials.values() for ok, _, v in rows if ok]
    return (min(acc) - 0.1 * (max(acc) - min(acc)), max(l2) + 0.1 * (max(l2) - min(l2)))


def hand_best(rows, b: int) -> tuple[float, float, float]:
    """Best accuracy, best l2, and pymoo's hypervolume of the first b trials."""
    first = [(a, v) for ok, a, v in rows[:b] if ok]
    return max(a for a, _ in first), min(v for _, v in first), first


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_compare_equals_numbers_computed_from_optuna_and_pymoo(searches):
    url, out = searches["url"], searches["tmp"] / "cmp.json"
    done = subprocess.run([sys.executable, "-m", "mergesearch", "compare", url, "--budgets",
                           ",".join(map(str, BUDGETS)), "--target", f"accuracy={TARGET}",
                           "--json", str(out), "--csv", str(searches["tmp"] / "cmp.csv")],
                          cwd=searches["tmp"], env=env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(out.read_text())
    trials = by_hand(url)
    assert {n: len(r) for n, r in trials.items()} == {n: s[2] for n, s in STUDIES.items()}
    assert got["objectives"] == [{"name": "accuracy", "direction": "maximize"},
                                 {"name": "l2", "direction": "minimize"}]
    assert "objectives: accuracy (maximize), l2 (minimize)" in done.stdout

    ref_acc, ref_l2 = hand_ref(trials)
    assert got["ref_point"] == pytest.approx({"accuracy": ref_acc, "l2": ref_l2}, rel=1e-12)
    printed = got["ref_point"]
    assert (f"reference point: accuracy={printed['accuracy']:.6g}, l2={printed['l2']:.6g}"
            in done.stdout)
    hv = HV(ref_point=np.array([-printed["accuracy"], printed["l2"]]))

    studies = {s["name"]: s for s in got["studies"]}
    assert set(studies) == set(STUDIES)
    assert studies["rand0"]["strategy"] == "random"
    assert studies["tpe0"]["strategy"] == "tpe{n_startup_trials: 4}"
    assert studies["nsga0"]["strategy"] == "nsga2{population_size: 4}"
    for name, rows in trials.items():
        s = studies[name]
        assert (s["seed"], s["trials"], s["failed"]) == (STUDIES[name][1], len(rows), 0)
        for b in BUDGETS:
            acc, l2, points = hand_best(rows, b)
            assert s["best"][str(b)] == {"accuracy": acc, "l2": l2}
            expected = hv(np.array([[-a, v] for a, v in points]))
            assert expected > 0
            assert s["hypervolume"][str(b)] == pytest.approx(expected, rel=1e-12)
            assert s["short"][str(b)] is (len(rows) < b)
        first = next((i for i, (ok, a, _) in enumerate(rows, 1) if ok and a >= TARGET), None)
        assert s["reached"] == {"accuracy": first}
    # tpe ran 10 trials: at 12 it reports its last value, marked
    assert studies["tpe0"]["short"]["12"] and studies["tpe0"]["best"]["12"] == \
        studies["tpe0"]["best"]["10"]
    lines = done.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("tpe0 "))
    assert [line.split()[0] for line in lines[row:row + 3]] == ["tpe0", "10", "12*"]
    # the hypervolume can only grow with the budget
    for s in studies.values():
        hvs = [s["hypervolume"][str(b)] for b in BUDGETS]
        assert hvs == sorted(hvs)

    # the API, reading the same storage through an experiment file, a .db path and URL#name
    paths = searches["paths"]
    api = load_curves([str(paths["rand0"]), str(searches["tmp"] / "searches.db"),
                       f"{url}#tpe0"], BUDGETS, {"accuracy": TARGET})
    assert [c.name for c in api.curves] == ["rand0", "nsga0", "rand1", "tpe0"]  # each once
    assert api.ref_point == got["ref_point"]
    for c in api.curves:
        s = studies[c.name]
        assert {str(b): v for b, v in c.best.items()} == s["best"]
        assert {str(b): v for b, v in c.hypervolume.items()} == s["hypervolume"]
        assert c.reached == s["reached"]
    with open(searches["tmp"] / "cmp.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * len(BUDGETS) + 3 * len(BUDGETS)  # studies, then groups
    row = next(r for r in rows if (r["kind"], r["study"], r["budget"]) == ("study", "tpe0", "12"))
    assert (float(row["accuracy"]), float(row["l2"]), float(row["hypervolume"])) == (
        studies["tpe0"]["best"]["12"]["accuracy"], studies["tpe0"]["best"]["12"]["l2"],
        studies["tpe0"]["hypervolume"]["12"])
    assert (row["short"], row["reach_accuracy"]) == (
        "True", "" if studies["tpe0"]["reached"]["accuracy"] is None
        else str(studies["tpe0"]["reached"]["accuracy"]))
    row = next(r for r in rows if (r["kind"], r["strategy"], r["budget"]) == ("group", "random",
                                                                                "10"))
    accs = [studies[n]["best"]["10"]["accuracy"] for n in ("rand0", "rand1")]
    assert (row["study"], float(row["accuracy"]), float(row["accuracy_std"])) == (
        "rand0;rand1", statistics.mean(accs), statistics.stdev(accs))


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_seeds_of_one_strategy_give_mean_and_sample_std(searches):
    trials = by_hand(searches["url"])
    c = load_curves([searches["url"]], BUDGETS)
    assert list(c.groups) == ["nsga2{population_size: 4}", "random", "tpe{n_startup_trials: 4}"]
    group = c.groups["random"]
    assert (group.studies, group.seeds) == (["rand0", "rand1"], [0, 1])
    ref = c.ref_point
    hv = HV(ref_point=np.array([-ref["accuracy"], ref["l2"]]))
    for b in BUDGETS:
        accs, l2s, hvs = [], [], []
        for name in ("rand0", "rand1"):
            acc, l2, points = hand_best(trials[name], b)
            accs.append(acc)
            l2s.append(l2)
            hvs.append(hv(np.array([[-a, v] for a, v in points])))
        stat = group.best[b]["accuracy"]
        assert (stat.mean, stat.std, stat.n) == (statistics.mean(accs), statistics.stdev(accs), 2)
        stat = group.best[b]["l2"]
        assert (stat.mean, stat.std) == (statistics.mean(l2s), statistics.stdev(l2s))
        assert group.hypervolume[b].mean == pytest.approx(statistics.mean(hvs), rel=1e-12)
        assert group.hypervolume[b].std == pytest.approx(statistics.stdev(hvs), rel=1e-9)
    assert statistics.stdev(l2s) > 0  # two seeds that really differ
    single = c.groups["tpe{n_startup_trials: 4}"].best[10]["accuracy"]
    assert single.std is None and single.n == 1
    text = format_comparison(c)
    m, s = group.best[12]["accuracy"].mean, group.best[12]["accuracy"].std
    assert f"{m:.4f} ± {s:.4f}" in text and "mean ± std" in text


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_a_study_held_by_a_live_writer_is_compared_without_touching_it(searches):
    url = searches["url"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mergesearch.storage import TrialStore\n"
         "TrialStore.open(sys.argv[1], 'nsga0').take_lease()\nprint('held', flush=True)\n"
         "time.sleep(120)", url], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 60)
        assert ready and holder.stdout.readline().strip() == "held"
        assert TrialStore.open(url, "nsga0").lease_holder()["pid"] == holder.pid
        before = optuna.get_all_study_names(url)
        assert main(["compare", f"{url}#nsga0", "--budgets", "14"]) == 0
        c = load_curves([f"{url}#nsga0"], [14])
        acc, l2, _ = hand_best(by_hand(url)["nsga0"], 14)
        assert c.curves[0].best[14] == {"accuracy": acc, "l2": l2}
        # still the writer's lease; no study (no probe study) created by reading
        assert TrialStore.open(url, "nsga0").lease_holder()["pid"] == holder.pid
        assert optuna.get_all_study_names(url) == before
        assert not any(n.endswith(".probes") for n in before)
    finally:
        holder.kill()
        holder.wait()


def _no_tables(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("create table notes (x)")
    con.commit()
    con.close()


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
@pytest.mark.parametrize("spec, says", [
    ("missing.yaml", "experiment file missing.yaml does not exist"),
    ("missing.db", "missing.db: no such SQLite file"),
    ("{url}#nope", "no study 'nope' in"),
    ("{exp}#nope", "no study 'nope' in"),
    ("sqlite:///{tmp}/absent.db", "the file does not exist"),
    ("{tmp}/plain.db", "holds no Optuna studies"),
])
def test_a_bad_study_argument_is_one_line_and_exit_2(searches, tmp_path, capsys, monkeypatch,
                                                      spec, says):
    monkeypatch.chdir(tmp_path)
    _no_tables(tmp_path / "plain.db")
    spec = spec.format(url=searches["url"], exp=searches["paths"]["rand0"], tmp=tmp_path)
    assert main(["compare", spec]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and says in err
    assert not (tmp_path / "absent.db").exists() and not (tmp_path / "missing.db").exists()
    tables = sqlite3.connect(tmp_path / "plain.db").execute(
        "select name from sqlite_master where type='table'").fetchall()
    assert tables == [("notes",)]  # nothing created in a file that is not a storage


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
@pytest.mark.parametrize("args, says", [
    (["--budgets", "0,10"], "--budgets '0,10'"),
    (["--budgets", "ten"], "--budgets 'ten'"),
    (["--target", "accuracy"], "--target 'accuracy'"),
    (["--target", "size=3"], "unknown objective(s) size"),
])
def test_bad_budgets_and_targets_are_refused(searches, capsys, args, says):
    assert main(["compare", f"{searches['url']}#rand0", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_studies_of_other_objectives_are_refused(searches, tmp_path, capsys):
    url = f"sqlite:///{(tmp_path / 'other.db').as_posix()}"
    TrialStore.create(url, "one", [Objective("accuracy")], [], {"strategy": {"name": "x"}})
    assert main(["compare", f"{searches['url']}#rand0", f"{url}#one"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compare studies of the same objectives" in err


def test_budgets_count_failed_trials_and_skip_partial_and_running_ones():
    objectives = [Objective("acc"), Objective("size", "minimize")]
    a = Run("a", [(3, "partial", {"acc": 0.9, "size": 1.0}),  # fidelity < 1: no value
                  (0, "ok", {"acc": 0.5, "size": 3.0}),
                  (1, "failed", {}),
                  (5, "running", {}),  # not finished: left out
                  (2, "ok", {"acc": 0.7, "size": 4.0})], strategy="x", seed=0)
    b = Run("b", [(0, "ok", {"acc": 0.6, "size": 2.0})], strategy="x", seed=1)
    c = compare([a, b], objectives, [1, 2, 3, 5], targets=0.7)
    # worst acc 0.5 (range 0.2), worst size 4 (range 2), each pushed out by 10%
    assert c.ref_point == pytest.approx({"acc": 0.48, "size": 4.2})
    ca, cb = c.curves
    assert (ca.trials, ca.failed, cb.trials) == (4, 1, 1)
    assert ca.best == {1: {"acc": 0.5, "size": 3.0}, 2: {"acc": 0.5, "size": 3.0},
                       3: {"acc": 0.7, "size": 3.0}, 5: {"acc": 0.7, "size": 3.0}}
    assert ca.short == {1: False, 2: False, 3: False, 5: True}
    # two boxes, (0.02 x 1.2) and (0.22 x 0.2), overlapping in (0.02 x 0.2)
    assert ca.hypervolume[2] == pytest.approx(0.02 * 1.2)
    assert ca.hypervolume[3] == pytest.approx(0.024 + 0.044 - 0.004)
    assert cb.hypervolume[1] == pytest.approx(0.12 * 2.2) and cb.short[2]
    assert (ca.reached, cb.reached) == ({"acc": 3}, {"acc": None})
    g = c.groups["x"]
    assert g.best[1]["acc"].mean == pytest.approx(0.55)
    assert g.best[1]["acc"].std == pytest.approx(math.sqrt(2 * 0.05 ** 2))
    assert (g.reached["acc"].mean, g.reached["acc"].n) == (3, 1)
    assert c.budgets == [1, 2, 3, 5]
    assert compare([a, b], objectives).budgets == [4]  # default: the largest trial count
    assert compare([Run("n", [(i, "ok", {"acc": 0.5, "size": 1.0}) for i in range(60)])],
                   objectives).budgets == [25, 50, 60]
    same = compare([b], objectives)  # one point: a range of 0 moves the point a little
    assert same.ref_point["acc"] < 0.6 and same.ref_point["size"] > 2.0
    assert same.curves[0].hypervolume[1] > 0
