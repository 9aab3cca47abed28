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

Multi-fidelity at equal cost:

* ``--league FILE[,FILE]``: runs recorded by benchmarks/strategies.py (asha's and the plain
  strategy's) compared at the cost of ``--units`` full evaluations (default 25,50,100);
* ``--fidelity-run zoo-gen``: runs them itself, on a testbed where scoring dominates the
  merge (experiments/zoo/asha_generate.yaml: every zoo item, exact match of greedy
  generations), asha over cmaes against cmaes, each at the cost of ``--full-evals`` full
  evaluations, seeds 0..``--seeds``-1 interleaved (asha, plain, asha, plain ...) so both
  arms share the machine's load; finished runs go to ``--out`` and are not run again.
  The table adds wall seconds (to the plain arm's final best, from the run's start) and
  per-trial merge, scoring and controller seconds by fidelity.  ``zoo-gen-wide``
  (experiments/zoo/asha_generate_wide.yaml) is the same testbed on a 32-dimensional space
  (a weight per expert, layer and block), where cmaes does not converge in the budget.

    python benchmarks/estimators.py --fidelity-run zoo-gen [--seeds 5] [--full-evals 30]
        [--inner random --inner-options '{}'] [--asha-options '{"fidelities": [0.333333, 1]}']
        [--out /tmp/estimators/fidelity.json]
        [--work /tmp/estimators] [--threads 1]

* ``--time-looks zoo-gen``: the seconds of one evaluation of the base model at 4, 48, 136
  and 400 items (1/100, 1/9, 1/3 and all of each task), the hf evaluator generating for
  all tasks in one set of batches (pooled) and with one set per task, interleaved; medians
  of ``--repeats``.  It also checks that both give the same generated texts.

    python benchmarks/estimators.py --time-looks zoo-gen [--repeats 5] [--threads 1]

Output: progress on stderr; markdown for benchmarks/RESULTS.md on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
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


# -- multi-fidelity at equal cost: interleaved runs ----------------------------------------

#: testbed -> experiment file whose strategy is ``asha`` over its plain strategy
FIDELITY_BEDS = {"zoo-gen": "experiments/zoo/asha_generate.yaml",
                 "zoo-gen-wide": "experiments/zoo/asha_generate_wide.yaml"}


def fidelity_run(bed: str, seeds: int, full_evals: int, out: Path, work: Path,
                 inner_strategy: str | None = None, inner_options: dict | None = None,
                 asha_options: dict | None = None) -> list[dict]:
    """asha over its inner strategy against the inner strategy alone, at the cost of
    ``full_evals`` full evaluations each, seeds 0..seeds-1, interleaved (asha seed 0, plain
    seed 0, asha seed 1, ...) so both arms see the same machine load.  ``inner_strategy``
    (with ``inner_options``) replaces the experiment's inner strategy in both arms;
    ``asha_options`` (``fidelities``, ``eta``, ...) update asha's own options.  Each
    finished run is appended to ``out`` (JSON, the league's run records plus
    ``started_at``); runs already there are skipped."""
    from mergesearch import controller
    from mergesearch.experiment import Experiment
    from mergesearch.report.compare import strategy_label
    from mergesearch.storage import TrialStore

    file = ROOT / FIDELITY_BEDS[bed]
    base = Experiment.load(file, [f"output={work / bed / 'probe'}"])
    if base.strategy.name != "asha":
        raise SystemExit(f"{file}: strategy must be asha (over the plain strategy)")
    inner = dict(base.strategy.options)
    if inner_strategy is not None:
        inner |= {"strategy": inner_strategy, "options": inner_options or {}}
    if asha_options:
        if {"strategy", "options"} & set(asha_options):
            raise SystemExit("--asha-options: name the inner strategy with --inner")
        inner |= asha_options
    probe = controller.BoundExperiment(base, progress=False).make_executor()
    try:
        full_items = sum(probe.worker.evaluator.n_items.values())
    finally:
        probe.close()
    done = json.loads(out.read_text())["runs"] if out.exists() else []
    url = f"sqlite:///{(work / f'{bed}.db').as_posix()}"
    arms = {"asha": ("asha", inner, [f"budget.cost={full_evals * full_items}",
                                     f"budget.evaluations={full_evals * 20}",
                                     f"strategy.options={json.dumps(inner)}"]),
            "plain": (inner["strategy"], inner.get("options", {}),
                      [f"budget.evaluations={full_evals}", "budget.cost=null",
                       f"strategy.name={inner['strategy']}",
                       f"strategy.options={json.dumps(inner.get('options', {}))}"])}
    for seed in range(seeds):
        for arm, (strategy, options, sets) in arms.items():
            label = strategy_label(strategy, options)
            if any(r["label"] == label and r["seed"] == seed and r["testbed"] == bed
                   and r["evaluations"] == full_evals for r in done):
                continue
            tag = f"-{hashlib.sha1(label.encode()).hexdigest()[:6]}" \
                if arm == "asha" and asha_options else ""  # its own study per asha setting
            name = f"{bed}-{arm}{tag}-f{full_evals}-s{seed}"
            exp = Experiment.load(file, [*sets, f"name={name}", f"seed={seed}",
                                         f"storage={url}", f"output={work / bed / name}"])
            started = time.time()
            t0 = time.perf_counter()
            summary = controller.run(exp, overwrite=True, progress=False)
            wall = time.perf_counter() - t0
            trials = TrialStore.open(url, name).trials()
            full = [t for t in trials if t.state == "ok" and t.fidelity >= 1]
            best = max(full, key=lambda t: (next(iter(t.values.values())), -t.number),
                       default=None)
            done.append({"testbed": bed, "label": label, "seed": seed, "strategy": strategy,
                         "options": options, "evaluations": full_evals, "study": name,
                         "url": url, "started_at": started, "wall": wall,
                         "trials": summary.finished, "full_items": full_items,
                         "best_values": None if best is None else best.values})
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps({"runs": done}, indent=1))
            tmp.replace(out)
            log(f"{bed} {label} seed {seed}: best {done[-1]['best_values']}, "
                f"{summary.finished} trials, {wall:.0f} s wall")
    return done


#: fidelities of the look-cost table: 1 item per task, then asha's rungs
LOOKS = (0.01, 0.111111, 0.333333, 1.0)


def time_looks(bed: str, repeats: int) -> str:
    """Markdown: evaluation seconds of the base model per look size, with generation pooled
    across tasks and per task (medians of ``repeats``, the two interleaved)."""
    from mergesearch import controller
    from mergesearch.experiment import Experiment
    from mergesearch.zoo import build_zoo

    exp = Experiment.load(ROOT / FIDELITY_BEDS[bed], ["output=/tmp/estimators/looks"])
    evaluator = controller.BoundExperiment(exp, progress=False).make_executor().worker.evaluator
    model = build_zoo().load_model("base")
    lines = ["| items | pooled s | per task s | per task / pooled |", "|---|---|---|---|"]
    for fidelity in LOOKS:
        times: dict[bool, list[float]] = {True: [], False: []}
        texts: dict[bool, dict] = {}
        for _ in range(repeats):
            for pooled in (True, False):
                evaluator.pool_generation = pooled
                t0 = time.perf_counter()
                res = evaluator.evaluate(model, fidelity=fidelity)
                times[pooled].append(time.perf_counter() - t0)
                texts[pooled] = res.outputs
        if texts[True] != texts[False]:
            raise SystemExit(f"fidelity {fidelity}: pooled and per-task generations differ")
        a, b = (statistics.median(times[k]) for k in (True, False))
        items = sum(len(v) for v in texts[True].values())
        lines.append(f"| {items} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
        log(f"{items} items: pooled {a:.3f} s, per task {b:.3f} s")
    evaluator.pool_generation = True
    return "\n".join(lines)


# -- multi-fidelity at equal cost (from league runs) ----------------------------------------


def cost_curves(runs: list[dict[str, Any]], units: tuple[int, ...]) -> dict[str, Any]:
    """Per run: the best full-fidelity value within ``u`` full evaluations' cost (items
    scored, cheap looks counted for their items), the evaluation seconds (merge +
    evaluate of every trial) it spent, the seconds by which each value was reached
    (evaluation seconds, and wall seconds from the run's start where the record has
    ``started_at``), and per fidelity each trial's merge and scoring seconds and the
    controller's time around it (the gap between two trials' writes, less their merge
    and scoring)."""
    from mergesearch.report.compare import strategy_label
    from mergesearch.storage import TrialStore

    out = []
    for r in runs:
        trials = sorted(TrialStore.open(r["url"], r["study"]).trials(), key=lambda t: t.number)
        full = max((t.cost for t in trials if t.fidelity >= 1 and t.cost > 0), default=0)
        name = next(iter(r["best_values"] or {"?": 0}))
        spent = seconds = 0.0
        best, reached = {u: None for u in units}, []
        started = r.get("started_at")
        previous = None  # the first trial's gap would hold the worker's start
        timing: dict[str, dict[str, list[float]]] = {}
        for t in trials:
            spent += t.cost
            work = t.timings.get("merge", 0.0) + t.timings.get("evaluate", 0.0)
            seconds += work
            row = timing.setdefault(f"{t.fidelity:.3f}", {"merge": [], "evaluate": [],
                                                          "other": [], "items": []})
            row["merge"].append(t.timings.get("merge", 0.0))
            row["evaluate"].append(t.timings.get("evaluate", 0.0))
            row["items"].append(t.cost)
            if previous is not None and t.finished_at:
                row["other"].append(t.finished_at - previous - work)
            previous = t.finished_at or None
            v = t.values.get(name) if t.state == "ok" and t.fidelity >= 1 else None
            for u in units:
                if v is not None and spent <= u * full + 1e-9 and \
                        (best[u] is None or v > best[u]):
                    best[u] = v
            if v is not None:
                wall = t.finished_at - started if started is not None and t.finished_at \
                    else None
                reached.append((seconds, v, spent / full if full else 0.0, wall))
        inner = r["options"].get("strategy") if "fidelities" in r["options"] or \
            r["strategy"].endswith(("asha", "SuccessiveHalving")) else None
        plain = strategy_label(inner, r["options"].get("options", {})) if inner else r["label"]
        out.append({"testbed": r["testbed"], "label": r["label"], "seed": r["seed"],
                    "plain": plain,
                    "best": best, "seconds": seconds, "reached": reached,
                    "wall": r.get("wall"), "timing": timing,
                    "trials": len(trials), "full_cost": full, "spent": spent})
    return {"runs": out}


def first_reach(reached: list[tuple], target: float) -> tuple[float, float, float | None] | None:
    """(evaluation seconds, cost in full evaluations, wall seconds or None) when a run first
    reached ``target``."""
    return next(((s, c, w) for s, v, c, *rest in reached if v >= target - 1e-12
                 for w in (rest[0] if rest else None,)), None)


#: the anytime table's time points, as shares of the plain arm's mean evaluation seconds
ANYTIME = (0.25, 0.5, 0.75, 1.0)


def best_by(reached: list[tuple], seconds: float) -> float | None:
    """A run's best full-fidelity value among the trials finished within ``seconds`` of
    evaluation time (merge + scoring of every trial before them, cheap looks included)."""
    return max((v for s, v, *_ in reached if s <= seconds + 1e-9), default=None)


def anytime_markdown(by: dict[tuple[str, str], list[dict]], bed: str,
                     labels: list[str]) -> list[str]:
    """Lines of the anytime table: each arm's best full-fidelity value after the same
    evaluation seconds (shares of the plain arm's mean), mean ± std over seeds (a run with
    no full-fidelity result by then counts as not there yet), and per seed which arm was
    ahead.  "Gets there in less evaluation time" reads off it: the arm higher at a time
    point reached that value sooner."""
    plains = {by[bed, label][0]["plain"] for label in labels} & set(labels)
    if not plains:
        return []
    plain = sorted(plains)[0]
    total = statistics.mean(r["seconds"] for r in by[bed, plain])
    head = ["strategy", *(f"best by {f:g} x ({f * total:.0f} s)" for f in ANYTIME)]
    lines = [f"Anytime, in evaluation seconds: the best full-fidelity value reached within "
             f"a share of {plain}'s mean evaluation seconds ({total:.0f} s); mean ± std "
             "over seeds, (n) the runs with a full-fidelity result by then; last row: per "
             "seed, how many wrapped runs were at least as high as the plain run of the "
             "same seed.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seeds = {label: {r["seed"]: r for r in by[bed, label]} for label in labels}
    for label in labels:
        cells = [label]
        for f in ANYTIME:
            vals = [v for r in by[bed, label] if (v := best_by(r["reached"], f * total))
                    is not None]
            cells.append((_pm(vals, 4) if vals else "—") + f" ({len(vals)})")
        lines.append("| " + " | ".join(cells) + " |")
    for label in labels:
        if label == plain:
            continue
        cells = [f"{label}: seeds ahead or level"]
        for f in ANYTIME:
            pairs = [(best_by(r["reached"], f * total),
                      best_by(seeds[plain][seed]["reached"], f * total))
                     for seed, r in seeds[label].items() if seed in seeds[plain]]
            ahead = sum(a is not None and (b is None or a >= b - 1e-12) for a, b in pairs)
            cells.append(f"{ahead}/{len(pairs)}")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def fidelity_markdown(curves: dict[str, Any], units: tuple[int, ...]) -> str:
    """One table per testbed: best full-fidelity value at equal cost, evaluation seconds,
    and the cost and seconds to reach the baseline's mean final best; where the runs
    recorded their start, wall seconds too and a table of per-trial seconds by fidelity."""
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
        walls = all(r.get("wall") is not None for label in labels for r in by[bed, label])
        lines += [f"### Multi-fidelity at equal cost on `{bed}`", "",
                  "Best full-fidelity value within the cost of u full evaluations (items "
                  "scored, cheap looks counted for their items); evaluation seconds (merge "
                  "+ evaluate, all trials)" + ("; wall seconds (the whole run)" if walls
                                               else "") +
                  "; the cost (in full evaluations) and evaluation seconds" +
                  (" (and wall seconds from the run's start)" if walls else "") +
                  " by which a run first reached the mean final best of the plain "
                  "strategy it wraps (itself for a plain row; over the runs that did). "
                  "Mean ± std over seeds; one maximised objective.", ""]
        head = ["strategy", "seeds", *(f"best after {u} full" for u in units), "trials",
                "evaluation s", *(["wall s"] if walls else []),
                "to the plain final best: full evals / s" + (" / wall s" if walls else "") +
                " (runs)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in labels:
            runs = by[bed, label]
            cells = [label, str(len(runs))]
            for u in units:
                vals = [r["best"][u] for r in runs if r["best"][u] is not None]
                cells.append(_pm(vals, 4) if vals else "—")
            cells.append(_pm([float(r["trials"]) for r in runs], 0))
            cells.append(_pm([r["seconds"] for r in runs], 0))
            if walls:
                cells.append(_pm([r["wall"] for r in runs], 0))
            ref_runs = by.get((bed, runs[0]["plain"])) or runs
            target = statistics.mean(r["best"][units[-1]] for r in ref_runs
                                     if r["best"][units[-1]] is not None)
            hit = [first_reach(r["reached"], target) for r in runs]
            ok = [h for h in hit if h is not None]
            reach = "—"
            if ok:
                reach = f"{_pm([c for _, c, _ in ok], 1)} / {_pm([s for s, _, _ in ok], 0)}"
                if walls and all(w is not None for _, _, w in ok):
                    reach += f" / {_pm([w for _, _, w in ok], 0)}"
            cells.append(f"{reach} ({len(ok)}/{len(runs)})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += anytime_markdown(by, bed, labels)
        timed = [label for label in labels if all(r.get("timing") for r in by[bed, label])]
        if walls and timed:
            lines += ["Per trial, by fidelity (median over all trials of all seeds): items "
                      "scored, merge seconds, scoring seconds, and the controller's seconds "
                      "around the trial (the gap between two trials' writes less their merge "
                      "and scoring: ask, tell, storage).", "",
                      "| strategy | fidelity | trials | items | merge s | scoring s | "
                      "other s | scoring / merge |", "|---|---|---|---|---|---|---|---|"]
            for label in timed:
                fids = sorted({f for r in by[bed, label] for f in r["timing"]}, key=float)
                for f in fids:
                    rows = [r["timing"][f] for r in by[bed, label] if f in r["timing"]]
                    med = {k: statistics.median(x for row in rows for x in row[k])
                           if any(row[k] for row in rows) else float("nan")
                           for k in ("merge", "evaluate", "other", "items")}
                    n = sum(len(row["items"]) for row in rows)
                    lines.append(f"| {label} | {float(f):.3f} | {n} | {med['items']:.0f} | "
                                 f"{med['merge']:.3f} | {med['evaluate']:.3f} | "
                                 f"{med['other']:.3f} | "
                                 f"{med['evaluate'] / max(med['merge'], 1e-9):.0f}x |")
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
    parser.add_argument("--fidelity-run", default=None, metavar="TESTBED",
                        help="run asha over cmaes and plain cmaes at equal cost, interleaved, "
                        f"on a testbed ({', '.join(FIDELITY_BEDS)}), into --out; then "
                        "print the equal-cost table of those runs")
    parser.add_argument("--inner", default=None, metavar="STRATEGY",
                        help="--fidelity-run: the strategy asha wraps and the plain arm runs "
                        "(default: the experiment's, cmaes)")
    parser.add_argument("--inner-options", default="{}", metavar="JSON",
                        help="--fidelity-run: that strategy's options")
    parser.add_argument("--asha-options", default="{}", metavar="JSON",
                        help="--fidelity-run: asha's own options over the experiment's, "
                        "e.g. '{\"fidelities\": [0.333333, 1.0]}'")
    parser.add_argument("--full-evals", type=int, default=30,
                        help="--fidelity-run: each run's budget, in full evaluations")
    parser.add_argument("--out", default="/tmp/estimators/fidelity.json",
                        help="--fidelity-run: JSON of finished runs (resumed)")
    parser.add_argument("--units", default=None,
                        help="budgets of the equal-cost table, in full evaluations (default "
                        "25,50,100; with --fidelity-run a quarter, half and all of "
                        "--full-evals)")
    parser.add_argument("--time-looks", default=None, metavar="TESTBED",
                        help="time one evaluation of the base model per look size, "
                        "generation pooled across tasks and per task")
    parser.add_argument("--repeats", type=int, default=5, help="--time-looks: repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.time_looks:
        if args.time_looks not in FIDELITY_BEDS or args.repeats < 1:
            print(f"--time-looks takes one of {', '.join(FIDELITY_BEDS)}, and --repeats >= 1",
                  file=sys.stderr)
            return 2
        print(time_looks(args.time_looks, args.repeats))
        return 0
    if args.fidelity_run:
        if args.fidelity_run not in FIDELITY_BEDS:
            print(f"unknown --fidelity-run testbed {args.fidelity_run!r}; choose from "
                  f"{', '.join(FIDELITY_BEDS)}", file=sys.stderr)
            return 2
        if args.full_evals < 4 or args.seeds < 1:
            print("--full-evals must be >= 4 and --seeds >= 1", file=sys.stderr)
            return 2
        work, out = Path(args.work), Path(args.out)
        work.mkdir(parents=True, exist_ok=True)
        fidelity_run(args.fidelity_run, args.seeds, args.full_evals, out, work,
                     args.inner, json.loads(args.inner_options),
                     json.loads(args.asha_options))
        args.league = str(out)
        if args.units is None:
            n = args.full_evals
            args.units = ",".join(str(u) for u in sorted({max(1, n // 4), max(1, n // 2), n}))
    if args.league:
        runs = list({(r["testbed"], r["label"], r["seed"]): r  # one run per seed
                     for path in args.league.split(",")
                     for r in json.loads(Path(path).read_text())["runs"]}.values())
        units = tuple(int(u) for u in (args.units or "25,50,100").split(","))
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
