"""Cheap-fitness estimators against the full-set score: error and rank correlation.

For each testbed (``zoo``: experiments/zoo/random.yaml, 100 items per skill; ``hard``:
experiments/hard/cmaes.yaml, 100 items per skill):

1. a real search is run (``--budget`` trials, default 60; its SQLite file kept under
   ``--work``, reused when it is there) and every trial's recipe is merged again and
   scored on every search item, keeping each item's score (``char_accuracy`` per item):
   the candidates and their true full-set objective;
2. the calibration models are scored the same way: the base and source models, plus
   ``--merges`` random merges of the search space (seeded; "a few cheap merges");
3. every estimator is built from the calibration answers exactly as the evaluator builds
   it (:class:`mergesearch.evaluation.estimators.Estimator`, one per task) at k items
   per task, for several estimator seeds (which items, k-means and IRT starts), and
   predicts each candidate's objective (the mean over tasks) from its scores on its k
   items only.

Figures, mean ± std over ``--seeds`` estimator seeds: MAE of the predicted objective and
Spearman's rank correlation with the true one, across the candidates.  Cost at equal
ranking: the fewest items per task (on a grid) at which an estimator's mean Spearman
reaches that of a random subset of 10, 20 and 50 items; anchors and irt add a one-off
calibration (every calibration model on every item).  The goal the table checks: irt
(gp-IRT) at 20% of the items ranks at least as well as a random subset at 50%.

    python benchmarks/estimators.py [--testbeds zoo,hard] [--budget 60] [--seeds 5]
        [--merges 8] [--work /tmp/estimators] [--json PATH]

Output: progress on stderr; markdown for benchmarks/RESULTS.md on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

TESTBEDS = {"zoo": "experiments/zoo/random.yaml", "hard": "experiments/hard/cmaes.yaml"}
SOURCES = {"zoo": ["zoo:base", "zoo:rev", "zoo:srt", "zoo:dup", "zoo:evn"],
           "hard": ["zoo:hard/base", *(f"zoo:hard/{n}" for n in
                                       ("rot", "inc", "pos", "anti", "noisy", "flow_a",
                                        "flow_b"))]}
#: label -> (kind, options of make_estimator)
ESTIMATORS = {
    "subset": ("subset", {}),
    "anchors": ("anchors", {}),
    "irt (p-IRT)": ("irt", {"blend": False}),
    "irt (gp-IRT)": ("irt", {"blend": True}),
    "irt anchors (gp-IRT)": ("irt", {"blend": True, "select": "anchors"}),
}
SHOWN = (10, 20, 50)
GRID = (5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def answers(bed: str, budget: int, merges: int, work: Path) -> dict[str, Any]:
    """Per-item scores [models, items] by (task, metric) of the candidates (a real
    search's trials) and the calibration models, with the search's study."""
    from mergesearch import controller
    from mergesearch.experiment import Experiment
    from mergesearch.recipe import Recipe
    from mergesearch.storage import TrialStore

    cache = work / f"{bed}-answers.json"
    if cache.exists():
        return json.loads(cache.read_text())
    work.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{(work / f'{bed}.db').as_posix()}"
    exp = Experiment.load(ROOT / TESTBEDS[bed], [f"budget.evaluations={budget}",
                                                f"name={bed}-est", f"storage={url}",
                                                f"output={work / bed}"])
    t0 = time.perf_counter()
    if not TrialStore.exists(url, exp.name):
        controller.run(exp, progress=False)
    log(f"{bed}: search {time.perf_counter() - t0:.0f}s")
    bound = controller.BoundExperiment(exp, progress=False)
    worker = bound.make_executor().worker
    evaluator = worker.evaluator
    trials = [t for t in TrialStore.open(url, exp.name).trials()
              if t.state == "ok" and t.cached_from is None and t.recipe]
    t0 = time.perf_counter()
    cand: dict[str, list] = {}
    for t in trials:
        model = worker.merger.apply(Recipe.from_dict(t.recipe))
        for (task, metric), values in evaluator.item_answers(model).items():
            cand.setdefault(f"{task}|{metric}", []).append(values)
    per_eval = (time.perf_counter() - t0) / max(len(trials), 1)
    log(f"{bed}: {len(trials)} candidates scored on every item ({per_eval:.2f}s each)")
    calib = {f"{t}|{m}": v.tolist() for (t, m), v in
             evaluator.source_answers(SOURCES[bed]).items()}
    rng = np.random.default_rng(12345)
    low, high = bound.problem.low, bound.problem.high
    for _ in range(merges):
        genome = low + rng.random(len(low)) * (high - low)
        model = worker.merger.apply(bound.space.decode(bound.problem.clip(genome)))
        for (task, metric), values in evaluator.item_answers(model).items():
            calib[f"{task}|{metric}"].append(values)
    data = {"candidates": cand, "calibration": calib, "trials": len(trials),
            "sources": len(SOURCES[bed]), "merges": merges, "seconds_per_eval": per_eval}
    cache.write_text(json.dumps(data))
    return data


def predict(kind: str, options: dict, calib: dict[str, np.ndarray], cand: dict[str, np.ndarray],
            k: int, seed: int) -> np.ndarray:
    """Each candidate's predicted objective (the mean over tasks) from k items per task."""
    from mergesearch.evaluation.estimators import make_estimator

    per_task = []
    for key, full in cand.items():
        task = key.split("|")[0]
        est = make_estimator(kind, full.shape[1], k, seed=f"{seed}:{task}",
                             answers=calib[key], **options)
        per_task.append([est.predict(row[est.items])["estimate"] for row in full])
    return np.mean(per_task, axis=0)


def figures(data: dict[str, Any], seeds: int) -> dict[str, Any]:
    from mergesearch.evaluation.estimators import spearman

    cand = {k: np.array(v, dtype=float) for k, v in data["candidates"].items()}
    calib = {k: np.array(v, dtype=float) for k, v in data["calibration"].items()}
    n = min(v.shape[1] for v in cand.values())
    truth = np.mean([v.mean(1) for v in cand.values()], axis=0)
    grid = sorted({k for k in (*GRID, *SHOWN) if k <= n})
    out: dict[str, Any] = {"n_items": n, "n_candidates": len(truth),
                           "truth_range": [float(truth.min()), float(truth.max())],
                           "rows": {}}
    for label, (kind, options) in ESTIMATORS.items():
        rows = {}
        for k in grid:
            maes, rhos = [], []
            for seed in range(seeds):
                guess = predict(kind, options, calib, cand, k, seed)
                maes.append(float(np.abs(guess - truth).mean()))
                rhos.append(spearman(list(guess), list(truth)))
            rows[k] = {"mae": maes, "rho": rhos}
        out["rows"][label] = rows
        log(f"  {label}: " + ", ".join(f"k={k} rho={statistics.mean(rows[k]['rho']):.3f}"
                                       for k in SHOWN if k in rows))
    return out


def _pm(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(bed: str, fig: dict[str, Any], seeds: int, sources: int, merges: int) -> str:
    n, m = fig["n_items"], fig["n_candidates"]
    rows = fig["rows"]
    shown = [k for k in SHOWN if k <= n]
    refs = {k: statistics.mean(rows["subset"][k]["rho"]) for k in shown}
    calib_models = sources + merges
    lines = [f"### Estimators on `{bed}` ({TESTBEDS[bed]}; {m} candidates of a real search, "
             f"{n} items per task, objective range {fig['truth_range'][0]:.3f}.."
             f"{fig['truth_range'][1]:.3f})", "",
             f"Calibration: {sources} base/source models + {merges} random merges, each "
             f"scored once on every item. Mean ± std over {seeds} estimator seeds (which "
             "items, k-means and IRT starts).", ""]
    head = ["estimator", *(f"MAE @{k}" for k in shown), *(f"Spearman @{k}" for k in shown),
            "items to rank as well as subset " + " / ".join(f"@{k}" for k in shown)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        cells = [label, *(_pm(r[k]["mae"]) for k in shown), *(_pm(r[k]["rho"]) for k in shown)]
        reach = [next((k for k in sorted(r, key=int)
                       if statistics.mean(r[k]["rho"]) >= refs[ref] - 1e-12), None)
                 for ref in shown]
        cells.append(" / ".join("—" if k is None else str(k) for k in reach))
        lines.append("| " + " | ".join(cells) + " |")
    fifth, half = n // 5, n // 2
    if fifth in rows["irt (gp-IRT)"] and half in rows["subset"]:
        irt20 = statistics.mean(rows["irt (gp-IRT)"][fifth]["rho"])
        ref = statistics.mean(rows["subset"][half]["rho"])
        verdict = "met" if irt20 >= ref else "not met"
        lines += ["", f"Goal (irt gp-IRT at {fifth} items = 20% ranks at least as well as a "
                  f"random subset at {half} = 50%): Spearman {irt20:.3f} vs {ref:.3f}: "
                  f"**{verdict}**."]
    lines += ["", f"Cost: an estimator at k items per task costs k/{n} of a full evaluation "
              f"per candidate; anchors and irt add a one-off calibration of {calib_models} "
              f"full evaluations ({calib_models / m:.0%} of one per candidate over these {m})."]
    return "\n".join(lines) + "\n"


# -- multi-fidelity at equal cost (from league runs) ----------------------------------------


def cost_curves(runs: list[dict[str, Any]], units: tuple[int, ...]) -> dict[str, Any]:
    """Per run: the best full-fidelity value within ``u`` full evaluations' cost (items
    scored, cheap looks counted for their items), the evaluation seconds (merge +
    evaluate of every trial) it spent, and the seconds by which each value was reached."""
    from mergesearch.report.compare import strategy_label
    from mergesearch.storage import TrialStore

    out = []
    for r in runs:
        trials = sorted(TrialStore.open(r["url"], r["study"]).trials(), key=lambda t: t.number)
        full = max((t.cost for t in trials if t.fidelity >= 1 and t.cost > 0), default=0)
        name = next(iter(r["best_values"] or {"?": 0}))
        spent = seconds = 0.0
        best, reached = {u: None for u in units}, []
        for t in trials:
            spent += t.cost
            seconds += t.timings.get("merge", 0.0) + t.timings.get("evaluate", 0.0)
            v = t.values.get(name) if t.state == "ok" and t.fidelity >= 1 else None
            for u in units:
                if v is not None and spent <= u * full + 1e-9 and \
                        (best[u] is None or v > best[u]):
                    best[u] = v
            if v is not None:
                reached.append((seconds, v, spent / full if full else 0.0))
        inner = r["options"].get("strategy") if "fidelities" in r["options"] or \
            r["strategy"].endswith(("asha", "SuccessiveHalving")) else None
        plain = strategy_label(inner, r["options"].get("options", {})) if inner else r["label"]
        out.append({"testbed": r["testbed"], "label": r["label"], "seed": r["seed"],
                    "plain": plain,
                    "best": best, "seconds": seconds, "reached": reached,
                    "trials": len(trials), "full_cost": full, "spent": spent})
    return {"runs": out}


def first_reach(reached: list[tuple[float, float, float]], target: float
                ) -> tuple[float, float] | None:
    """(seconds, cost in full evaluations) when a run first reached ``target``."""
    return next(((s, c) for s, v, c in reached if v >= target - 1e-12), None)


def fidelity_markdown(curves: dict[str, Any], units: tuple[int, ...]) -> str:
    """One table per testbed: best full-fidelity value at equal cost, evaluation seconds,
    and the seconds to reach the baseline's mean final best."""
    by: dict[tuple[str, str], list[dict]] = {}
    for run in curves["runs"]:
        by.setdefault((run["testbed"], run["label"]), []).append(run)
    lines = []
    for bed in sorted({k[0] for k in by}):
        wrapped = {label for b, label in by if b == bed and by[b, label][0]["plain"] != label}
        if not wrapped:
            continue
        plains = {by[bed, label][0]["plain"] for label in wrapped}
        labels = sorted(wrapped | (plains & {label for b, label in by if b == bed}))
        lines += [f"### Multi-fidelity at equal cost on `{bed}`", "",
                  "Best full-fidelity value within the cost of u full evaluations (items "
                  "scored, cheap looks counted for their items); evaluation seconds (merge "
                  "+ evaluate, all trials); the cost (in full evaluations) and evaluation "
                  "seconds by which a run first reached the mean final best of the plain "
                  "strategy it wraps (itself for a plain row; over the runs that did). "
                  "Mean ± std over seeds; one maximised objective.", ""]
        head = ["strategy", "seeds", *(f"best after {u} full" for u in units), "trials",
                "evaluation s", "to the plain final best: full evals / s (runs)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in labels:
            runs = by[bed, label]
            cells = [label, str(len(runs))]
            for u in units:
                vals = [r["best"][u] for r in runs if r["best"][u] is not None]
                cells.append(_pm(vals, 4) if vals else "—")
            cells.append(_pm([float(r["trials"]) for r in runs], 0))
            cells.append(_pm([r["seconds"] for r in runs], 0))
            ref_runs = by.get((bed, runs[0]["plain"])) or runs
            target = statistics.mean(r["best"][units[-1]] for r in ref_runs
                                     if r["best"][units[-1]] is not None)
            hit = [first_reach(r["reached"], target) for r in runs]
            ok = [h for h in hit if h is not None]
            cells.append(f"{_pm([c for _, c in ok], 1)} / {_pm([s for s, _ in ok], 0)}"
                         if ok else "—")
            cells[-1] += f" ({len(ok)}/{len(runs)})"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbeds", default="zoo,hard")
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--merges", type=int, default=8)
    parser.add_argument("--work", default="/tmp/estimators")
    parser.add_argument("--json", default=None)
    parser.add_argument("--figures", default=None,
                        help="print the tables of a --json file of an earlier run")
    parser.add_argument("--league", default=None,
                        help="multi-fidelity mode: league JSON file(s), comma-separated, "
                        "whose runs are compared at equal cost instead")
    args = parser.parse_args(argv)
    if args.league:
        runs = list({(r["testbed"], r["label"], r["seed"]): r  # one run per seed
                     for path in args.league.split(",")
                     for r in json.loads(Path(path).read_text())["runs"]}.values())
        units = (25, 50, 100)
        curves = cost_curves(runs, units)
        print(fidelity_markdown(curves, units))
        if args.json:
            Path(args.json).write_text(json.dumps(curves, indent=1))
        return 0
    saved = json.loads(Path(args.figures).read_text()) if args.figures else {}
    out = {}
    for bed in args.testbeds.split(","):
        if bed not in TESTBEDS:
            print(f"unknown testbed {bed!r}; choose from {', '.join(TESTBEDS)}",
                  file=sys.stderr)
            return 2
        if bed in saved:
            fig = saved[bed]
        else:
            data = answers(bed, args.budget, args.merges, Path(args.work))
            fig = figures(data, args.seeds) | {"sources": data["sources"],
                                               "merges": data["merges"]}
        fig["rows"] = {label: {int(k): v for k, v in r.items()}
                       for label, r in fig["rows"].items()}
        out[bed] = fig
        print(markdown(bed, fig, args.seeds, fig.get("sources", len(SOURCES[bed])),
                       fig.get("merges", args.merges)))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
