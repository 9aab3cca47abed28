"""Ray executor on the zoo: throughput with 1 vs 2 workers, dispatch overhead, memory.

    python benchmarks/ray_throughput.py [--evaluations 40] [--limit 100]

One local Ray cluster (2 CPUs) for the whole run. For each pool size the same
random search runs through the real controller; throughput is measured in the
steady state (first result to last), so actor start-up (importing torch and
loading the models, seconds) is reported apart. Dispatch overhead is the
time per candidate on one worker that the worker itself did not spend merging
and evaluating. Memory: each actor's RSS and USS after start-up and after the
run, against the bytes of the checkpoints it holds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def experiment(out: Path, limit: int, evaluations: int, **execution):
    from mergesearch.experiment import ExecutionConfig, Experiment

    exp = Experiment.load(ROOT / "experiments/zoo/random.yaml", [
        f"budget.evaluations={evaluations}", f"evaluator.limit={limit}", f"output={out}"])
    return exp.model_copy(update={"execution": ExecutionConfig(**execution)})


def measure(out: Path, limit: int, evaluations: int, **execution) -> dict:
    import psutil

    from mergesearch.controller import BoundExperiment, SearchLoop

    exp = experiment(out, limit, evaluations, **execution)
    search = BoundExperiment(exp, progress=False)
    t0 = time.perf_counter()
    executor = search.make_executor()
    started = time.perf_counter() - t0
    pids = [p for p in getattr(executor, "worker_pids", [os.getpid()]) if p]
    mem0 = {p: psutil.Process(p).memory_full_info() for p in pids}
    stamps: list[float] = []
    busy: list[float] = []

    def on_result(result):
        stamps.append(time.perf_counter())
        busy.append(result.timings.get("merge", 0) + result.timings.get("evaluate", 0))

    store = search.open_store(resume=None, overwrite=True)
    loop = SearchLoop(search, store, executor, False, on_result)
    mem1: dict = {}
    close = executor.close

    def close_after_measuring():
        mem1.update({p: psutil.Process(p).memory_full_info() for p in pids})
        close()

    executor.close = close_after_measuring
    loop.run()
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return {"startup_s": started, "s_per_candidate": steady, "per_min": 60 / steady,
            "worker_busy_s": sum(busy) / len(busy), "mem0": mem0, "mem1": mem1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=40)
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MERGESEARCH_COMPILE", "0")
    import ray

    from mergesearch.zoo import build_zoo

    zoo = build_zoo(progress=False)
    held = sum(f.stat().st_size for d in [zoo.base, *zoo.experts.values()]
               for f in Path(d).glob("*.safetensors"))
    tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp / "ray"),
             log_to_driver=False, configure_logging=False)
    rows = {}
    rows["local (in process)"] = measure(tmp / "local", args.limit, args.evaluations,
                                         backend="local")
    for workers, queue in ((1, 0), (2, 0), (2, 1)):
        name = f"ray {workers} worker(s), queue {queue}"
        rows[name] = measure(tmp / name.replace(" ", "_"), args.limit, args.evaluations,
                             backend="ray", workers=workers, queue=queue)
    ray.shutdown()

    one = rows["ray 1 worker(s), queue 0"]
    print(f"zoo, random search, {args.evaluations} candidates, {args.limit} items per skill; "
          f"checkpoints held per worker: {held / 2**20:.1f} MiB (base + 4 experts)")
    print(f"{'executor':28} {'start s':>8} {'s/cand':>8} {'cand/min':>9} {'speed-up':>9}")
    for name, r in rows.items():
        print(f"{name:28} {r['startup_s']:8.1f} {r['s_per_candidate']:8.3f} "
              f"{r['per_min']:9.1f} {one['s_per_candidate'] / r['s_per_candidate']:8.2f}x")
    overhead = one["s_per_candidate"] - one["worker_busy_s"]
    print(f"\ndispatch overhead per candidate (1 worker): {overhead * 1e3:.1f} ms "
          f"({overhead / one['s_per_candidate']:.1%} of the candidate's time)")
    print("\nworker memory (MiB): rss/uss after start-up -> after the run")
    for name, r in rows.items():
        if not name.startswith("ray"):
            continue
        for pid in r["mem0"]:
            a, b = r["mem0"][pid], r["mem1"].get(pid)
            after = f"{b.rss / 2**20:.0f}/{b.uss / 2**20:.0f}" if b else "?"
            print(f"  {name:28} pid {pid}: {a.rss / 2**20:.0f}/{a.uss / 2**20:.0f} -> {after}")


if __name__ == "__main__":
    main()
