"""Reliability counts for benchmarks/RESULTS.md: kills survived, concurrent writers
refused, bad inputs refused cleanly, trials lost.

* **Kills**: a zoo search run as `mergesearch run` in a subprocess is killed at random
  moments (SIGKILL, or SIGINT as a Ctrl-C) and resumed until it finishes; every series
  must end with exactly the budget, candidate ids 0..budget-1 once each, and the
  strategy state told of exactly the recorded trials.
* **Concurrent writers**: two `mergesearch run` on one new study, started together;
  exactly one may write, the other must exit 2 with one line (its lease refused, or the
  study created under it), and the study must end at the budget.
* **Bad inputs**: the cases of tests/test_bad_inputs.py (each asserts exit 2, one line,
  nothing new on disk), run with pytest and counted.

    python benchmarks/reliability.py [--series 3] [--kills 6] [--pairs 4]
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import completed_count, zoo_experiment  # noqa: E402

from mergesearch.storage import TrialStore  # noqa: E402


def _experiment(folder: Path, budget: int, strategy: str, seed: int) -> tuple[Path, object]:
    exp = zoo_experiment(folder, budget={"evaluations": budget}, evaluator__limit=32,
                         strategy={"name": strategy}, seed=seed)
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json", exclude_none=True)))
    return path, exp


def _run(path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergesearch.cli", "run", str(path), "-q",
                             *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _check(exp, budget: int) -> tuple[bool, int]:
    """Whether the study ended exactly at the budget, and how many trials were lost (told
    to the strategy, per its saved state, but not recorded)."""
    store = TrialStore.open(exp.storage_url, exp.name)
    trials = store.trials()
    ids = sorted(t.candidate_id for t in trials)
    told = {r["id"] for kind, payload, *_ in store.load_state()["log"] if kind == "tell"
            for r in payload}
    lost = len(told - set(ids))
    return ids == list(range(budget)) and len(trials) == budget, lost


def kill_series(folder: Path, rng: random.Random, kills: int, strategy: str,
                seed: int) -> dict:
    budget = 64
    path, exp = _experiment(folder, budget, strategy, seed)
    db = Path(exp.storage_url.removeprefix("sqlite:///"))
    done = sigkills = sigints = 0
    while True:
        proc = _run(path)
        if done < kills:
            # wait for at least one new trial, then kill at a random moment
            before = completed_count(db)
            deadline = time.monotonic() + 120
            while completed_count(db) <= before and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is None:
                sig = signal.SIGINT if rng.random() < 0.3 else signal.SIGKILL
                proc.send_signal(sig)
                proc.wait()
                done += 1
                sigints += sig == signal.SIGINT
                sigkills += sig == signal.SIGKILL
                continue
        err = proc.communicate()[1]
        if proc.returncode != 0:
            raise SystemExit(f"resume failed ({proc.returncode}): {err[-2000:]}")
        break
    exact, lost = _check(exp, budget)
    return {"kills": done, "sigkill": sigkills, "sigint": sigints, "exact": exact,
            "lost": lost}


def writer_pair(folder: Path, seed: int) -> dict:
    budget = 16
    path, exp = _experiment(folder, budget, "random", seed)
    a, b = _run(path), _run(path)
    outs = [(p.wait(), p.communicate()[1]) for p in (a, b)]
    codes = sorted(code for code, _ in outs)
    refused = [err for code, err in outs if code == 2]
    one_line = all(len(err.strip().splitlines()) == 1 for err in refused)
    exact, lost = _check(exp, budget)
    return {"ok": codes == [0, 2] and one_line and exact, "lost": lost,
            "why": [err.strip()[:120] for err in refused]}


def bad_inputs() -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests/test_bad_inputs.py")], cwd=ROOT,
                         capture_output=True, text=True)
    tail = out.stdout.strip().splitlines()[-1]
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", tail)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", tail)) else 0
    return passed + failed, passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=3)
    parser.add_argument("--kills", type=int, default=6, help="kills per series")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    strategies = ["cmaes", "tpe", "random", "nsga2"]
    with tempfile.TemporaryDirectory() as tmp:
        series = []
        for k in range(args.series):
            folder = Path(tmp) / f"series{k}"
            folder.mkdir()
            s = kill_series(folder, rng, args.kills, strategies[k % len(strategies)], k)
            print(f"series {k} ({strategies[k % len(strategies)]}): {s}", flush=True)
            series.append(s)
        pairs = []
        for k in range(args.pairs):
            folder = Path(tmp) / f"pair{k}"
            folder.mkdir()
            p = writer_pair(folder, k)
            print(f"writer pair {k}: {p}", flush=True)
            pairs.append(p)
    tried, refused = bad_inputs()
    kills = sum(s["kills"] for s in series)
    print()
    print(f"kills survived: {kills} ({sum(s['sigkill'] for s in series)} SIGKILL, "
          f"{sum(s['sigint'] for s in series)} SIGINT) in {len(series)} series; "
          f"{sum(s['exact'] for s in series)}/{len(series)} ended exactly at the budget")
    print(f"concurrent writers refused: {sum(p['ok'] for p in pairs)}/{len(pairs)} pairs "
          "(one ran to the budget, the other exited 2 with one line)")
    print(f"bad inputs refused cleanly: {refused}/{tried}")
    print(f"trials lost: {sum(s['lost'] for s in series) + sum(p['lost'] for p in pairs)}")


if __name__ == "__main__":
    main()
