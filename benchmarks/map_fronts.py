"""MAP's predicted Pareto fronts against the real ones, on the zoo and the hard zoo.

Cases (``--cases``):

* ``zoo2``: experts rev and srt, objectives their two skills; ground truth: a dense grid of
  real evaluations over both weights (``--grid2`` points a side, 21 by default).
* ``zoo3``: experts rev, srt and dup, their three skills; grid ``--grid3`` points a side.
* ``nested``: all four zoo experts, four skills: nested MAP (no grid: four dimensions).
* ``hard``: the hard zoo (7 sources, one weight each in [-0.5, 1.5]), four skills: MAP
  (its front searched over the whole bounds and in the design box), Bayesian MAP at a
  smaller budget (``max_dims: 7``) and nested MAP (no grid: seven dimensions).

For ``zoo2`` and ``zoo3``, MAP (its (N+1)(N+2) design, then one round of ``--front``
validated front points) and Bayesian MAP (one point per coefficient, a quarter as many
adaptive points, the same validation) are each driven by ask/tell with a scorer that is the
experiment's own worker.  Figures per run:

* evaluations it used;
* IGD of the predicted front (NSGA-III on the surrogates, no evaluation) to the grid's true
  front, in objective values (pymoo's IGD);
* HV ratio: the hypervolume of the validated front points *evaluated for real* over the
  hypervolume of the grid's true front (reference point: the worst grid value of each
  objective); and the same for every point the run evaluated;
* the mean absolute error of the predicted against the actual values at the validated
  points.

Grid evaluations are cached (JSON, by genome) under ``--cache`` so a rerun is cheap.
Prints one markdown table for RESULTS.md on stdout; progress on stderr.

    python benchmarks/map_fronts.py [--cases zoo2,zoo3,nested,hard] [--grid2 21]
        [--grid3 7] [--limit 50] [--front 8] [--cache /tmp/map_fronts] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ("rev", "srt", "dup", "evn")
HARD = ("rot", "inc", "pos", "rvp")


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


class Scorer:
    """An experiment's worker scoring genomes, with a JSON cache by genome."""

    def __init__(self, file: str, overrides: list[str], cache: Path, tag: str):
        import mergesearch.strategies.map  # noqa: F401  (until it is registered)
        from mergesearch import controller
        from mergesearch.experiment import Experiment

        exp = Experiment.load(ROOT / file, [*overrides, f"output={cache / 'scratch' / tag}"])
        self.bound = controller.BoundExperiment(exp, progress=False)
        self.problem = self.bound.problem
        self.names = [o.name for o in self.problem.objectives]
        self.worker = self.bound.make_executor().worker
        self.path = cache / f"{tag}.json"
        self.cache: dict[str, list[float]] = (json.loads(self.path.read_text())
                                              if self.path.exists() else {})
        self.calls = 0

    def __call__(self, genome) -> np.ndarray:
        from mergesearch.trial import Candidate

        key = json.dumps([round(float(g), 9) for g in genome])
        if key not in self.cache:
            self.calls += 1
            genome = [float(g) for g in genome]
            result = self.worker.evaluate(Candidate(id=self.calls, genome=genome,
                                                    recipe=self.bound.space.decode(genome)))
            if not result.ok:
                raise RuntimeError(f"scoring {genome} failed: {result.reason}")
            self.cache[key] = [float(result.values[n]) for n in self.names]
            if self.calls % 20 == 0:
                self.save()
        return np.array(self.cache[key])

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache))
        tmp.replace(self.path)


def non_dominated(values: np.ndarray) -> np.ndarray:
    """The rows no other row beats on every objective (maximised)."""
    values = np.unique(np.asarray(values, dtype=float), axis=0)
    keep = [not np.any(np.all(values >= v, axis=1) & np.any(values > v, axis=1))
            for v in values]
    return values[keep]


def drive(strategy, score, budget: int) -> list[tuple[object, np.ndarray]]:
    """Ask/tell until ``budget`` evaluations, rounds whole."""
    from mergesearch.trial import Result

    history = []
    while len(history) < budget:
        cands = strategy.ask(budget - len(history))
        if not cands:
            break
        told = [(c, score(c.genome)) for c in cands]
        names = [o.name for o in strategy.problem.objectives]
        strategy.tell([Result(c.id, dict(zip(names, map(float, v), strict=True)))
                       for c, v in told])
        history += told
    return history


def front_figures(history, strategy, truth: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from pymoo.indicators.hv import HV
    from pymoo.indicators.igd import IGD

    hv = HV(ref_point=-ref)  # minimisation: negate maximised values
    true_hv = hv(-truth)
    predicted = np.array(strategy.fronts[-1]["predicted"])
    validated = [(c, v) for c, v in history if c.meta.get("phase") == "front"]
    actual = np.array([v for _, v in validated])
    names = [o.name for o in strategy.problem.objectives]
    err = np.array([[abs(c.meta["predicted"][n] - v[i]) for i, n in enumerate(names)]
                    for c, v in validated])
    every = np.array([v for _, v in history])
    return {"evaluations": len(history), "igd": float(IGD(-truth)(-predicted)),
            "hv_validated": float(hv(-non_dominated(actual)) / true_hv),
            "hv_all": float(hv(-non_dominated(every)) / true_hv),
            "mae": float(err.mean()), "true_hv": float(true_hv)}


def grid_case(tag: str, skills: tuple[str, ...], side: int, args) -> list[dict]:
    from mergesearch.strategies import create_strategy
    from mergesearch.strategies.map_surrogate import n_coefficients

    sources = "{" + ", ".join(f"{s}: zoo:{s}" for s in skills) + "}"
    objectives = "[" + ", ".join(f"{{name: {s}, tasks: [zoo_{s}], metric: char_accuracy}}"
                                 for s in skills) + "]"
    score = Scorer("experiments/zoo/map.yaml",
                   [f"models.sources={sources}", f"evaluator.objectives={objectives}",
                    f"evaluator.limit={args.limit}"], args.cache, f"{tag}-l{args.limit}")
    n = len(skills)
    axis = np.linspace(0.0, 1.0, side)
    grid = list(itertools.product(axis, repeat=n))
    start = time.monotonic()
    values = np.array([score(g) for g in grid])
    score.save()
    log(f"{tag}: grid of {len(grid)} scored ({score.calls} new, "
        f"{time.monotonic() - start:.0f} s)")
    truth = non_dominated(values)
    ref = values.min(axis=0)
    rows = []
    p = n_coefficients(n)
    runs = {"map": ({"front_points": args.front}, 2 * p + args.front),
            "bayesian_map": ({"design": p, "adaptive": max(1, p // 4), "batch": 4,
                              "front_points": args.front}, p + max(1, p // 4) + args.front)}
    for name, (options, budget) in runs.items():
        s = create_strategy(name, score.problem, options, seed=args.seed)
        history = drive(s, score, budget)
        score.save()
        fig = front_figures(history, s, truth, ref)
        fig |= {"case": tag, "strategy": name, "grid": len(grid), "front_size": len(truth)}
        best = max(history, key=lambda h: float(np.mean(h[1])))
        fig["best_mean"] = float(np.mean(best[1]))
        fig["grid_best_mean"] = float(values.mean(axis=1).max())
        log(f"{tag} {name}: {fig}")
        rows.append(fig)
    return rows


def nested_case(args) -> list[dict]:
    from mergesearch.strategies import create_strategy

    score = Scorer("experiments/zoo/nested_map.yaml", [f"evaluator.limit={args.limit}"],
                   args.cache, f"nested-l{args.limit}")
    rows = []
    for name, options, budget in (("nested_map", {"front_points": 3}, 4 + 3 * 13),
                                  ("map", {"front_points": args.front}, 30 + args.front)):
        s = create_strategy(name, score.problem, options, seed=args.seed)
        history = drive(s, score, budget)
        score.save()
        rows.append(summary("zoo4", name, s, history, score))
    return rows


def summary(case: str, name: str, s, history, score: Scorer) -> dict:
    """A run without a grid: its best mean, the uniform merge's, predicted-vs-actual error."""
    names = score.names
    validated = [(c, v) for c, v in history if c.meta.get("phase") == "front"]
    err = [abs(c.meta["predicted"][n] - v[i]) for c, v in validated
           for i, n in enumerate(names) if n in c.meta["predicted"]]
    best = max(history, key=lambda h: float(np.mean(h[1])))
    uniform = score(score.problem.x0)
    row = {"case": case, "strategy": name, "evaluations": len(history),
           "best_mean": float(np.mean(best[1])), "uniform_mean": float(np.mean(uniform)),
           "mae": float(np.mean(err)) if err else float("nan"),
           "best_genome": [round(float(g), 3) for g in best[0].genome]}
    if getattr(s, "merges", None):
        row["merges"] = [m["pair"] for m in s.merges]
    log(f"{case} {name}: {row}")
    return row


def hard_case(args) -> list[dict]:
    from mergesearch.strategies import create_strategy
    from mergesearch.strategies.map_surrogate import n_coefficients

    score = Scorer("experiments/hard/map.yaml", [], args.cache, "hard")
    rows = []
    for box in ("bounds", "design"):  # the front over [-0.5, 1.5]^7, or the design's [0, 1]^7
        s = create_strategy("map", score.problem, {"front_points": args.front,
                                                   "front_box": box}, seed=args.seed)
        history = drive(s, score, 72 + args.front)
        score.save()
        rows.append(summary("hard7", f"map (front_box {box})", s, history, score))
    # Bayesian MAP at a smaller budget (7 dimensions: over its default max_dims of 6), and
    # nested MAP (7 experts alone, then 6 pairwise merges of 13 evaluations each)
    p = n_coefficients(7)
    for name, options, budget in (
            ("bayesian_map", {"design": p, "adaptive": p // 4, "batch": 4,
                              "front_points": args.front, "front_box": "design",
                              "max_dims": 7}, p + p // 4 + args.front),
            ("nested_map", {"front_points": 3}, 7 + 6 * 13)):
        s = create_strategy(name, score.problem, options, seed=args.seed)
        history = drive(s, score, budget)
        score.save()
        rows.append(summary("hard7", name, s, history, score))
    return rows


def _cell(row: dict, key: str, digits: int = 3) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "-"


def table(rows: list[dict]) -> str:
    out = ["| case | strategy | evaluations | grid (true front) | IGD predicted front | "
           "HV ratio, validated points | HV ratio, all evaluated | predicted-vs-actual MAE | "
           "best mean (grid best / uniform) |", "|" + "---|" * 9]
    for r in rows:
        grid = f"{r['grid']} ({r['front_size']})" if "grid" in r else "-"
        ref = (f" / grid {r['grid_best_mean']:.3f}" if "grid_best_mean" in r
               else f" / uniform {r['uniform_mean']:.3f}")
        out.append(f"| {r['case']} | {r['strategy']} | {r['evaluations']} | {grid} | "
                   f"{_cell(r, 'igd', 4)} | {_cell(r, 'hv_validated')} | "
                   f"{_cell(r, 'hv_all')} | "
                   f"{r['mae']:.3f} | "
                   f"{r['best_mean']:.3f}{ref} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="zoo2,zoo3,nested,hard")
    parser.add_argument("--grid2", type=int, default=21)
    parser.add_argument("--grid3", type=int, default=7)
    parser.add_argument("--limit", type=int, default=50, help="items per zoo skill")
    parser.add_argument("--front", type=int, default=8, help="validated front points")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/map_fronts"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for case in args.cases.split(","):
        if case == "zoo2":
            rows += grid_case("zoo2", SKILLS[:2], args.grid2, args)
        elif case == "zoo3":
            rows += grid_case("zoo3", SKILLS[:3], args.grid3, args)
        elif case == "nested":
            rows += nested_case(args)
        elif case == "hard":
            rows += hard_case(args)
        else:
            parser.error(f"unknown case {case!r}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
