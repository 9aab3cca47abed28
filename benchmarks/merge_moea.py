"""MERGE's surrogate-assisted MOEA (``merge_moea``) against NSGA-II and random search on
the same categorical component space, score against storage, at equal budgets.

Testbeds (``--testbeds``): ``zoo`` (``experiments/zoo/merge_moea.yaml``: the tiny LM zoo,
4 layers x 2 blocks, 5 choices each) and ``hard`` (``experiments/hard/merge_moea.yaml``:
the hard zoo, 8 choices each).  Both have two objectives: mean char accuracy on the
search items (maximise) and ``storage``, the distinct modules the recipe keeps
(``distinct_modules``, minimise).  Every run is one search through the real controller,
one study per run in one SQLite file per testbed under ``--work``; only the strategy, its
options, the seed and the budget change between runs.  Finished runs are skipped when
the script runs again (it resumes a sweep cut short; a study short of its budget is run
again from scratch).

Figures per testbed and strategy, mean ± std over seeds (std with n - 1), read back with
:func:`mergesearch.report.compare.load_curves` (budgets counted as ``mergesearch
compare`` counts them):

* hypervolume after each budget, against one reference point for all runs of the
  testbed (the worst value of each objective over every run's ok trials, pushed out by
  10% of its range: compare's own rule; printed under the table);
* the Pareto set's size at the final budget (distinct recipes no trial dominates, as
  ``mergesearch pareto`` lists them);
* the best mean score found, and the fewest modules among the front's points;
* W/L against nsga2 and random on the final hypervolume: W when the mean difference
  exceeds the sum of the two seed stds, L when below minus that sum, = otherwise
  (the league's rule, :func:`strategies.verdict`).

Output: progress on stderr; markdown on stdout, ready for benchmarks/RESULTS.md.

    python benchmarks/merge_moea.py [--testbeds zoo,hard] [--seeds 5] [--evaluations 60]
        [--budgets 20,40] [--work /tmp/merge_moea] [--strategies merge_moea,nsga2,random]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import strategies as league  # noqa: E402  (the league's helpers: verdict, formatting)

ROOT = Path(__file__).resolve().parent.parent

TESTBEDS = {
    "zoo": ("experiments/zoo/merge_moea.yaml",
            "tiny LM zoo, component space (4 layers x attention/MLP, a source or the "
            "merge: 5 choices each), mean char accuracy (100 search items per skill) vs "
            "storage (distinct modules)"),
    "hard": ("experiments/hard/merge_moea.yaml",
             "hard zoo, component space (4 layers x attention/MLP, 8 choices each), mean "
             "char accuracy (evaluators/hard/search) vs storage (distinct modules)"),
}

#: strategy -> options in every run; merge_moea by import path, so it runs registered or not
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "merge_moea": ("mergesearch.strategies.merge_moea:MergeMOEA", {"initial": 10, "batch": 4}),
    "nsga2": ("nsga2", {"population_size": 10}),
    "random": ("random", {}),
    # storage modelled by a forest like the score, as before exact recipe objectives
    # (not run by default)
    "merge_moea_modelled": ("mergesearch.strategies.merge_moea:MergeMOEA",
                            {"initial": 10, "batch": 4, "exact_objectives": False}),
    # storage computed, a wider optimism on the score (not run by default)
    "merge_moea_kappa2": ("mergesearch.strategies.merge_moea:MergeMOEA",
                          {"initial": 10, "batch": 4, "kappa": 2.0}),
    # the option: the front's one-change neighbours among the infill candidates (not run
    # by default)
    "merge_moea_neighbours": ("mergesearch.strategies.merge_moea:MergeMOEA",
                              {"initial": 10, "batch": 4, "neighbours": 256}),
}
DEFAULT_STRATEGIES = "merge_moea,nsga2,random"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbeds", default="zoo,hard")
    ap.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--evaluations", type=int, default=60)
    ap.add_argument("--budgets", default="20,40")
    ap.add_argument("--work", default="/tmp/merge_moea")
    return ap.parse_args(argv)


def experiment(bed: str, strategy: str, seed: int, evaluations: int, work: Path):
    from mergesearch.experiment import Experiment

    path, options = PRESETS[strategy]
    name = f"{bed}-{strategy}-e{evaluations}-s{seed}"
    url = f"sqlite:///{(work / f'{bed}.db').as_posix()}"
    return Experiment.load(ROOT / TESTBEDS[bed][0], [
        f"name={name}", f"output={work / bed / name}", f"storage={url}", f"seed={seed}",
        f"budget.evaluations={evaluations}", f"strategy.name={path}",
        f"strategy.options={json.dumps(options)}"])


def finished(exp) -> int:
    from mergesearch.storage import TrialStore

    if not TrialStore.exists(exp.storage_url, exp.name):
        return 0
    return sum(t.state in ("ok", "failed")
               for t in TrialStore.open(exp.storage_url, exp.name).trials())


def front_of(exp) -> list[dict[str, float]]:
    from mergesearch.storage import TrialStore

    return [dict(t.values) for t in TrialStore.open(exp.storage_url, exp.name).pareto_front()]


def table(bed: str, names: list[str], seeds: int, evaluations: int, budgets: list[int],
          work: Path) -> str:
    from mergesearch.report.compare import Stat, load_curves

    exps = {(s, seed): experiment(bed, s, seed, evaluations, work)
            for s in names for seed in range(seeds)}
    specs = [f"{e.storage_url}#{e.name}" for e in exps.values()]
    comparison = load_curves(specs, budgets)
    by_name = {c.name: c for c in comparison.curves}
    score, storage = comparison.objectives
    rows, hv_final = [], {}
    for s in names:
        curves = [by_name[exps[s, seed].name] for seed in range(seeds)]
        fronts = [front_of(exps[s, seed]) for seed in range(seeds)]
        hv = {b: Stat.of([c.hypervolume[b] for c in curves]) for b in budgets}
        hv_final[s] = hv[budgets[-1]]
        size = Stat.of([len(f) for f in fronts])
        best = Stat.of([c.best[budgets[-1]][score.name] for c in curves])
        fewest = Stat.of([min(p[storage.name] for p in f) for f in fronts if f])
        rows.append([s, *[league._pm(hv[b]) for b in budgets], _pm1(size), league._pm(best),
                     _pm1(fewest)])
    against = [b for b in ("nsga2", "random") if b in names]
    for row, s in zip(rows, names, strict=True):
        row += [league.verdict(hv_final[s], hv_final[b], 1.0) if b != s else "-"
                for b in against]
    ref = comparison.ref_point or {}
    head = (["strategy", *[f"HV @{b}" for b in budgets], "Pareto set", f"best {score.name}",
             f"fewest {storage.name}"] + [f"vs {b}" for b in against])
    lines = [f"### merge_moea on {bed}: {TESTBEDS[bed][1]}", "",
             f"{seeds} seeds x {evaluations} evaluations; mean ± std over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Hypervolume reference point (all runs' worst value of each objective, "
              "pushed out by 10% of its range): "
              + ", ".join(f"{k} = {v:.4g}" for k, v in ref.items()) + ". "
              "Pareto set: distinct recipes no trial of the run dominates. "
              "W/L on the final hypervolume: W when the mean gain exceeds the sum of the two "
              "seed stds, L when the loss does, = otherwise.",
              "Presets: " + "; ".join(f"{s} {json.dumps(PRESETS[s][1])}" for s in names), ""]
    return "\n".join(lines)


def _pm1(s) -> str:
    if s.mean is None:
        return "-"
    return f"{s.mean:.1f}" if s.std is None else f"{s.mean:.1f} ± {s.std:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mergesearch import controller

    logging.basicConfig(level=logging.WARNING)
    beds, names = args.testbeds.split(","), args.strategies.split(",")
    unknown = [b for b in beds if b not in TESTBEDS] + [s for s in names if s not in PRESETS]
    if unknown:
        print(f"unknown testbed(s) or strategy(ies): {', '.join(unknown)}", file=sys.stderr)
        return 2
    budgets = sorted({int(b) for b in args.budgets.split(",") if int(b) < args.evaluations}
                     | {args.evaluations})
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seeds):  # seeds outermost: a sweep cut short stays comparable
        for bed in beds:
            for s in names:
                exp = experiment(bed, s, seed, args.evaluations, work)
                if finished(exp) >= args.evaluations:
                    continue
                start = time.perf_counter()
                controller.run(exp, overwrite=True, progress=False)
                print(f"{exp.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr,
                      flush=True)
    for bed in beds:
        print(table(bed, names, args.seeds, args.evaluations, budgets, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
