"""The strategy league (`benchmarks/strategies.py --quick`) run as a user runs it, and its
JSON table checked against the studies it wrote, read independently (with `load_curves`
and with Optuna directly)."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from mergesearch.report.compare import load_curves
from mergesearch.strategies import get_strategy, strategies

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# CI runs the quick league on the two digits testbeds (under a minute on 2 cores). The
# language-model testbeds run the same code path at minutes each: hard (the one strategies
# prove themselves on, and the one that runs frank_wolfe, which digits cannot) is checked
# the same way under `pytest -m expensive`; the zoo's league options and overrides are
# checked without running it (tests/test_league_testbeds.py).
TESTBEDS = ["digits", "digits-mo"]
SEEDS = [0, 1]
BUDGETS = [6, 12]  # --quick


def run_league(tmp: Path, testbeds: list[str]) -> dict:
    out, table = tmp / "runs.json", tmp / "table.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "strategies.py"), "--quick", "--testbeds",
         ",".join(testbeds), "--out", str(out), "--json", str(table), "--threads", "1"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads(table.read_text())
    data["stdout"] = done.stdout
    return data


@pytest.fixture(scope="module")
def league(tmp_path_factory) -> dict:
    return run_league(tmp_path_factory.mktemp("league"), TESTBEDS)


def better(direction: str) -> float:
    return 1.0 if direction == "maximize" else -1.0


def finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v)


# The studies do not change once the league has run: each is read once for all the checks
# (the wrong-table test checks five edited tables against the same studies).
@functools.cache
def optuna_trials(url: str, name: str) -> tuple[optuna.trial.FrozenTrial, ...]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return tuple(sorted(optuna.load_study(study_name=name, storage=url).trials,
                        key=lambda t: t.number))


@functools.cache
def read_curves(specs: tuple[str, ...]):
    return load_curves(list(specs), budgets=BUDGETS)


def rule(a: dict, b: dict, up: float) -> str:
    gain, spread = up * (a["mean"] - b["mean"]), a["std"] + b["std"]
    return "W" if gain > spread else "L" if gain < -spread else "="


def check_league(data: dict, testbeds: list[str] = TESTBEDS) -> None:
    """Every claim of the table that can be checked from the studies: raises AssertionError
    on the first that does not hold."""
    assert data["budgets"] == BUDGETS and data["seeds"] == SEEDS
    assert set(data["testbeds"]) == set(testbeds)
    registered = set(strategies())
    for name, bed in data["testbeds"].items():
        assert "error" not in bed, bed
        first = bed["objectives"][0]
        up = better(first["direction"])
        mo = len(bed["objectives"]) > 1
        rows = {r["strategy"]: r for r in bed["rows"]}
        # every registered strategy is a row or a skip with a reason, never silently absent
        assert set(rows) | set(bed["skipped"]) == registered and not set(rows) & set(
            bed["skipped"])
        if mo:
            assert "cmaes" in bed["skipped"] and "single-objective" in bed["skipped"]["cmaes"]
        else:
            assert {"random", "cmaes"} <= set(rows)

        # an independent reading of every study the table claims, with the same budgets
        specs = tuple(f"{s['url']}#{s['study']}" for r in bed["rows"] for s in r["studies"])
        curves = {c.name: c for c in read_curves(specs).curves}
        ref = bed["ref_point"]
        if mo:
            assert ref == read_curves(specs).ref_point
        uniform = bed["uniform"]
        for s, row in rows.items():
            assert row["seeds"] == SEEDS, (name, s)
            assert [st["seed"] for st in row["studies"]] == SEEDS, (name, s)
            for st in row["studies"]:
                c = curves[st["study"]]
                assert (c.seed, c.trials, c.failed) == (st["seed"], 12, 0), (name, st)
                trials = optuna_trials(st["url"], st["study"])
                assert len(trials) == 12
                values = [t.values[0] for t in trials]
                for b in BUDGETS:
                    v = st["best"][str(b)]
                    assert finite(v), (name, st["study"], b)
                    assert v == c.best[b][first["name"]], (name, st["study"], b)
                    # by hand from Optuna's trials, not through compare
                    assert v == max(values[:b], key=lambda x: up * x), (name, st["study"], b)
                    if mo:
                        hv = st["hypervolume"][str(b)]
                        assert finite(hv) and hv > 0 and hv == c.hypervolume[b]
                assert up * (st["best"]["12"] - st["best"]["6"]) >= 0, (name, st["study"])
                if mo:
                    assert st["hypervolume"]["12"] >= st["hypervolume"]["6"]
                # the reported trial is the study's best over the whole budget
                assert values[st["best_trial"]] == st["best"]["12"]
                assert finite(st["report"]), (name, st["study"])
                # a strategy that proposes the init point first scored the uniform merge
                options = get_strategy(s).parse_options(row["options"])
                if getattr(options, "include_init", False) and not row.get("overrides"):
                    assert values[0] == uniform["search"][first["name"]], (name, st["study"])
            # the group figures are the mean and sample std of the studies' values
            for b in BUDGETS:
                got = [st["best"][str(b)] for st in row["studies"]]
                assert row["best"][str(b)] == pytest.approx(
                    {"mean": statistics.mean(got), "std": statistics.stdev(got), "n": 2})
                assert up * (row["best"]["12"]["mean"] - row["best"]["6"]["mean"]) >= 0
                if getattr(get_strategy(s).parse_options(row["options"]),
                           "include_init", False) and not row.get("overrides"):
                    assert up * (row["best"][str(b)]["mean"]
                                 - uniform["search"][first["name"]]) >= 0, (name, s)
            reports = [st["report"] for st in row["studies"]]
            assert row["report"] == pytest.approx(
                {"mean": statistics.mean(reports), "std": statistics.stdev(reports), "n": 2})
            # report items are other items: the column is not the search column again
            assert row["report"]["mean"] != row["best"]["12"]["mean"], (name, s)
            # the win/loss letters follow the documented rule
            for base, verdict in row["vs"].items():
                key = "hypervolume" if mo else "best"
                assert verdict["search"] == rule(row[key]["12"], rows[base][key]["12"],
                                                 1.0 if mo else up), (name, s, base)
                assert verdict["report"] == rule(row["report"], rows[base]["report"], up)
            assert set(row["vs"]) == {b for b in ("random", "cmaes") if b in rows and b != s}
        assert finite(uniform["search"][first["name"]]) and finite(uniform["report"][
            first["name"]])
        assert uniform["search"][first["name"]] != uniform["report"][first["name"]]
        if mo:
            assert finite(uniform["hypervolume"])


def test_quick_league_matches_the_studies_it_wrote(league):
    check_league(league)
    out = league["stdout"]
    for name in TESTBEDS:
        assert f"### {name} (" in out
    assert "| uniform merge (init point) |" in out
    assert out.count("hypervolume reference point") == 1  # digits-mo only, once
    assert "skipped cmaes: single-objective only" in out


def test_the_checks_fail_on_a_wrong_table(league):
    """The checks above are not vacuous: each of these edits of the table is caught."""
    def edited(change) -> dict:
        data = copy.deepcopy(league)
        change(data)
        return data

    def nudge_a_best(d):
        d["testbeds"]["digits"]["rows"][0]["studies"][1]["best"]["12"] += 1e-3

    def report_is_search(d):
        row = d["testbeds"]["digits"]["rows"][0]
        row["report"] = dict(row["best"]["12"])

    def drop_a_seed(d):
        d["testbeds"]["digits"]["rows"][1]["seeds"] = [0]

    def flip_a_verdict(d):
        row = next(r for r in d["testbeds"]["digits"]["rows"] if "random" in r["vs"])
        row["vs"]["random"]["search"] = {"W": "L", "L": "=", "=": "W"}[
            row["vs"]["random"]["search"]]

    def lose_a_strategy(d):
        d["testbeds"]["digits-mo"]["skipped"].pop("cmaes")

    for change in (nudge_a_best, report_is_search, drop_a_seed, flip_a_verdict,
                   lose_a_strategy):
        with pytest.raises(AssertionError):
            check_league(edited(change))


@pytest.mark.expensive
def test_quick_league_on_the_hard_zoo_matches_its_studies(hard_zoo, tmp_path):
    """The same checks on the hard zoo (about 5 minutes on 2 cores once it is built)."""
    data = run_league(tmp_path, ["hard"])
    check_league(data, ["hard"])
    assert "frank_wolfe" in {r["strategy"] for r in data["testbeds"]["hard"]["rows"]}
    assert "### hard (" in data["stdout"]
