"""Controller overhead per candidate and merge time, before and after a change, in one run.

Checks out a earlier commit (``--before``, default: the commit before the durable-loop and
core-contract work) into a temporary worktree, then runs the same zoo search with each
tree in turn (alternating, ``--repeats`` times, each in a fresh process with that tree on
``PYTHONPATH``): ``experiments/zoo/random.yaml`` with ``limit`` items per skill.  Per
candidate it reports the worker's merge and evaluate times (as stored with each trial)
and the overhead outside the worker (loop wall time minus the worker's time: ask,
decode, the trial write, tell, the checkpoint), then the ratios after / before.

    python benchmarks/contracts_overhead.py [--before 17e9ff3] [--evaluations 60]
        [--limit 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, statistics, sys, tempfile, time
from pathlib import Path
from mergesearch.controller import run
from mergesearch.experiment import Experiment
from mergesearch.storage import TrialStore

root, evaluations, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with tempfile.TemporaryDirectory() as tmp:
    exp = Experiment.load(f"{root}/experiments/zoo/random.yaml", [
        f"budget.evaluations={evaluations}", f"evaluator.limit={limit}",
        f"output={tmp}/run", "name=overhead"])
    summary = run(exp, progress=False)
    trials = TrialStore.open(exp.storage_url, "overhead").trials()
    merge = [t.timings["merge"] for t in trials if t.timings]
    evaluate = [t.timings["evaluate"] for t in trials if t.timings]
    print(json.dumps({"n": len(trials), "elapsed": summary.elapsed, "merge": merge,
                      "evaluate": evaluate}))
"""


def measure(tree: Path, evaluations: int, limit: int) -> dict:
    env = os.environ | {"PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(tree), str(evaluations), str(limit)],
                         cwd=tree, env=env, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    worker = sum(data["merge"]) + sum(data["evaluate"])
    data["overhead_ms"] = 1000 * (data["elapsed"] - worker) / data["n"]
    data["evaluate_median"] = statistics.median(data["evaluate"])
    data["merge_median"] = statistics.median(data["merge"][1:])  # the first one plans
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="17e9ff3")
    parser.add_argument("--evaluations", type=int, default=60)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(before), args.before],
                       cwd=ROOT, check=True)
        try:
            rows = []
            for k in range(args.repeats):
                for label, tree in (("before", before), ("after", ROOT)):
                    m = measure(tree, args.evaluations, args.limit)
                    rows.append((label, k + 1, m))
                    print(f"{label:6} run {k + 1}: overhead {m['overhead_ms']:.1f} ms per "
                          f"candidate = {100 * m['overhead_ms'] / 1000 / m['evaluate_median']:.1f}"
                          f"% of the median evaluate ({1000 * m['evaluate_median']:.0f} ms); "
                          f"merge median {1000 * m['merge_median']:.1f} ms", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT)
    mean = {lab: {key: statistics.mean(m[key] for label, _, m in rows if label == lab)
                  for key in ("overhead_ms", "merge_median", "evaluate_median")}
            for lab in ("before", "after")}
    a, b = mean["after"], mean["before"]
    print(f"\nafter / before: overhead {a['overhead_ms'] / b['overhead_ms']:.2f}x, "
          f"merge {a['merge_median'] / b['merge_median']:.2f}x, "
          f"evaluate {a['evaluate_median'] / b['evaluate_median']:.2f}x")
    share = 100 * mean["after"]["overhead_ms"] / 1000 / mean["after"]["evaluate_median"]
    print(f"overhead after: {mean['after']['overhead_ms']:.1f} ms per candidate, {share:.1f}% of "
          f"the median evaluate at limit {args.limit} (goal < 5%)")


if __name__ == "__main__":
    main()
