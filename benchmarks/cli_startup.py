"""Command-line start-up: how long `mergesearch status / strategies / --help` take in a fresh
interpreter, against importing torch alone (what they used to pay before doing anything).

    python benchmarks/cli_startup.py [--experiment experiments/toy.yaml] [--repeats 5]

`status` needs a study: run the experiment once first (`mergesearch run EXP`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seconds(args: list[str], repeats: int) -> float:
    """Median wall time of ``python ARGS`` over ``repeats`` fresh processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/toy.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch = seconds(["-c", "import torch, transformers"], args.repeats)
    rows = {"--help": ["-m", "mergesearch.cli", "--help"],
            "strategies": ["-m", "mergesearch.cli", "strategies"],
            f"status {args.experiment}": ["-m", "mergesearch.cli", "status", args.experiment],
            f"pareto {args.experiment}": ["-m", "mergesearch.cli", "pareto", args.experiment]}
    print(f"import torch, transformers: {torch:.2f} s (median of {args.repeats})\n")
    print("| command | s | of importing torch + transformers |")
    print("|---|---|---|")
    for label, argv in rows.items():
        s = seconds(argv, args.repeats)
        print(f"| `mergesearch {label}` | {s:.2f} | {s / torch:.2f}x |")


if __name__ == "__main__":
    main()
