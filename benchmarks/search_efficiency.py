"""Search efficiency: best score found after 25 / 50 / 100 evaluations, per strategy.

Runs each strategy (default ``random``, ``cmaes``, ``tpe``, as configured in
``experiments/zoo/<name>.yaml``) for several seeds through the real controller on the tiny
model zoo: one objective, ``mean`` char accuracy over the four skills, task-arithmetic
weights per expert per group of two layers (``search_spaces/task_arithmetic_layers.yaml``,
8 dimensions), 100 items per skill during the search (the same 100 for every run:
``subset_seed`` 0). Reports the best-so-far score after each budget (mean +- std over
seeds), the uniform merge's score (the space's init point) for reference, and re-scores each
run's final best on all 200 items per skill (and so on the 100 items the search never saw:
``held-out = 2 * full - search``, char accuracy being a mean over items).

Every finished run is appended to a JSON file (default ``/tmp/search_efficiency.json``);
running again with the same file skips the runs already there, so a killed sweep continues.

    python benchmarks/search_efficiency.py [--strategies random,cmaes,tpe] [--seeds 5]
        [--budget 100] [--checkpoints 25,50,100] [--out /tmp/search_efficiency.json]
        [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mergesearch import controller
from mergesearch.experiment import Experiment
from mergesearch.recipe import Recipe
from mergesearch.storage import TrialStore
from mergesearch.trial import Candidate

ROOT = Path(__file__).resolve().parent.parent


def experiment(strategy: str, seed: int, budget: int, out: Path) -> Experiment:
    name = f"eff-{strategy}-{seed}"
    return Experiment.load(ROOT / "experiments" / "zoo" / f"{strategy}.yaml",
                           [f"name={name}", f"output={out / name}", f"seed={seed}",
                            f"budget.evaluations={budget}", "evaluator.limit=100"])


def one_run(strategy: str, seed: int, budget: int, out: Path) -> dict:
    exp = experiment(strategy, seed, budget, out)
    start = time.perf_counter()
    summary = controller.run(exp, progress=False)
    wall = time.perf_counter() - start
    records = sorted(TrialStore.open(exp.storage_url, exp.name).trials(), key=lambda r: r.number)
    values = [r.values["mean"] if r.state == "ok" else float("-inf") for r in records]
    best = int(np.argmax(values))
    return {"strategy": strategy, "seed": seed, "budget": budget, "wall": wall,
            "values": values, "failed": summary.failed, "cached": summary.cached,
            "best_recipe": records[best].recipe, "best_number": best}


class FullScorer:
    """Scores recipes on every item (limit: null) with the controller's own worker."""

    def __init__(self, out: Path):
        exp = Experiment.load(ROOT / "experiments" / "zoo" / "random.yaml",
                              [f"output={out / 'full'}", "evaluator.limit=null"])
        search = controller.BoundExperiment(exp, progress=False)
        self.worker = search.make_executor().worker
        self.x0 = search.space.decode(search.space.x0)
        self.n = 0

    def score(self, recipe: Recipe | dict) -> float:
        if isinstance(recipe, dict):
            recipe = Recipe.from_dict(recipe)
        self.n += 1
        result = self.worker.evaluate(Candidate(id=self.n, genome=[], recipe=recipe))
        return result.values["mean"]


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save(path: Path, runs: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(runs))
    tmp.replace(path)


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="random,cmaes,tpe")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--checkpoints", default="25,50,100")
    parser.add_argument("--out", default="/tmp/search_efficiency.json")
    parser.add_argument("--no-full", action="store_true", help="skip the 200-item re-scoring")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); scores do not depend on it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    checkpoints = [c for c in map(int, args.checkpoints.split(",")) if c <= args.budget]
    strategies = args.strategies.split(",")
    runs = load(out)
    done = {(r["strategy"], r["seed"], r["budget"]) for r in runs}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as tmp:
        # seeds outermost: a sweep cut short still has every strategy at the same seeds
        for seed in range(args.seeds):
            for strategy in strategies:
                if (strategy, seed, args.budget) in done:
                    continue
                run = one_run(strategy, seed, args.budget, Path(tmp))
                runs.append(run)
                save(out, runs)
                v = run["values"]
                print(f"{strategy} seed {seed}: best {max(v):.4f} (trial {run['best_number']}) "
                      f"in {run['wall']:.0f} s, {run['wall'] / len(v):.2f} s/trial, "
                      f"{run['cached']} cached; {time.perf_counter() - started:.0f} s so far",
                      flush=True)
        runs = [r for r in runs if r["budget"] == args.budget and r["strategy"] in strategies
                and r["seed"] < args.seeds]
        if not args.no_full:
            scorer = FullScorer(Path(tmp))
            uniform_full = scorer.score(scorer.x0)
            for r in runs:
                if "full" not in r:
                    r["full"] = scorer.score(r["best_recipe"])
            save(out, _merge(load(out), runs))

    uniform = next((r["values"][0] for r in runs if r["strategy"] == "random"), None)
    print(f"\n{len(runs)} runs; search items: 100 per skill; mean char accuracy "
          "(best so far), mean ± std over seeds:\n")
    head = " | ".join(f"after {c}" for c in checkpoints)
    extra = " | final best on 200 items | on the 100 held-out" if not args.no_full else ""
    print(f"| strategy | seeds | {head}{extra} |")
    print("|---|---|" + "---|" * len(checkpoints) + ("---|---|" if extra else ""))
    for strategy in strategies:
        rs = [r for r in runs if r["strategy"] == strategy]
        if not rs:
            continue
        cells = [fmt([max(r["values"][:c]) for r in rs]) for c in checkpoints]
        if extra:
            full = [r["full"] for r in rs]
            held = [2 * r["full"] - max(r["values"]) for r in rs]
            cells += [fmt(full), fmt(held)]
        print(f"| {strategy} | {len(rs)} | " + " | ".join(cells) + " |")
    if uniform is not None:
        cells = [f"{uniform:.4f}"] + [""] * (len(checkpoints) - 1)
        if not args.no_full:
            cells += [f"{uniform_full:.4f}", f"{2 * uniform_full - uniform:.4f}"]
        print("| uniform merge (init point) | - | " + " | ".join(cells) + " |")
    walls = [r["wall"] / len(r["values"]) for r in runs]
    print(f"\nseconds per trial (controller wall / trials): median {statistics.median(walls):.2f}, "
          f"range {min(walls):.2f}-{max(walls):.2f}; cached trials (identical recipes): "
          f"{sum(r['cached'] for r in runs)}; failed: {sum(r['failed'] for r in runs)}")
    if uniform is not None:
        for strategy in strategies:
            gains = [max(r["values"]) - uniform for r in runs if r["strategy"] == strategy]
            if gains:
                print(f"{strategy}: best after {args.budget} minus the uniform merge (search "
                      f"items): {fmt(gains)}")


def _merge(stored: list[dict], updated: list[dict]) -> list[dict]:
    """The stored runs with the ``full`` scores of ``updated`` filled in."""
    full = {(r["strategy"], r["seed"], r["budget"]): r.get("full") for r in updated}
    for r in stored:
        key = (r["strategy"], r["seed"], r["budget"])
        if full.get(key) is not None:
            r["full"] = full[key]
    return stored


if __name__ == "__main__":
    main()
