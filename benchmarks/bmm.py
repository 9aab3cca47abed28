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
* ``bmm_data_free``: BMM's closed form with data-free Grams (``tau^T tau``);
* ``bmm_activations_skip``: activation Grams with ``skip_unchanged`` (a source that left a
  tensor as the base's has no say in its fit: the hard zoo's rot, inc, flow_a and flow_b
  changed only half of the layers);
* ``bmm_data_free_lambda1``: data-free Grams with ``lambda_log2`` fixed at 0 (lambda 1
  mean eigenvalue): the task-arithmetic arm's dimensions exactly (the fit in place of
  nothing), no ridge strength to search;
* ``bmm_activations_skip_norm``: activation Grams with ``skip_unchanged`` and
  ``gram_norm`` (every source's Gram to mean eigenvalue 1, so its say in the fit is its
  weight, not the size of its activations); ``*_fit``: the same with ``lambda_log2``
  fixed at -4 (near the pure fit), the task-arithmetic arm's dimensions.

The BMM arms (but ``*_lambda1``) search a log-scale ridge strength (``lambda_log2`` in [-4, 8]) and
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
        [--arms task_arithmetic,...] [--out /tmp/bmm-bench.json] [--work /tmp/bmm-bench]

``--point SEED`` runs no search: it scores BMM's closed form with each of ``--variants``
(:data:`VARIANTS`) at the best point of the task-arithmetic run of that seed (same
weights, its lambdas as BMM's scale), with per-skill scores: whether the fit itself adds
anything where task arithmetic is best.  Variants may take their Grams from another
calibration set (:data:`GRAM_SETS`) and scale the point's lambdas (``... scale xT``:
the activation fit averages where task arithmetic adds, so it wants a larger scale).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parent.parent

def log_space(bed: str, activations: bool, skip_unchanged: bool = False,
              fixed_lambda: float | None = None, gram_norm: bool = False) -> str:
    """BMM's space with a log-scale ridge strength (``lambda_log2`` in [-4, 8]: lambda from
    1/16, near the pure fit, to 256, near the anchor) and ``scale`` over the range the
    task-arithmetic arm searches its lambda in ([0.5, 3]): at large lambda the space holds
    that arm's whole space.  Zoo: per 2 layers x module kind, weights fixed at 0.5; hard: a
    weight per source, lambda and scale per module kind.  ``skip_unchanged``: the fit leaves
    out a source that did not change a tensor; ``gram_norm``: every source's Gram to mean
    eigenvalue 1; ``fixed_lambda``: ``lambda_log2`` fixed at this value (0: lambda 1 mean
    eigenvalue; -4: near the pure fit), so the space has the task-arithmetic arm's
    dimensions."""
    where = "{groups: 2, modules: [self_attn, mlp]}" if bed == "zoo" else \
        "{modules: [self_attn, mlp]}"
    fixed = [f"activations: {str(activations).lower()}", "normalize: false"]
    if bed == "zoo":
        fixed.append("weight: 0.5")
    if skip_unchanged:
        fixed.append("skip_unchanged: true")
    if gram_norm:
        fixed.append("gram_norm: true")
    params = []
    if bed != "zoo":
        params.append("weight: {per: source, granularity: global, bounds: [0.0, 1.0], "
                      "init: 0.5}")
    if fixed_lambda is not None:
        fixed.append(f"lambda_log2: {float(fixed_lambda)}")
    else:
        params.append(f"lambda_log2: {{per: shared, granularity: {where}, "
                      "bounds: [-4.0, 8.0], init: 0.0}")
    params.append(f"scale: {{per: shared, granularity: {where}, bounds: [0.5, 3.0], "
                  "init: 1.0}")
    return (f"space={{method: bmm, fixed: {{{', '.join(fixed)}}}, "
            f"parameters: {{{', '.join(params)}}}}}")


#: the BMM arms of :func:`log_space`, the same on every testbed: arm -> its options
LOG_ARMS = {
    "bmm_activations": {"activations": True},
    "bmm_data_free": {"activations": False},
    "bmm_activations_skip": {"activations": True, "skip_unchanged": True},
    "bmm_data_free_lambda1": {"activations": False, "fixed_lambda": 0.0},
    "bmm_activations_skip_norm": {"activations": True, "skip_unchanged": True,
                                  "gram_norm": True},
    "bmm_activations_skip_norm_fit": {"activations": True, "skip_unchanged": True,
                                      "gram_norm": True, "fixed_lambda": -4.0},
}


def _arms(bed: str, baseline: str, activations_linear: str, data_free_linear: str
          ) -> dict[str, tuple[str, ...]]:
    """A testbed's arms: its task-arithmetic baseline space, the :data:`LOG_ARMS`, and
    the first version's spaces (lambda in [0, 4] linear, scale in [0.5, 2])."""
    return {"task_arithmetic": (f"space=search_spaces/{baseline}",),
            **{arm: (log_space(bed, **opts),) for arm, opts in LOG_ARMS.items()},
            "bmm_activations_linear": (f"space=search_spaces/{activations_linear}",),
            "bmm_data_free_linear": (f"space=search_spaces/{data_free_linear}",)}


ARMS = {
    "zoo": _arms("zoo", "bmm_task_arithmetic.yaml", "bmm.yaml", "bmm_data_free.yaml"),
    "hard": _arms("hard", "bmm_task_arithmetic_weights.yaml", "bmm_weights.yaml",
                  "bmm_weights_data_free.yaml"),
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
    top = max(summary.front, key=lambda t: t.values["mean"])
    return {"testbed": bed, "arm": arm, "seed": seed, "evaluations": evaluations,
            "best": top.values["mean"], "cost": summary.cost,
            "wall": time.perf_counter() - t0, "trials": summary.finished,
            "failed": summary.failed, "best_trial": top.number, "recipe": top.recipe}


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


#: Where a variant's activation Grams come from (``VARIANTS[...]["grams"]``): each source
#: on its own tasks' items (``own``, the CalibratingWorker's), on every task's items
#: (``every_task``, EveryTaskCalibratingWorker's), and two that match the merged model's
#: data flow, on each source's own items: ``in_merge``, the source's changed tensors with
#: the rest of the model the task-arithmetic point's merge (a source changed in the upper
#: layers only sees the merged lower layers' outputs, as it will in the merge), and
#: ``anchor``, the point's merge itself (RegMean++-like: every module's inputs are the
#: merged model's).
GRAM_SETS = ("own", "every_task", "in_merge", "anchor")


VARIANTS = {
    # name: BMM options merged into the task-arithmetic arm's best recipe (its weights, its
    # lambdas as BMM's scale); lambda_log2 in [-4, 8] reaches from near the pure fit to
    # near the anchor
    **{f"data_free l2={k}": {"activations": False, "lambda_log2": k} for k in (0, 2, 4, 8)},
    **{f"activations l2={k}": {"activations": True, "lambda_log2": k} for k in (0, 2, 4, 8)},
    **{f"activations skip l2={k}": {"activations": True, "skip_unchanged": True,
                                    "lambda_log2": k} for k in (-4, 0, 2, 4, 8)},
    **{f"data_free wt l2={k}": {"activations": False, "weighted_targets": True,
                                "lambda_log2": k} for k in (-4, 0, 2, 4)},
    **{f"activations skip wt l2={k}": {"activations": True, "skip_unchanged": True,
                                       "weighted_targets": True, "lambda_log2": k}
       for k in (-4, 0, 2, 4)},
    # per module kind: the fit in one kind, (near) the anchor in the other
    **{f"{g} attn l2={a} mlp l2={m}": {
        "activations": g != "data_free", "skip_unchanged": g == "activations skip",
        "lambda_log2": [{"filter": "self_attn", "value": a}, {"filter": "mlp", "value": m},
                        {"value": 8}]}
       for g in ("data_free", "activations skip") for a, m in ((-4, 8), (8, -4), (0, 8), (8, 0))},
    # attention of the lower / upper two layers (the hard zoo's 4 layers) apart
    **{f"{g} attn 0-1 l2={lo} attn 2-3 l2={up}": {
        "activations": g != "data_free", "skip_unchanged": g == "activations skip",
        "lambda_log2": [*({"filter": f"layers.{i}.self_attn", "value": lo} for i in (0, 1)),
                        *({"filter": f"layers.{i}.self_attn", "value": up} for i in (2, 3)),
                        {"value": 8}]}
       for g in ("data_free", "activations skip") for lo, up in ((-4, 8), (8, -4), (0, 8))},
    # RegMean's off-diagonal shrink inside the fit
    **{f"activations skip alpha={a} l2={k}": {"activations": True, "skip_unchanged": True,
                                              "alpha": a, "lambda_log2": k}
       for a, k in ((0.9, 0), (0.5, 0), (0.1, 0), (0.5, -4))},
    # every source's Gram to mean eigenvalue 1 (its say is its weight)
    **{f"activations skip gram_norm l2={k}": {"activations": True, "skip_unchanged": True,
                                              "gram_norm": True, "lambda_log2": k}
       for k in (-4, 0, 4)},
    # Grams from other calibration sets (GRAM_SETS)
    **{f"activations skip {g} l2={k}": {"activations": True, "skip_unchanged": True,
                                        "grams": g, "lambda_log2": k}
       for g in GRAM_SETS[1:] for k in (-4, 0, 4)},
    # a TIES anchor (density 0.5; at l2=8 TIES itself)
    **{f"activations skip ties l2={k}": {"activations": True, "skip_unchanged": True,
                                         "ties": True, "density": 0.5, "lambda_log2": k}
       for k in (0, 4, 8)},
    # the anchor alone: task arithmetic at the point, as BMM (for its scale multiples)
    "anchor only": {"activations": False, "lambda_log2": 30},
}
#: The point's scale times these (``VARIANTS[...]["scale_times"]``): where the sources' input
#: directions overlap the fit averages their task vectors where task arithmetic adds them,
#: so at task arithmetic's scale the fit takes a smaller step; the search tunes the scale.
SCALE_TIMES = (1.25, 1.5, 1.75, 2.0)
VARIANTS |= {f"{name} scale x{t}": VARIANTS[name] | {"scale_times": t}
             for name in ("anchor only", "data_free l2=0", "activations skip l2=-4",
                          "activations skip l2=0", "activations skip l2=4",
                          "activations skip gram_norm l2=-4", "activations skip anchor l2=-4",
                          "activations skip in_merge l2=-4", "activations skip ties l2=0")
             for t in SCALE_TIMES}


def as_bmm(recipe: dict, options: dict) -> dict:
    """A task-arithmetic recipe as BMM's: the same weights, its lambda as BMM's scale
    (times ``options["scale_times"]`` where given: the activation fit averages the task
    vectors in a direction where task arithmetic adds them)."""
    times = options.get("scale_times", 1.0)
    bmm = {k: v for k, v in options.items() if k not in ("grams", "scale_times")}
    params = dict(recipe["parameters"])
    lam = params.pop("lambda", 1.0)
    params["scale"] = [dict(e, value=e["value"] * times) for e in lam] \
        if isinstance(lam, list) else lam * times
    return recipe | {"method": "bmm", "parameters": params | {"lambda": 1.0} | bmm}


def gram_sets(worker, recipe, names: set[str]) -> dict[str, dict]:
    """The Gram sets ``names`` (but ``own``, the store's) for the sources of ``recipe``,
    collected on ``worker`` (a CalibratingWorker) with the point's merge as anchor."""
    import copy

    import torch

    from mergesearch.execution.calibration import (
        calibration_texts,
        input_grams,
        source_module,
        tokenised_batches,
    )

    out: dict[str, dict] = {}
    refs = [m.model for m in recipe.models]
    anchor = copy.deepcopy(worker.merger.apply(recipe)) if names & {"in_merge", "anchor"} \
        else None
    pool = worker.merger.pool
    for name in names - {"own"}:
        out[name] = {}
        for ref in refs:
            if name == "every_task":
                texts = calibration_texts(worker.evaluator, worker.items_per_task)
                batches = tokenised_batches(worker.tokenizer, texts, worker.batch_size,
                                            worker.merger.device)
                out[name][ref] = input_grams(source_module(worker, ref), batches)[0]
                continue
            model = anchor
            if name == "in_merge":  # the source's own tensors where it changed the base's
                model = copy.deepcopy(anchor)
                with torch.no_grad():
                    for pname, param in model.named_parameters():
                        mine = pool.fetch(ref, pname).to(param)
                        if not torch.equal(mine, pool.fetch(recipe.base, pname).to(param)):
                            param.copy_(mine)
            out[name][ref] = input_grams(model, worker.calibration_batches(ref)[0])[0]
    return out


def at_point(bed: str, seed: int, evaluations: int, work: Path, data: dict,
             variants: list[str]) -> list[tuple[str, Result]]:
    """Score BMM's closed form at the task-arithmetic arm's best point (its run at this
    seed and budget, from ``data``), one worker for every variant (activation Grams are
    collected once per Gram set)."""
    from mergesearch import controller
    from mergesearch.execution import make_worker
    from mergesearch.merging.bmm import INPUT_GRAM
    from mergesearch.recipe import Recipe
    from mergesearch.trial import Candidate

    run = next((r for r in data["runs"] if r["testbed"] == bed and r["arm"] ==
                "task_arithmetic" and r["seed"] == seed and r["evaluations"] == evaluations
                and r.get("recipe")), None)
    if run is None:
        raise SystemExit(f"no task_arithmetic run of {bed} at seed {seed} and {evaluations} "
                         "evaluations with its recipe in --out: run it first")
    bound = controller.BoundExperiment(experiment(bed, "task_arithmetic", seed, 1, work),
                                       progress=False)
    worker = make_worker(bound.worker_spec)
    point = Recipe.from_dict(run["recipe"])
    out = [("task_arithmetic (its best point)", worker.evaluate(
        Candidate(id=0, genome=[], recipe=point)))]
    sets = gram_sets(worker, point, {VARIANTS[v].get("grams", "own") for v in variants})
    context = worker.merger.context
    for i, name in enumerate(variants, 1):
        options = VARIANTS[name]
        recipe = Recipe.from_dict(as_bmm(run["recipe"], options))
        grams = sets.get(options.get("grams", "own"))
        # providing anew drops the context's cached Grams
        context.provide(INPUT_GRAM, worker.calibration.gram if grams is None else
                        lambda source, tensor, g=grams: g[source].get(tensor))
        out.append((name, worker.evaluate(Candidate(id=i, genome=[], recipe=recipe))))
        print(f"{name}: {out[-1][1].values}", file=sys.stderr, flush=True)
    return out


def point_table(rows: list[tuple[str, Result]]) -> str:
    tasks = sorted(rows[0][1].scores)
    lines = ["| merge at the point | mean | " + " | ".join(tasks) + " |",
             "| --- | --- |" + " --- |" * len(tasks)]
    for name, res in rows:
        per = [f"{res.scores[t].get('char_accuracy', float('nan')):.3f}" for t in tasks]
        lines.append(f"| {name} | {res.values.get('mean', float('nan')):.4f} | "
                     + " | ".join(per) + " |")
    return "\n".join(lines) + "\n"


def table(bed: str, runs: list[dict], base: float | None, evaluations: int) -> str:
    lines = [f"### BMM vs task arithmetic: {bed} ({evaluations} evaluations per run, "
             "same GP-BO outer search)", "",
             "| inner merge | best search mean (± std) | seeds | ahead of task_arithmetic "
             "(same seed) | per seed | items scored per run |",
             "| --- | --- | --- | --- | --- | --- |"]
    if base is not None:
        lines.append(f"| uniform merge (reference) | {base:.4f} | - | - | - | 400 |")
    ta = {r["seed"]: r["best"] for r in runs if r["testbed"] == bed
          and r["arm"] == "task_arithmetic" and r["evaluations"] == evaluations}
    for arm in ARMS[bed]:
        rows = sorted((r for r in runs if r["testbed"] == bed and r["arm"] == arm
                       and r["evaluations"] == evaluations), key=lambda r: r["seed"])
        if not rows:
            continue
        vals = [r["best"] for r in rows]
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        cost = statistics.mean(r["cost"] for r in rows)
        paired = [r for r in rows if r["seed"] in ta]
        ahead = "-" if arm == "task_arithmetic" else \
            f"{sum(r['best'] > ta[r['seed']] for r in paired)}/{len(paired)}"
        per = ", ".join(f"{v:.4f}" for v in vals)
        lines.append(f"| {arm} | {statistics.mean(vals):.4f} ± {std:.4f} | {len(vals)} | "
                     f"{ahead} | {per} | {cost:.0f} |")
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
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--point", type=int, metavar="SEED",
                    help="no searches: score BMM's closed form (--variants) at the best point "
                         "of the task-arithmetic run of this seed (in --out)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"with --point, comma-separated, of: {'; '.join(VARIANTS)}")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": [], "uniform": {}}
    if args.point is not None:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            ap.error(f"unknown variants {unknown}; known: {'; '.join(VARIANTS)}")
        for bed in args.testbeds.split(","):
            print(f"### {bed}, seed {args.point}, {args.evaluations} evaluations\n")
            print(point_table(at_point(bed, args.point, args.evaluations, work, data,
                                       variants)))
        return 0
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
