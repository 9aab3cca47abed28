"""Items per second on the zoo for the three evaluator backends, the same items, the same
candidates, one run: ``hf`` (our loop over the resident module), ``vllm`` (the candidate
merged inside a running vLLM engine) and ``lm_eval`` (lm-eval's own task code through
HFLM on the resident module).

All three run as workers (:class:`~mergesearch.execution.worker.Worker`) in this process
on the same evaluator settings: the zoo suite (``evaluators/zoo``, its four skills),
``--limit`` items per skill (the same seeded subset on every backend), objectives
``char_accuracy`` (teacher-forced) and ``exact_match`` (greedy generation, up to 12 new
tokens), batch ``--batch-size``. The candidates are task-arithmetic merges of the four
experts with seeded random weights; each candidate is scored by hf, then vllm, then
lm_eval before the next one, so the backends see the same machine load. Per candidate and
backend: the merge (in place for hf and lm_eval; vLLM's swap plus its cache reset) and the
evaluation seconds, the item ids scored and the per-item correctness, checked against
hf's. The first candidate pays one-off costs (compiles, lm-eval's first requests), so the
figures are medians over candidates 2 onwards.

It needs vllm and lm-eval in one interpreter: the vLLM venv (``bash scripts/vllm_env.sh``,
which installs lm-eval there too). ``--backends hf,lm_eval`` runs without vllm.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/backends.py [--candidates 5]
        [--limit 50] [--batch-size 64] [--backends hf,vllm,lm_eval]
        [--out /tmp/backends.json] [--report]

Prints a markdown section for benchmarks/RESULTS.md (also written next to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = {"enforce_eager": True, "max_model_len": 64}
BACKENDS = ("hf", "vllm", "lm_eval")


def candidates(zoo, n: int, seed: int = 0) -> list[dict]:
    """``n`` task-arithmetic recipes over the zoo's four experts, seeded weights."""
    rng = random.Random(seed)
    return [{"method": "task_arithmetic", "base": str(zoo.model_path("base")),
             "models": [{"model": str(zoo.model_path(s)),
                         "parameters": {"weight": round(rng.uniform(0.2, 1.0), 3)}}
                        for s in ("rev", "srt", "dup", "evn")]} for _ in range(n)]


def evaluator_config(backend: str, limit: int, batch_size: int) -> dict:
    """The same evaluator on every backend (lm_eval: the zoo group from the same folder)."""
    zoo = str(ROOT / "evaluators" / "zoo")
    config = {"backend": backend, "suite": zoo, "limit": limit, "batch_size": batch_size,
              "objectives": [{"name": "chars", "metric": "char_accuracy"},
                             {"name": "em", "metric": "exact_match"}]}
    if backend == "vllm":
        config["vllm"] = {"engine": ENGINE}
    if backend == "lm_eval":
        config["lm_eval"] = {"tasks": ["zoo"]}
    return config


def run(backends: list[str], n: int, limit: int, batch_size: int) -> dict:
    import torch

    from mergesearch.execution.worker import WorkerSpec, make_worker
    from mergesearch.recipe import Recipe
    from mergesearch.trial import Candidate
    from mergesearch.zoo import build_zoo

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="backends_bench_"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    zoo = build_zoo(progress=False)
    recipes = candidates(zoo, n)
    out: dict = {"backends": backends, "candidates": n, "limit": limit,
                 "batch_size": batch_size, "threads": torch.get_num_threads(), "start": {},
                 "rows": [], "versions": {"torch": torch.__version__}}
    workers = {}
    for name in backends:
        t0 = time.perf_counter()
        workers[name] = make_worker(WorkerSpec(
            tokenizer=str(zoo.model_path("base")), check_recipe=recipes[0],
            evaluator=evaluator_config(name, limit, batch_size)))
        out["start"][name] = time.perf_counter() - t0
        print(f"{name}: worker started in {out['start'][name]:.1f} s", file=sys.stderr,
              flush=True)
    if "vllm" in workers:
        out["versions"]["vllm"] = workers["vllm"].evaluator.vllm_version
    if "lm_eval" in workers:
        import lm_eval

        out["versions"]["lm_eval"] = getattr(lm_eval, "__version__", "?")
    for i, recipe in enumerate(recipes):
        cand = Candidate(i, None, recipe=Recipe.from_dict(recipe))
        results = {name: w.evaluate(cand) for name, w in workers.items()}
        bad = {name: r.reason for name, r in results.items() if not r.ok}
        if bad:
            raise SystemExit(f"candidate {i} failed: {bad}")
        ref = results[backends[0]]
        row = {name: {"items": r.cost, "merge": r.timings.get("merge", 0.0),
                      "evaluate": r.timings["evaluate"], "values": dict(r.values),
                      "same_items": r.items == ref.items,
                      "same_correct": r.correct == ref.correct,
                      "max_diff": max(abs(r.values[k] - ref.values[k]) for k in ref.values)}
               for name, r in results.items()}
        out["rows"].append(row)
        print(json.dumps({n: {k: v for k, v in r.items() if k != "values"}
                          for n, r in row.items()}), file=sys.stderr, flush=True)
    for w in workers.values():
        close = getattr(w.evaluator, "close", None)
        if close is not None:
            close()
    return out


def markdown(res: dict) -> str:
    rows = res["rows"][1:] or res["rows"]
    backends = res["backends"]
    ref = backends[0]

    def med(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rows)

    def rate(name: str) -> list[float]:
        return [r[name]["items"] / r[name]["evaluate"] for r in rows]

    lines = [
        "| backend | items per candidate | items per second (evaluation) | evaluation s per "
        "candidate | merge s per candidate | worker start s | same items as " + ref +
        " | same per-item answers as " + ref + " | max abs value difference vs " + ref + " |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for name in backends:
        ips = rate(name)
        same_items = sum(r[name]["same_items"] for r in res["rows"])
        same_correct = sum(r[name]["same_correct"] for r in res["rows"])
        diff = max(r[name]["max_diff"] for r in res["rows"])
        lines.append(
            f"| {name} | {med(name, 'items'):.0f} | {statistics.median(ips):.1f} "
            f"({min(ips):.1f}-{max(ips):.1f}) | {med(name, 'evaluate'):.2f} | "
            f"{med(name, 'merge'):.3f} | {res['start'][name]:.1f} | "
            f"{same_items}/{len(res['rows'])} | {same_correct}/{len(res['rows'])} | "
            f"{diff:.1e} |")
    hf = statistics.median(rate(ref))
    ratios = ", ".join(f"{name} {statistics.median(rate(name)) / hf:.2f}x"
                       for name in backends if name != ref)
    versions = ", ".join(f"{k} {v}" for k, v in res["versions"].items())
    return "\n".join([
        f"Zoo, 4 skills x {res['limit']} items (the same seeded subset on every backend), "
        "objectives char_accuracy (teacher-forced) and exact_match (greedy generation); "
        f"{res['candidates']} task-arithmetic candidates, each scored by "
        f"{', '.join(backends)} in turn; batch {res['batch_size']}, float32, "
        f"{res['threads']} torch thread(s); {versions}. Medians over candidates 2.. (the "
        "first pays one-off costs), min-max in brackets.", "", *lines, "",
        f"Items per second relative to {ref}: {ratios}."])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated, the first is the reference")
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--limit", type=int, default=50, help="items per skill")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("/tmp/backends.json"))
    parser.add_argument("--report", action="store_true",
                        help="only print the markdown of the results already in --out")
    args = parser.parse_args(argv)
    if args.report:
        res = json.loads(args.out.read_text())
    else:
        backends = args.backends.split(",")
        bad = [b for b in backends if b not in BACKENDS]
        if bad or len(set(backends)) != len(backends):
            print(f"--backends: each of {', '.join(BACKENDS)} at most once, got "
                  f"{args.backends!r}", file=sys.stderr)
            return 2
        if args.candidates < 2 or args.limit < 1:
            print("--candidates must be >= 2 and --limit >= 1", file=sys.stderr)
            return 2
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        res = run(backends, args.candidates, args.limit, args.batch_size)
        args.out.write_text(json.dumps(res, indent=1))
    text = markdown(res)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
