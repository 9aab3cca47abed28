"""Evaluations to reach a fraction of the best known mean score, from league runs.

Reads the JSON files of finished runs that ``benchmarks/strategies.py --out`` writes (any
number of them: the base runs, each helper's), and for each testbed:

* the **best known mean**: the best mean over seeds of the final best value (first
  objective, the league's "best after N") of any strategy with at least ``--min-seeds``
  seeds at ``--evaluations`` in those files, on the testbed's current version (the
  fingerprint of the tabled strategies' runs); the table names that strategy;
* the **target**, ``--fraction`` of it (default 95%);
* per tabled strategy: the trials each seed needed to reach the target, counted as
  ``mergesearch compare <db> --target X`` counts them (the 1-based position of the first
  trial at least as good, failed and cached trials included; ``-`` when never within the
  budget), read back from the studies with :func:`mergesearch.report.compare.load_curves`;
  mean ± std (n - 1) over the seeds that reach it, and how many do.

Prints one markdown table per testbed on stdout (ready for RESULTS.md).

    python benchmarks/map_targets.py /tmp/league/*.json --testbeds zoo,hard
        --strategies random,cmaes,map,bayesian_map,nested_map [--evaluations 100]
        [--fraction 0.95] [--min-seeds 2] [--best zoo=0.78,hard=0.87]
        [--rows /tmp/league/base.json,/tmp/league/map_zoo.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path


def load_runs(paths: list[str]) -> list[dict]:
    runs, seen = [], set()
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "runs" not in data:
            continue
        for r in data["runs"]:
            if not isinstance(r, dict) or not {"url", "study", "fingerprint"} <= set(r):
                continue  # not a league record (a table's JSON)
            key = (r["url"], r["study"])
            if key not in seen and r.get("best_values"):
                seen.add(key)
                runs.append(r)
    return runs


def best_known(runs: list[dict], testbed: str, fingerprint: str, evaluations: int,
               min_seeds: int) -> tuple[str, float, int] | None:
    """(label, mean, seeds) of the best mean final best among the strategies' rows."""
    finals: dict[str, dict[int, float]] = defaultdict(dict)
    for r in runs:
        if (r["testbed"], r["fingerprint"], r["evaluations"]) == (testbed, fingerprint,
                                                                   evaluations):
            finals[r["label"]][r["seed"]] = next(iter(r["best_values"].values()))
    rows = [(label, statistics.fmean(v.values()), len(v)) for label, v in finals.items()
            if len(v) >= min_seeds]
    return max(rows, key=lambda row: row[1]) if rows else None


def fmt(values: list[int]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="league JSON files of finished runs")
    parser.add_argument("--testbeds", default="zoo,hard")
    parser.add_argument("--strategies", default="random,cmaes,map,bayesian_map,nested_map")
    parser.add_argument("--evaluations", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.95)
    parser.add_argument("--min-seeds", type=int, default=2)
    parser.add_argument("--rows", default=None,
                        help="comma-separated: take the tabled strategies' runs from these "
                        "files only (default: all files; one run per seed, the last file's)")
    parser.add_argument("--best", default=None,
                        help="testbed=value,... : best known means given instead of found")
    args = parser.parse_args(argv)
    from mergesearch.report.compare import load_curves

    given = dict(kv.split("=") for kv in args.best.split(",")) if args.best else {}
    runs = load_runs(args.files)
    tabled = args.strategies.split(",")
    for t in args.testbeds.split(","):
        pool = load_runs(args.rows.split(",")) if args.rows else runs
        mine = {(r["label"], r["seed"]): r for r in pool if r["testbed"] == t
                and r["strategy"] in tabled and r["evaluations"] == args.evaluations}
        mine = list(mine.values())
        if not mine:
            print(f"### {t}\n\nno runs of {', '.join(tabled)} at {args.evaluations}\n")
            continue
        fingerprint = Counter(r["fingerprint"] for r in mine).most_common(1)[0][0]
        mine = [r for r in mine if r["fingerprint"] == fingerprint]
        if t in given:
            label, best, seeds = "given", float(given[t]), None
        else:
            found = best_known(runs, t, fingerprint, args.evaluations, args.min_seeds)
            label, best, seeds = found
        target = args.fraction * best
        by_label: dict[str, list[dict]] = defaultdict(list)
        for r in sorted(mine, key=lambda r: r["seed"]):
            by_label[(r["strategy"], r["label"])].append(r)
        print(f"### {t}: evaluations to reach {args.fraction:.0%} of the best known mean\n")
        print(f"Best known mean after {args.evaluations}: {best:.4f} ({label}"
              + (f", {seeds} seeds" if seeds else "") + f"); target {target:.4f}.\n")
        print("| strategy | seeds reaching | evaluations to target (seeds 0..) | mean ± std "
              "(seeds reaching) | best after " f"{args.evaluations} |")
        print("|---|---|---|---|---|")
        for s in tabled:
            for (name, _label), rs in by_label.items():
                if name != s:
                    continue
                c = load_curves([f"{r['url']}#{r['study']}" for r in rs],
                                budgets=[args.evaluations], targets=target)
                obj = c.objectives[0].name
                reached = [cv.reached[obj] for cv in c.curves]
                got = [v for v in reached if v is not None]
                finals = [cv.best[args.evaluations][obj] for cv in c.curves]
                final = (f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f}"
                         if len(finals) > 1 else f"{finals[0]:.4f}")
                print(f"| {s} | {len(got)}/{len(reached)} | "
                      f"{', '.join('-' if v is None else str(v) for v in reached)} | "
                      f"{fmt(got)} | {final} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
