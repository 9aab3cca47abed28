"""MM-MO against CMA-ES and random search: evaluations needed to reach 95% of the best known
mean score, on the tiny LM zoo in MM-MO's space (DARE-TIES weight and density per expert).

Rows (each 5 seeds x 30 evaluations by default, the paper's budget of 10 random + 4 x 5):

* ``mm_mo`` with its two objectives, mean char accuracy and delta_l1 (the ``zoo-mo``
  testbed: ``experiments/zoo/mm_mo.yaml`` as it is);
* ``mm_mo`` on the mean alone (qLogNEI in the same loop; the ``zoo-mean`` testbed);
* ``cmaes`` on the mean alone (the league's preset: popsize 8, sigma0 0.2);
* ``random`` (its proposals do not depend on the objectives: run once, on ``zoo-mo``).

The best known mean is the best search-item mean of every run here; a run's figure is the
number of evaluations until its best-so-far mean first reaches 95% of it (censored at the
budget when it never does).  Runs go through the league's machinery
(``benchmarks/strategies.py``: the real controller, one SQLite study per run, resumable
through ``--out``); ``--reuse`` counts the finished runs of another ``--out`` (the
league's, for the ``zoo-mo`` rows) without writing to it.  Prints markdown for
``benchmarks/RESULTS.md``.

    python benchmarks/mm_mo.py [--seeds 5] [--evaluations 30] [--level 0.95]
        [--out /tmp/mm_mo_bench.json] [--work DIR] [--rows mo,mean,cmaes,random]
        [--reuse /tmp/league/mm_mo.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import strategies as league  # noqa: E402  (benchmarks/strategies.py)

import mergesearch.strategies.mm_mo  # noqa: E402,F401  (registers mm_mo where not yet)

MEAN_ONLY = "evaluator.objectives=[{name: mean, metric: char_accuracy}]"
REPORT = ("evaluator.suite=evaluators/zoo_report", "evaluator.limit=null")

ZOO_MO = league.Testbed(
    "zoo-mo", "experiments/zoo/mm_mo.yaml",
    "tiny LM zoo, DARE-TIES weight and density per expert (8 dims), two objectives: mean "
    "char accuracy (maximize) and delta_l1 = sum |merged - base| (minimize); search: 100 "
    "items per skill; report: 200 other items per skill", report=REPORT)
ZOO_MEAN = league.Testbed(
    "zoo-mean", "experiments/zoo/mm_mo.yaml",
    "tiny LM zoo, DARE-TIES weight and density per expert (8 dims), mean char accuracy "
    "alone", search=(MEAN_ONLY,), report=REPORT)

#: key -> (row label, testbed, strategy, options)
ROWS = {
    "mo": ("mm_mo (mean + delta_l1)", ZOO_MO, "mm_mo", {}),
    "mean": ("mm_mo (mean alone)", ZOO_MEAN, "mm_mo", {}),
    "cmaes": ("cmaes (mean alone)", ZOO_MEAN, "cmaes", league.PRESETS["cmaes"]),
    "random": ("random", ZOO_MO, "random", {}),
}


def curve(record: dict) -> list[float]:
    """Best-so-far search mean after each trial of one run, in trial order (failed trials
    keep the previous best)."""
    from mergesearch.storage import TrialStore

    best, out = float("-inf"), []
    for t in sorted(TrialStore.open(record["url"], record["study"]).trials(),
                    key=lambda t: t.number):
        if t.state == "ok" and "mean" in t.values:
            best = max(best, t.values["mean"])
        out.append(best)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--evaluations", type=int, default=30)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--out", default="/tmp/mm_mo_bench.json")
    parser.add_argument("--work", default=None)
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated, of {', '.join(ROWS)} (default: all)")
    parser.add_argument("--reuse", action="append", default=[],
                        help="another --out (the league's) whose finished runs of these "
                        "testbeds count here, read only; repeatable")
    args = parser.parse_args(argv)
    rows = [ROWS[k] for k in args.rows.split(",")]
    from mergesearch.report.compare import strategy_label

    out = Path(args.out)
    work = (Path(args.work) if args.work else out.with_name(out.stem + ".studies")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    benches = {bed.name: league.Bench(bed, work) for bed in (ZOO_MO, ZOO_MEAN)}
    done = league.load_done(out)
    done["runs"] = [r for r in done["runs"] if r["testbed"] not in benches
                    or (r.get("fingerprint") == benches[r["testbed"]].fingerprint
                        and league.study_exists(r))]
    reused = [r for path in args.reuse for r in league.load_done(Path(path))["runs"]
              if r["testbed"] in benches
              and r.get("fingerprint") == benches[r["testbed"]].fingerprint]
    started = time.perf_counter()
    records: dict[str, list[dict]] = {label: [] for label, *_ in rows}
    for seed in range(args.seeds):  # seeds outermost, as the league
        for label, bed, strategy, options in rows:
            key = (bed.name, strategy_label(strategy, options), seed, args.evaluations)
            record = next((r for r in [*done["runs"], *reused] if league.run_key(r) == key),
                          None)
            if record is None:
                record = league.one_run(benches[bed.name], strategy, options, seed,
                                        args.evaluations)
                done["runs"].append(record)
                league.save_done(out, done)
                print(f"{label} seed {seed}: best {record['best_values']}, "
                      f"{record['wall']:.0f} s; {time.perf_counter() - started:.0f} s so far",
                      file=sys.stderr, flush=True)
            records[label].append(record)

    curves = {label: [curve(r) for r in rs] for label, rs in records.items()}
    best_known = max(c[-1] for cs in curves.values() for c in cs)
    target = args.level * best_known
    print(f"### MM-MO: evaluations to reach {args.level:.0%} of the best known mean "
          f"(`benchmarks/mm_mo.py`)\n")
    print(f"Tiny LM zoo, DARE-TIES weight and density per expert (8 dims, "
          f"`search_spaces/mm_mo_dare_ties.yaml`), mean char accuracy on 100 search items "
          f"per skill; {args.seeds} seeds x {args.evaluations} evaluations; best known mean "
          f"{best_known:.4f} (the best of every run below), target {target:.4f}.\n")
    head = ["strategy", "seeds reaching", "evaluations to target (per seed)",
            "mean of those reaching", f"best mean after {args.evaluations}",
            "report mean (best trial)", "s/run"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for label, rs in records.items():
        hits = [next((i + 1 for i, v in enumerate(c) if v >= target), None)
                for c in curves[label]]
        reached = [h for h in hits if h is not None]
        finals = [c[-1] for c in curves[label]]
        reports = [r["report"]["mean"] for r in rs if r.get("report")]
        cells = [label, f"{len(reached)}/{len(hits)}",
                 ", ".join(str(h) if h is not None else f">{args.evaluations}" for h in hits),
                 f"{statistics.mean(reached):.1f}" if reached else "-",
                 _pm(finals), _pm(reports),
                 f"{statistics.mean(r['wall'] for r in rs):.0f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\n- mean ± std over seeds (n - 1); evaluations to target: the first trial whose "
          f"best-so-far search mean is >= {target:.4f}; report: the run's best-mean trial "
          "re-scored on evaluators/zoo_report; cmaes options "
          f"{league.PRESETS['cmaes']}; mm_mo with its defaults (10 random, batches of 5, "
          "pool 5 + 5 DE repairs screened to 5)")
    return 0


def _pm(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


if __name__ == "__main__":
    sys.exit(main())
