"""BMM against task arithmetic: the same outer search (the ``bmm`` strategy, Optuna's GP
BO) at the same budget over three inner merges, on the zoo and the hard zoo.

Arms, per testbed (``experiments/zoo/bmm.yaml``, ``experiments/hard/bmm.yaml``, their
strategy, budget and seed overridden per run):

* ``task_arithmetic``: the baseline, task arithmetic with its scale searched at the
  positions BMM searches (zoo: ``search_spaces/bmm_task_arithmetic.yaml``, lambda per
  group of 2 layers and module kind; hard: one weight per source and lambda per module
  kind, ``search_spaces/bmm_task_arithmetic_weights.yaml``), i.e. the best
  task-arithmetic lambdas the same outer budget finds;
* ``bmm_activations``: BMM's closed form with activation Grams (calibration items on the
  worker, their cost in items counted in the run's cost);
* ``bmm_data_free``: BMM's closed form with data-free Grams (``tau^T tau``).

Both BMM arms search a log-scale ridge strength (``lambda_log2`` in [-4, 8]) and
``scale`` over the task-arithmetic arm's lambda range ([0.5, 3]), at the same positions
(and on the hard zoo the same per-source weights), so that at large lambda BMM's space
holds the baseline's (:func:`log_space`); ``*_linear`` are the first version's spaces
(lambda in [0, 4], scale in [0.5, 2]), not run by default.

Figures: the best search value (mean char accuracy over the four skills) after the
budget, mean ± std over seeds (std with n - 1), the uniform merge (every weight 0.5,
lambda 1) as a reference, and the mean items scored per run (trials plus calibration).
Runs are resumable: each finished run is appended to ``--out`` (JSON) and skipped when
the script runs again.  Prints one markdown table per testbed for benchmarks/RESULTS.md.

    python benchmarks/bmm.py [--seeds 5] [--first-seed 0] [--evaluations 30] [--testbeds zoo,hard]
        [--out /tmp/bmm-bench.json] [--work /tmp/bmm-bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def log_space(bed: str, activations: bool) -> str:
    """BMM's space with a log-scale ridge strength (``lambda_log2`` in [-4, 8]: lambda from
    1/16, near the pure fit, to 256, near the anchor) and ``scale`` over the range the
    task-arithmetic arm searches its lambda in ([0.5, 3]): at large lambda the space holds
    that arm's whole space.  Zoo: per 2 layers x module kind, weights fixed at 0.5; hard: a
    weight per source, lambda and scale per module kind."""
    where = "{groups: 2, modules: [self_attn, mlp]}" if bed == "zoo" else \
        "{modules: [self_attn, mlp]}"
    weight = "weight: 0.5, " if bed == "zoo" else ""
    params = (f"lambda_log2: {{per: shared, granularity: {where}, bounds: [-4.0, 8.0], "
              f"init: 0.0}}, scale: {{per: shared, granularity: {where}, bounds: [0.5, 3.0], "
              f"init: 1.0}}")
    if bed != "zoo":
        params = ("weight: {per: source, granularity: global, bounds: [0.0, 1.0], "
                  "init: 0.5}, " + params)
    return (f"space={{method: bmm, fixed: {{activations: {str(activations).lower()}, "
            f"{weight}normalize: false}}, parameters: {{{params}}}}}")


ARMS = {
    "zoo": {
        "task_arithmetic": ("space=search_spaces/bmm_task_arithmetic.yaml",),
        "bmm_activations": (log_space("zoo", True),),
        "bmm_data_free": (log_space("zoo", False),),
        # the first version's spaces: lambda in [0, 4] (linear), scale in [0.5, 2]
        "bmm_activations_linear": ("space=search_spaces/bmm.yaml",),
        "bmm_data_free_linear": ("space=search_spaces/bmm_data_free.yaml",),
    },
    "hard": {
        "task_arithmetic": ("space=search_spaces/bmm_task_arithmetic_weights.yaml",),
        "bmm_activations": (log_space("hard", True),),
        "bmm_data_free": (log_space("hard", False),),
        "bmm_activations_linear": ("space=search_spaces/bmm_weights.yaml",),
        "bmm_data_free_linear": ("space=search_spaces/bmm_weights_data_free.yaml",),
    },
}
DEFAULT_ARMS = "task_arithmetic,bmm_activations,bmm_data_free"
FILES = {"zoo": "experiments/zoo/bmm.yaml", "hard": "experiments/hard/bmm.yaml"}


def experiment(bed: str, arm: str, seed: int, evaluations: int, work: Path):
    from mergesearch.experiment import Experiment

    name = f"{bed}-{arm}-e{evaluations}-s{seed}"
    (work / bed).mkdir(parents=True, exist_ok=True)
    sets = [*ARMS[bed][arm], f"name={name}", f"output={work / bed / name}",
            f"storage=sqlite:///{work / bed / 'bmm.db'}", f"seed={seed}",
            f"budget.evaluations={evaluations}"]
    return Experiment.load(ROOT / FILES[bed], sets)


def run_one(bed: str, arm: str, seed: int, evaluations: int, work: Path) -> dict:
    from mergesearch import controller

    exp = experiment(bed, arm, seed, evaluations, work)
    t0 = time.perf_counter()
    summary = controller.run(exp, overwrite=True, progress=False)
    best = max(t.values["mean"] for t in summary.front)
    return {"testbed": bed, "arm": arm, "seed": seed, "evaluations": evaluations,
            "best": best, "cost": summary.cost, "wall": time.perf_counter() - t0,
            "trials": summary.finished, "failed": summary.failed}


def uniform(bed: str, work: Path) -> float:
    """The uniform merge (every weight 0.5, lambda 1) on the search items."""
    from mergesearch import controller
    from mergesearch.recipe import Recipe

    exp = experiment(bed, "task_arithmetic", 0, 1, work)
    bound = controller.BoundExperiment(exp, progress=False)
    start = bound.space.start.to_dict()
    recipe = start | {"method": "task_arithmetic",
                      "parameters": {"weight": 0.5, "normalize": False, "lambda": 1.0},
                      "models": [{"model": m["model"]} for m in start["models"]]}
    return bound.evaluate(Recipe.from_dict(recipe)).values["mean"]


def table(bed: str, runs: list[dict], base: float | None, evaluations: int) -> str:
    lines = [f"### BMM vs task arithmetic: {bed} ({evaluations} evaluations per run, "
             "same GP-BO outer search)", "",
             "| inner merge | best search mean (± std) | seeds | items scored per run |",
             "| --- | --- | --- | --- |"]
    if base is not None:
        lines.append(f"| uniform merge (reference) | {base:.4f} | - | 400 |")
    for arm in ARMS[bed]:
        rows = [r for r in runs if r["testbed"] == bed and r["arm"] == arm
                and r["evaluations"] == evaluations]
        if not rows:
            continue
        vals = [r["best"] for r in rows]
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        cost = statistics.mean(r["cost"] for r in rows)
        lines.append(f"| {arm} | {statistics.mean(vals):.4f} ± {std:.4f} | {len(vals)} | "
                     f"{cost:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import mergesearch.merging.bmm  # noqa: F401  (registers bmm until merging/__init__ does)
    import mergesearch.strategies.bmm  # noqa: F401

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="run seeds first-seed .. seeds - 1 (to split a sweep over processes)")
    ap.add_argument("--evaluations", type=int, default=30)
    ap.add_argument("--testbeds", default="zoo,hard")
    ap.add_argument("--arms", default=DEFAULT_ARMS)
    ap.add_argument("--out", default="/tmp/bmm-bench.json")
    ap.add_argument("--work", default="/tmp/bmm-bench")
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": [], "uniform": {}}
    beds = args.testbeds.split(",")
    for seed in range(args.first_seed, args.seeds):
        for bed in beds:
            for arm in args.arms.split(","):
                if any(r["testbed"] == bed and r["arm"] == arm and r["seed"] == seed
                       and r["evaluations"] == args.evaluations for r in data["runs"]):
                    continue
                print(f"{bed} {arm} seed {seed} ...", file=sys.stderr, flush=True)
                data["runs"].append(run_one(bed, arm, seed, args.evaluations, work))
                out.write_text(json.dumps(data, indent=1))
    for bed in beds:
        if bed not in data["uniform"]:
            data["uniform"][bed] = uniform(bed, work)
            out.write_text(json.dumps(data, indent=1))
        print(table(bed, data["runs"], data["uniform"][bed], args.evaluations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
