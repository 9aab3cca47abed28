"""Search-loop overhead: what the controller costs per candidate besides merging and scoring.

Runs real searches on the tiny model zoo through ``mergesearch.controller.run`` (experiment
``experiments/zoo/<strategy>.yaml``, run folder and SQLite study in a temp dir) and reports,
per candidate:

* the worker's ``merge`` and ``evaluate`` timings (as stored with each trial);
* the overhead outside the worker: loop wall time minus the worker's time, i.e. ``ask`` +
  ``decode`` + storage writes + ``tell`` + strategy checkpoint, as a share of evaluation
  time (goal: < 5%), also with the merge counted in (ask + merge + record + tell),
  broken down by timers wrapped around ``Strategy.ask/tell/state_dict``,
  ``SearchSpace.decode``, ``TrialStore.add/save_state`` and the cache key
  (the package is not edited: the script wraps these methods);
* candidates per minute end to end (start-up included) and in the loop.

Then, with ``--scale N`` (default 1000), the same loop with an instant stand-in executor
(a synthetic score, correctness vectors of the zoo's size) for N trials per strategy: the
controller's overhead alone, and how it grows with the number of trials recorded.

    python benchmarks/search_overhead.py [--strategy random] [--evaluations 60]
        [--limits 100,full] [--repeats 2] [--scale 1000] [--scale-strategies random,cmaes,tpe]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from mergesearch import controller
from mergesearch.execution.worker import Worker
from mergesearch.experiment import Experiment
from mergesearch.space import SearchSpace
from mergesearch.storage import TrialStore
from mergesearch.strategies.base import Strategy
from mergesearch.trial import Result

ROOT = Path(__file__).resolve().parent.parent

# (owner, attribute, label): what the overhead is made of
OVERHEAD_PARTS = [
    (Strategy, "ask", "strategy.ask"),
    (Strategy, "tell", "strategy.tell"),
    (Strategy, "state_dict", "strategy.state_dict"),
    (SearchSpace, "decode", "space.decode"),
    (TrialStore, "add", "store.add"),
    (TrialStore, "save_state", "store.save_state"),
    (controller, "_key", "cache key"),
]
ONE_OFF = [(TrialStore, "pareto_front", "store.pareto_front")]
WORKER = [(Worker, "evaluate", "worker.evaluate")]


class Timers:
    """Wrap functions with wall-clock timers; only calls made while ``active`` count."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.by_bucket: dict[tuple[str, str], float] = defaultdict(float)
        self.bucket = ""  # e.g. "first" / "last" tenth of a run
        self.active = False
        self._undo = []

    def wrap(self, owner, attr: str, label: str) -> None:
        orig = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)

        @functools.wraps(orig)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                if self.active:
                    took = time.perf_counter() - start
                    self.total[label] += took
                    self.calls[label] += 1
                    self.by_bucket[self.bucket, label] += took

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, orig))

    def __enter__(self):
        for owner, attr, label in OVERHEAD_PARTS + ONE_OFF + WORKER:
            self.wrap(owner, attr, label)
        return self

    def __exit__(self, *exc):
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)


def experiment(strategy: str, out: Path, name: str, overrides: list[str]) -> Experiment:
    return Experiment.load(ROOT / "experiments" / "zoo" / f"{strategy}.yaml",
                           [f"name={name}", f"output={out / name}", *overrides])


def timed_run(exp: Experiment) -> dict:
    """One search through the real controller, with the loop's parts timed."""
    loop_wall = {}
    orig_run = controller.SearchLoop.run

    with Timers() as timers:
        def loop_run(self):
            timers.active = True
            start = time.perf_counter()
            try:
                return orig_run(self)
            finally:
                loop_wall["s"] = time.perf_counter() - start
                timers.active = False

        controller.SearchLoop.run = loop_run
        try:
            start = time.perf_counter()
            summary = controller.run(exp, progress=False)
            total = time.perf_counter() - start
        finally:
            controller.SearchLoop.run = orig_run
    store = TrialStore.open(exp.storage_url, exp.name)
    records = store.trials()
    merge = [r.timings["merge"] for r in records if r.timings]
    evaluate = [r.timings["evaluate"] for r in records if r.timings]
    state_bytes = len(json.dumps(store.load_state()))
    n = summary.evaluated_now
    worker = timers.total["worker.evaluate"]
    loop = loop_wall["s"] - timers.total["store.pareto_front"]
    parts = {label: timers.total[label] for _, _, label in OVERHEAD_PARTS}
    overhead = loop - worker
    parts["other (loop, bookkeeping)"] = overhead - sum(parts.values())
    return {"n": n, "ok": summary.ok, "total": total, "startup": total - loop_wall["s"],
            "loop": loop, "pareto_front": timers.total["store.pareto_front"],
            "worker": worker, "merge": merge, "evaluate": evaluate,
            "worker_other": worker - sum(merge) - sum(evaluate),
            "overhead": overhead, "parts": parts, "state_bytes": state_bytes,
            "best": max(r.values["mean"] for r in records if r.state == "ok")}


def report_real(label: str, runs: list[dict]) -> list[str]:
    lines = []
    for i, r in enumerate(runs, 1):
        n = r["n"]
        ev = statistics.mean(r["evaluate"])
        ev_med = statistics.median(r["evaluate"])
        merge = statistics.mean(r["merge"])
        merge_warm = statistics.median(r["merge"][1:]) if len(r["merge"]) > 1 else merge
        per_trial = r["loop"] / n
        over = r["overhead"] / n
        lines.append(
            f"| {label} | {i} | {n} | {ev:.3f} ({ev_med:.3f}) | {merge:.3f} ({merge_warm:.3f}) | "
            f"{1e3 * over:.1f} | {over / ev:.2%} | {over / ev_med:.2%} | "
            f"{(over + merge_warm) / ev_med:.2%} | {over / per_trial:.2%} | "
            f"{60 * n / r['total']:.1f} | {60 * n / r['loop']:.1f} | {r['startup']:.1f} |")
    return lines


def report_parts(label: str, runs: list[dict]) -> list[str]:
    lines = []
    names = list(runs[0]["parts"])
    for name in names:
        per = [1e3 * r["parts"][name] / r["n"] for r in runs]
        share = [r["parts"][name] / r["overhead"] for r in runs]
        lines.append(f"| {label} | {name} | {' / '.join(f'{p:.2f}' for p in per)} | "
                     f"{' / '.join(f'{s:.0%}' for s in share)} |")
    return lines


# -- the controller alone, at scale -----------------------------------------------------


class InstantExecutor:
    """Returns a synthetic result at once: a smooth score of the genome, and correctness
    vectors of the zoo's size (4 tasks x ``items``), so storage writes as much as for real."""

    slots = 1

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.queue = []

    @property
    def free(self) -> int:
        return self.slots - len(self.queue)

    def submit(self, cand) -> None:
        self.queue.append(cand)

    def wait(self) -> list[Result]:
        cand = self.queue.pop(0)
        g = np.asarray(cand.genome)
        score = float(0.75 - np.mean((g - 0.6) ** 2))
        rng = np.random.default_rng(cand.id)
        tasks = ("zoo_dup", "zoo_evn", "zoo_rev", "zoo_srt")
        return [Result(candidate_id=cand.id, values={"mean": score},
                       scores={t: {"char_accuracy": score, "answer_logprob": -1.0,
                                   "greedy_match": 0.2} for t in tasks},
                       correct={t: list(rng.random(self.n_items) < 0.2) for t in tasks},
                       timings={"merge": 0.0, "evaluate": 0.0})]

    def close(self) -> None:
        self.queue.clear()


def scale_run(strategy: str, out: Path, n: int, items: int) -> dict:
    exp = experiment(strategy, out, f"scale-{strategy}", [f"budget.evaluations={n}"])
    search = controller.BoundExperiment(exp, progress=False)
    store = search.open_store(resume=None, overwrite=True)
    stamps = []
    orig_take = controller.SearchLoop._take

    tenth = max(1, n // 10)

    def take(self, *args, **kw):
        orig_take(self, *args, **kw)
        stamps.append(time.perf_counter())
        done = len(stamps)
        timers.bucket = "first" if done < tenth else "last" if done >= n - tenth else ""

    with Timers() as timers:
        timers.bucket = "first"
        controller.SearchLoop._take = take
        timers.active = True
        try:
            start = time.perf_counter()
            controller.SearchLoop(search, store, InstantExecutor(items), False, None).run()
        finally:
            controller.SearchLoop._take = orig_take
            timers.active = False
    per_trial = np.diff([start, *stamps])
    state_bytes = len(json.dumps(store.load_state()))
    resume_start = time.perf_counter()
    # a fresh strategy, then replay
    replay = controller.BoundExperiment(exp, progress=False).strategy
    replay.load_state_dict(store.load_state())
    resume = time.perf_counter() - resume_start
    return {"n": n, "first": float(np.mean(per_trial[:tenth])),
            "last": float(np.mean(per_trial[-tenth:])), "mean": float(np.mean(per_trial)),
            "parts": {label: timers.total[label] / n for _, _, label in OVERHEAD_PARTS},
            "growth": {label: (timers.by_bucket["last", label] - timers.by_bucket["first", label])
                       / tenth for _, _, label in OVERHEAD_PARTS},
            "state_bytes": state_bytes, "replay": resume}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="random", help="experiments/zoo/<name>.yaml")
    parser.add_argument("--evaluations", type=int, default=60)
    parser.add_argument("--limits", default="100,full",
                        help="items per skill, comma-separated; 'full' = every item (200)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scale", type=int, default=1000,
                        help="trials per strategy with the instant executor (0: skip)")
    parser.add_argument("--scale-strategies", default="random,cmaes,tpe")
    parser.add_argument("--tmp", default=None, help="parent folder of the temp dir")
    args = parser.parse_args()

    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; strategy {args.strategy}, {args.evaluations} evaluations")
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="search-overhead-") as tmp:
        out = Path(tmp)
        real: dict[str, list[dict]] = {}
        for limit in args.limits.split(","):
            label = "full (200)" if limit == "full" else limit
            value = "null" if limit == "full" else limit
            for rep in range(args.repeats):
                exp = experiment(args.strategy, out, f"overhead-{limit}-{rep}",
                                 [f"budget.evaluations={args.evaluations}",
                                  f"evaluator.limit={value}"])
                r = timed_run(exp)
                real.setdefault(label, []).append(r)
                print(f"limit {label} run {rep + 1}: {r['n']} trials in {r['total']:.1f} s "
                      f"(loop {r['loop']:.1f} s, worker {r['worker']:.1f} s, overhead "
                      f"{r['overhead']:.2f} s), best {r['best']:.4f}", flush=True)

        print("\nPer candidate (s); evaluate and merge: mean (median; merge median without "
              "the first, compiling candidate); overhead = loop wall - worker time:\n")
        print("| limit | run | trials | evaluate s | merge s | overhead ms | of mean evaluate "
              "| of median evaluate | with merge, of median evaluate | of loop wall "
              "| cand/min end to end | cand/min in loop | start-up s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for label, runs in real.items():
            print("\n".join(report_real(label, runs)))
        print("\nOverhead by part, ms per candidate (run 1 / run 2 ...) and share of the "
              "overhead:\n")
        print("| limit | part | ms per candidate | share |")
        print("|---|---|---|---|")
        for label, runs in real.items():
            print("\n".join(report_parts(label, runs)))
        for label, runs in real.items():
            print(f"limit {label}: strategy state {runs[0]['state_bytes'] / 1e3:.1f} kB after "
                  f"{runs[0]['n']} trials; pareto_front at the end "
                  f"{1e3 * statistics.mean(r['pareto_front'] for r in runs):.0f} ms; worker "
                  f"time outside merge+evaluate "
                  f"{1e3 * statistics.mean(r['worker_other'] / r['n'] for r in runs):.2f} ms "
                  "per candidate")

        if args.scale:
            print(f"\nController alone (instant executor), {args.scale} trials per strategy, "
                  "ms per trial:\n")
            rows = []
            for name in args.scale_strategies.split(","):
                r = scale_run(name, out, args.scale, 100)
                rows.append((name, r))
                print(f"{name}: done, {r['mean'] * 1e3:.1f} ms per trial", flush=True)
            print()
            parts = list(rows[0][1]["parts"])
            print("| strategy | mean | first 10% | last 10% | "
                  + " | ".join(parts) + " | state kB | replay s |")
            print("|---|---|---|---|" + "---|" * len(parts) + "---|---|")
            for name, r in rows:
                print(f"| {name} | {1e3 * r['mean']:.1f} | {1e3 * r['first']:.1f} | "
                      f"{1e3 * r['last']:.1f} | "
                      + " | ".join(f"{1e3 * r['parts'][p]:.2f}" for p in parts)
                      + f" | {r['state_bytes'] / 1e3:.0f} | {r['replay']:.1f} |")
            print("\nGrowth from the first to the last tenth of the trials, ms per trial, "
                  "by part:\n")
            print("| strategy | last - first 10% | " + " | ".join(parts) + " |")
            print("|---|---|" + "---|" * len(parts))
            for name, r in rows:
                print(f"| {name} | {1e3 * (r['last'] - r['first']):.1f} | "
                      + " | ".join(f"{1e3 * r['growth'][p]:+.2f}" for p in parts) + " |")


if __name__ == "__main__":
    main()
