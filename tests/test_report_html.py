"""`mergesearch report` (one self-contained HTML file), the plot builders it shares with
the dashboard, `--format` on compare / status / pareto, and the log a run writes beside
its study.

The searches are the digits testbed (python evaluator, milliseconds a trial), two
objectives and per-layer weights; the data-flow study is a short DFS on the zoo."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import plotly.graph_objects as go
import pytest
import yaml

from mergesearch.cli import main
from mergesearch.execution import Worker
from mergesearch.report import compare as cmp
from mergesearch.report.plots import (
    FRONT,
    OTHERS,
    front_figure,
    history_figure,
    layer_heatmap_figure,
    layer_path_figure,
    recipe_layer_table,
)
from mergesearch.storage import TrialRecord, TrialStore
from mergesearch.strategies.base import Objective
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parents[1]
FAILING = {2, 5}  # candidates the flaky worker fails
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) mergesearch")


class FlakyWorker(Worker):
    """Fails a few candidates, as a broken evaluation would."""

    def evaluate(self, candidate):
        if candidate.id in FAILING:
            return Result.failed(candidate.id, "RuntimeError: evaluation broke (simulated)")
        return super().evaluate(candidate)


def digits_experiment(tmp: Path, **changes) -> Path:
    data = {
        "name": "d2",
        "models": {"loader": "mergesearch.zoo.digits:load", "base": "base",
                   "sources": {"low": "low", "high": "high"}},
        "space": {"method": "task_arithmetic", "fixed": {"normalize": False},
                  "parameters": {"weight": {"per": "source", "granularity": "layer",
                                            "bounds": [0.0, 1.5], "init": 0.5}}},
        "strategy": {"name": "nsga2", "options": {"population_size": 6}},
        "evaluator": {"backend": "python", "function": "mergesearch.zoo.digits:evaluate",
                      "split": "test", "objectives": [
                          {"name": "accuracy", "metric": "accuracy"},
                          {"name": "l2", "source": "weights", "metric": "delta_l2",
                           "direction": "minimize"}]},
        "budget": {"evaluations": 18},
        "execution": {"backend": "local", "device": "cpu",
                      "worker_class": "test_report_html:FlakyWorker"},
        "output": str(tmp / "run"),
        "seed": 0,
    } | changes
    path = tmp / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Two studies of one experiment: d2 (NSGA-II) and other (random, another seed)."""
    tmp = tmp_path_factory.mktemp("report")
    exp = digits_experiment(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        assert main(["run", str(exp), "-q"]) == 0
        assert main(["run", str(exp), "-q", "--study", "other", "--set", "seed=1",
                     "--set", "strategy={name: random}"]) == 0
    return {"tmp": tmp, "exp": exp, "url": f"sqlite:///{tmp / 'run' / 'study.db'}"}


def figures(page: str) -> dict[str, list[dict]]:
    """Each figure's traces, by its div id, read back from the page's JSON."""
    out = {}
    decoder = json.JSONDecoder()
    for m in re.finditer(r'Plotly\.newPlot\(\s*"([^"]+)",\s*', page):
        out[m.group(1)], _ = decoder.raw_decode(page, m.end())
    return out


def points(values) -> list:
    """A trace's coordinates as a list (plotly may write arrays as typed base64 data)."""
    if isinstance(values, dict):
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).tolist()
    return list(values)


def report(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["report", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# -- the report ------------------------------------------------------------------------


def test_the_report_is_self_contained_and_draws_the_front(digits, tmp_path, capsys):
    out = tmp_path / "r.html"
    rc, said, _ = report([str(digits["exp"]), "--out", str(out)], capsys)
    assert rc == 0 and said.strip() == f"report written to {out}"
    page = out.read_text()
    # nothing fetched: no script or stylesheet from elsewhere (plotly.js itself is inline)
    assert not re.search(r"<script[^>]*\ssrc=|<link[^>]*\shref=|src=\"(https?:)?//", page)
    assert page.count("Plotly.newPlot(") == len(figures(page)) >= 3
    assert page.count("plotly.js v") == 1  # the library written once, for every figure

    store = TrialStore.open(digits["url"], "d2")
    front = store.pareto_front()
    ok = [t for t in store.trials() if t.state == "ok"]
    traces = {t.get("name"): t for t in figures(page)["d2-front"]}
    assert sorted(points(traces[FRONT]["customdata"])) == [t.number for t in front]
    assert len(points(traces[FRONT]["x"])) == len(front) >= 2
    assert len(points(traces[OTHERS]["x"])) == len(ok) - len(front)
    assert points(traces[FRONT]["y"]) == [t.values["l2"] for t in
                                          sorted(front, key=lambda t: t.number)]
    # the table of the front, its settings, and no layer path for a parameter space
    for t in front:
        assert f"<td>{t.number}</td><td>{t.values['accuracy']:.4f}</td>" in page
    assert "worker_class: test_report_html:FlakyWorker" in page
    assert "d2-layers" in figures(page) and not any("-path-" in k for k in figures(page))


def test_the_heatmap_shows_the_chosen_recipes_per_layer_weights(digits, tmp_path, capsys):
    from mergesearch.report import choose

    out = tmp_path / "r.html"
    assert report([str(digits["exp"]), "--out", str(out)], capsys)[0] == 0
    store = TrialStore.open(digits["url"], "d2")
    chosen = choose(store.pareto_front(), store.objectives)
    heat = [t for t in figures(out.read_text())["d2-layers"] if t["type"] == "heatmap"]
    shown = heat[0]  # the chosen trial first, the only one visible at first
    assert shown["name"] == f"trial {chosen.number}: weight" and shown.get("visible", True)
    assert not any(t.get("visible", True) for t in heat[1:])
    assert len(heat) == len(store.pareto_front())
    assert shown["y"] == ["low", "high"] and shown["x"] == ["L0", "L1"]
    models = {m["model"]: m["parameters"]["weight"] for m in chosen.recipe["models"]}
    for row, source in zip(shown["z"], ["low", "high"], strict=True):
        by_filter = {e["filter"]: e["value"] for e in models[source] if e.get("filter")}
        assert row == pytest.approx([by_filter["layers.0."], by_filter["layers.1."]])


def test_two_studies_add_the_compare_charts(digits, capsys):
    rc, said, _ = report([str(digits["exp"]), "--study", "d2", "--study", "other"], capsys)
    out = digits["tmp"] / "run" / "report.html"
    assert rc == 0 and said.strip() == f"report written to {out}"
    page = out.read_text()
    figs = figures(page)
    assert {"d2-front", "other-front", "compare-curves"} <= set(figs)
    curves = figs["compare-curves"]
    assert [t["name"] for t in curves] == ["d2", "other"]
    comparison = cmp.load_curves([f"{digits['url']}#d2", f"{digits['url']}#other"],
                                 budgets=[18])
    for trace, curve in zip(curves, comparison.curves, strict=True):
        assert points(trace["y"])[-1] == pytest.approx(curve.hypervolume[18])
    assert "hypervolume reference point" in page  # the compare table


def test_one_named_study_goes_beside_its_front(digits, capsys):
    rc, said, _ = report([str(digits["exp"]), "--study", "other"], capsys)
    assert rc == 0
    assert said.strip() == f"report written to {digits['tmp'] / 'run' / 'other' / 'report.html'}"


def test_an_unknown_study_or_stage_is_one_line_listing_what_exists(digits, capsys):
    rc, _, err = report([str(digits["exp"]), "--study", "nope"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no study 'nope'" in err and "the studies there: d2, other" in err
    rc, _, err = report([str(digits["exp"]), "--stage", "x"], capsys)
    assert rc == 2 and "this experiment has no stages" in err


def test_a_staged_experiment_reports_every_stage_that_ran(tmp_path, monkeypatch, capsys):
    exp = digits_experiment(tmp_path, name="staged", budget={"evaluations": 6},
                            execution={"backend": "local", "device": "cpu"},
                            stages=[{"name": "a"},
                                    {"name": "b", "strategy": {"name": "random"},
                                     "budget": {"evaluations": 4}}])
    monkeypatch.chdir(tmp_path)
    rc, _, err = report([str(exp)], capsys)
    assert rc == 2 and "no stage of study 'staged' has run yet" in err
    assert main(["run", str(exp), "-q"]) == 0
    assert report([str(exp), "--out", "all.html"], capsys)[0] == 0
    figs = figures((tmp_path / "all.html").read_text())
    assert {"staged-a-front", "staged-b-front", "compare-curves"} <= set(figs)
    assert report([str(exp), "--stage", "b", "--out", "b.html"], capsys)[0] == 0
    figs = figures((tmp_path / "b.html").read_text())
    assert "staged-b-front" in figs and "staged-a-front" not in figs
    assert "compare-curves" not in figs
    rc, _, err = report([str(exp), "--stage", "c"], capsys)
    assert rc == 2 and "--stage 'c': the stages are a, b" in err


@pytest.mark.slow
def test_a_data_flow_study_draws_its_layer_paths(zoo, tmp_path, monkeypatch, capsys):
    from mergesearch.controller import run
    from mergesearch.experiment import Experiment

    data = yaml.safe_load((ROOT / "experiments" / "zoo" / "sakana_dfs.yaml").read_text())
    data |= {"budget": {"evaluations": 6}, "report": None, "output": str(tmp_path / "run"),
             "strategy": {"name": "sakana_dfs", "options": {"popsize": 3}}}
    data["evaluator"]["limit"] = 8
    path = tmp_path / "dfs.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(ROOT)  # the experiment's relative paths
    run(Experiment.load(path), progress=False)
    assert report([str(path), "--out", str(tmp_path / "r.html")], capsys)[0] == 0
    figs = figures((tmp_path / "r.html").read_text())
    store = TrialStore.open(f"sqlite:///{tmp_path / 'run' / 'study.db'}", "zoo-sakana-dfs")
    front = store.pareto_front()
    assert "zoo-sakana-dfs-layers" not in figs  # no per-layer weights in a layer path
    for t in front:
        traces = figs[f"zoo-sakana-dfs-path-{t.number}"]
        hops = [h for tr in traces if tr["name"] != "ends" for h in points(tr["customdata"])]
        assert sorted(hops) == list(range(1, len(t.recipe["layer_path"]) + 1))
        assert {tr["name"] for tr in traces} - {"ends"} <= {"rev", "srt"}


# -- the builders on their own ---------------------------------------------------------


def record(number: int, values: dict[str, float], recipe: dict | None = None,
           state: str = "ok") -> TrialRecord:
    return TrialRecord(number=number, candidate_id=number, state=state, values=values,
                       params={}, recipe=recipe or {"method": "linear", "n": number},
                       fidelity=1.0, scores={}, reason=None, cached_from=None, timings={})


def test_front_figure_kinds_by_number_of_objectives():
    names = ["a", "b", "c", "d"]
    trials = [record(i, {n: float((i * (k + 3)) % 7) for k, n in enumerate(names)})
              for i in range(8)] + [record(8, {}, state="failed")]
    for k, kind in [(1, go.Scatter), (2, go.Scatter), (3, go.Scatter3d), (4, go.Parcoords)]:
        objectives = [Objective(n) for n in names[:k]]
        fig = front_figure(trials, objectives)
        front = [t for t in fig.data if t.name == FRONT]
        assert len(front) == 1 and isinstance(front[0], kind), k
    fig = front_figure([], [Objective("a")])
    assert fig.layout.annotations[0].text == "no completed trial yet"


def test_front_figure_finds_the_front_as_the_store_does():
    objectives = [Objective("acc"), Objective("l2", "minimize")]
    trials = [record(0, {"acc": 0.5, "l2": 1.0}), record(1, {"acc": 0.7, "l2": 2.0}),
              record(2, {"acc": 0.6, "l2": 2.5}),  # dominated by 1
              record(3, {"acc": 0.7, "l2": 2.0}, recipe={"method": "linear", "n": 1}),
              record(4, {"acc": 0.9, "l2": 3.0})]
    fig = front_figure(trials, objectives)
    front = next(t for t in fig.data if t.name == FRONT)
    assert list(front.customdata) == [0, 1, 4]  # trial 3 repeats trial 1's recipe
    assert list(next(t for t in fig.data if t.name == OTHERS).customdata) == [2, 3]


def test_history_figure_is_the_compare_curve_per_evaluation():
    objectives = [Objective("acc"), Objective("l2", "minimize")]
    values = [(0.5, 1.0), (0.7, 2.0), None, (0.9, 3.0), (0.6, 0.5)]
    trials = [record(i, {"acc": v[0], "l2": v[1]}) if v else record(i, {}, state="failed")
              for i, v in enumerate(values)]
    fig = history_figure(trials, objectives)
    run = cmp.Run("s", [(t.number, t.state, t.values) for t in trials])
    expected = cmp.compare([run], objectives, budgets=[1, 2, 3, 4, 5]).curves[0].hypervolume
    assert list(fig.data[0].x) == [1, 2, 3, 4, 5]
    assert list(fig.data[0].y) == pytest.approx([expected[b] for b in range(1, 6)])
    best = history_figure(trials, objectives[:1])
    assert list(best.data[0].y) == [0.5, 0.7, 0.7, 0.9, 0.9]


def test_layer_tables_read_layer_and_module_filters():
    ties = {"method": "ties", "base": "/m/base", "models": [
        {"model": "/zoo/experts/rev", "parameters": {
            "weight": [{"filter": "layers.0.self_attn", "value": 0.1},
                       {"filter": "layers.0.mlp", "value": 0.2},
                       {"filter": "layers.0.", "value": 0.15},
                       {"filter": "layers.0.mlp", "value": 9.0},  # shadowed: first wins
                       {"value": 0.3}],
            "density": 0.5}}],
        "parameters": {"lambda": [{"filter": "layers.1.", "value": 1.5}, {"value": 1.0}]}}
    table = recipe_layer_table(ties)
    assert table == {"weight": {"rev": {(0, "self_attn"): 0.1, (0, "mlp"): 0.2, (0, ""): 0.15}},
                     "lambda": {"(all)": {(1, ""): 1.5}}}
    fig = layer_heatmap_figure([record(3, {}, ties)])
    weight = next(t for t in fig.data if t.name == "trial 3: weight")
    assert list(weight.x) == ["L0 (rest)", "L0 mlp", "L0 self_attn"]
    assert layer_heatmap_figure([record(0, {}, {"method": "linear", "models": [
        {"model": "a", "parameters": {"weight": 0.5}}]})]) is None
    assert layer_path_figure(ties) is None


def test_layer_path_figure_draws_hops_with_their_scales():
    path = {"method": "passthrough", "layer_path": [
        {"model": "/z/rev", "layer": 0}, {"model": "/z/srt", "layer": 1, "scale": 0.75},
        {"model": "/z/rev", "layer": 3}]}
    fig = layer_path_figure(path)
    boxes = {t.name: list(t.text) for t in fig.data if t.name != "ends"}
    assert boxes == {"rev": ["L0", "L3"], "srt": ["L1"]}
    labels = [a.text for a in fig.layout.annotations if a.text]
    assert labels == ["×1", "×0.75", "×1"]


# -- machine-readable output -----------------------------------------------------------


def test_compare_format_json_and_csv_round_trip(digits, tmp_path, capsys):
    db = str(digits["tmp"] / "run" / "study.db")
    expected = cmp.load_curves([db])
    assert main(["compare", db, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(expected.to_json()))
    assert main(["compare", db, "--format", "csv", "--json", str(tmp_path / "c.json")]) == 0
    text = capsys.readouterr().out
    assert text == expected.csv_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["study"] for r in rows if r["kind"] == "study"} == {"d2", "other"}
    assert json.loads((tmp_path / "c.json").read_text()) == json.loads(
        json.dumps(expected.to_json()))  # --json PATH still writes the file
    assert main(["compare", db]) == 0
    assert capsys.readouterr().out.startswith("objectives: accuracy (maximize), l2 (minimize)")


def test_status_formats_and_the_old_text_name(digits, capsys):
    exp = str(digits["exp"])
    assert main(["status", exp, "--format", "csv"]) == 0
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert (row["study"], row["ok"], row["failed"], row["budget"]) == \
        ("d2", str(18 - len(FAILING)), str(len(FAILING)), "18")
    best = TrialStore.open(digits["url"], "d2").trials()
    assert float(row["best_accuracy"]) == max(t.values["accuracy"] for t in best if t.values)
    for name in ("table", "text"):
        assert main(["status", exp, "--format", name]) == 0
        assert capsys.readouterr().out.startswith("study 'd2' in ")


@pytest.mark.parametrize("command", ["compare", "status", "pareto"])
def test_an_unknown_format_is_refused_with_the_choices(digits, command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, str(digits["exp"]), "--format", "xml"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'xml' (choose from 'table', 'json', 'csv')" in \
        capsys.readouterr().err.replace("table, json, csv", "'table', 'json', 'csv'")


# -- the run's log -----------------------------------------------------------------------


def test_a_run_logs_beside_its_study(digits):
    run_dir = digits["tmp"] / "run"
    lines = (run_dir / "d2.log").read_text().splitlines()
    assert lines and all(STAMP.match(line) for line in lines), lines
    failed = [line for line in lines if "failed: RuntimeError: evaluation broke" in line]
    assert len(failed) == len(FAILING) and all(" WARNING " in line for line in failed)
    assert "mergesearch run " in lines[0] and "study 'd2' in sqlite:" in lines[0]
    assert lines[-1].endswith("stopped: budget") and "d2: 18 trials" in lines[-1]
    other = (run_dir / "other.log").read_text()
    assert "other: 18 trials" in other and "d2: 18 trials" not in other


def test_the_log_is_appended_to_and_a_refused_run_leaves_none(digits, tmp_path, monkeypatch):
    log = digits["tmp"] / "run" / "d2.log"
    before = log.read_text().splitlines()
    monkeypatch.chdir(digits["tmp"])
    assert main(["run", str(digits["exp"]), "-q"]) == 0  # the budget is spent: nothing to do
    after = log.read_text().splitlines()
    assert after[:len(before)] == before and len(after) == len(before) + 2
    assert "mergesearch run " in after[-2] and "0 evaluated in this run" in after[-1]
    bad = digits_experiment(tmp_path, name="bad", models={
        "loader": "mergesearch.zoo.digits:load", "base": "base", "sources": {"x": "nope"}})
    assert main(["run", str(bad), "-q"]) == 2
    assert not (tmp_path / "run").exists()
