"""Frank-Wolfe merging with distractors in the pool: the merge it finds, and the worker's
peak memory while it probes, as the pool grows.

The hard zoo's relevant sources (``rot``, ``inc``, ``pos``, ``flow_a``, ``flow_b``) are
the clean pool; distractors are added in this order: the zoo's own harmful sources
(``anti``, trained to copy the prompt; ``noisy``, the base plus large noise), then noisy
copies of the relevant experts (each tensor plus ``0.5 * std(tensor) * N(0, 1)``: a
fine-tune gone wrong), built on the fly into a temporary folder (never committed).

1. **Robustness**: one ``frank_wolfe`` search (soft, layer granularity, as
   ``experiments/hard/frank_wolfe.yaml``) per pool, 0 / 2 / 4 / 8 distractors, through the
   real controller; the best search-item score, the report-item score of that trial, and
   how much of the final iterate's coefficient mass sits on distractors.
2. **Memory**: for 2 / 4 / 8 distractors, a fresh subprocess builds a worker, merges an
   iterate and answers one gradient-cosine probe over the whole pool (after a warm-up
   probe on another worker).  Measured: the peak *anonymous* resident memory (``RssAnon``
   in ``/proc/self/status``, sampled every 0.2 ms by a thread) above its level just
   before the probe, and that level after it; glibc is told to give freed blocks of 64 KiB
   or more back at once (``MALLOC_MMAP_THRESHOLD_``), so RssAnon follows what is alive.
   Why anonymous memory: on a CPU the sources are memory-mapped safetensors, so every
   page the probe reads counts in RSS as a *file-backed* page (page cache, shared and
   evictable: the pool's size on disk, not memory the worker allocated); gradients,
   activations and the per-tensor task vectors the probe makes are anonymous, and so
   would be sources held in memory.  The "held" column repeats the runs with every source
   tensor copied into memory when first read and kept by the pool (what a pool held on a
   device costs), which shows the measure sees a pool that is held rather than streamed.

    python benchmarks/frank_wolfe.py [--skip-search] [--skip-memory] [--threads 1]
        [--seeds 0,1,2] [--counts 0,2,4,8] [--options JSON] [--out runs.json]

Prints markdown for benchmarks/RESULTS.md on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RELEVANT = ("rot", "inc", "pos", "flow_a", "flow_b")
HARMFUL = ("anti", "noisy")
COUNTS = (2, 4, 8)
NOISE = 0.5
OPTIONS = {"variant": "soft", "granularity": "layer", "iterations": 6, "step_size": 1.0,
           "scaling": 0.5, "soft_trials": 4, "proxy_items": 100}


def noisy_copy(src: Path, dst: Path, noise: float = NOISE, seed: int = 0) -> Path:
    """A copy of the model folder ``src`` with every floating tensor plus
    ``noise * std(tensor) * N(0, 1)`` (seeded): a distractor of the same architecture."""
    import torch
    from safetensors.torch import load_file, save_file

    if (dst / "model.safetensors").exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, x in load_file(str(f)).items():
            if x.is_floating_point():
                x = x + noise * x.float().std() * torch.randn(x.shape, generator=gen)
            tensors[name] = x.contiguous()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(dst)
    return dst


def distractors(zoo, k: int, cache: Path) -> dict[str, str]:
    """``k`` distractors by name: the harmful sources first, then noisy expert copies."""
    out = {name: str(zoo.experts[name]) for name in HARMFUL[:k]}
    for j in range(k - len(out)):
        expert = RELEVANT[j % len(RELEVANT)]
        name = f"{expert}_noisy{j}"
        out[name] = str(noisy_copy(zoo.experts[expert], cache / name, seed=100 + j))
    return out


def pool(zoo, k: int, cache: Path) -> dict[str, str]:
    return {name: str(zoo.experts[name]) for name in RELEVANT} | distractors(zoo, k, cache)


# -- 1. robustness -----------------------------------------------------------------------

def search(zoo, k: int, cache: Path, work: Path, seed: int = 0,
           options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One frank_wolfe search over the clean pool plus ``k`` distractors (``options`` on
    top of :data:`OPTIONS`; the seed draws the soft variant's coefficient candidates)."""
    import yaml

    import mergesearch.strategies.frank_wolfe  # noqa: F401  (registers it)
    from mergesearch import controller
    from mergesearch.experiment import Experiment
    from mergesearch.storage import TrialStore
    from mergesearch.strategies.frank_wolfe import FrankWolfe

    data = yaml.safe_load((ROOT / "experiments/hard/frank_wolfe.yaml").read_text())
    data["models"]["sources"] = pool(zoo, k, cache)
    opts = OPTIONS | (options or {})
    label = option_label(options)
    data["name"] = f"fw-distractors-{k}-s{seed}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    data["seed"] = seed
    data["strategy"] = {"name": "frank_wolfe", "options": opts}
    data["output"] = str(work / data["name"])
    data["space"] = str(ROOT / data["space"])
    for part in ("evaluator", "report"):
        data[part]["suite"] = str(ROOT / data[part]["suite"])
    exp = Experiment.from_dict(data)
    t0 = time.perf_counter()
    summary = controller.run(exp, progress=False)
    wall = time.perf_counter() - t0
    report = controller.score_report(exp, summary)
    store = TrialStore.open(exp.storage_url, summary.study)
    s = FrankWolfe(controller.BoundExperiment(exp, progress=False).problem, opts)
    s.load_state_dict(store.load_state())
    names = list(data["models"]["sources"])
    mass = abs(s.c).sum(axis=1)
    bad = sum(m for n, m in zip(names, mass, strict=True) if n not in RELEVANT)
    best = max(t.values["mean"] for t in store.trials() if t.state == "ok")
    return {"k": k, "seed": seed, "label": label, "best": best,
            "report": report["values"]["mean"] if report else None,
            "distractor_mass": float(bad / max(mass.sum(), 1e-12)), "trials": summary.ok,
            "probes": summary.probes, "wall": wall}


def option_label(options: dict[str, Any] | None) -> str:
    """A short name for the options on top of :data:`OPTIONS` ("default": none)."""
    if not options:
        return "default"
    return ",".join(f"{key}={value}" for key, value in sorted(options.items()))


def robustness_table(searches: list[dict]) -> list[str]:
    """Per oracle setting and pool: mean ± std over seeds of the best search and report
    scores, and the mean margin to the clean pool at the same seeds."""
    import statistics

    def spread(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    lines = ["| oracle options | distractors | seeds | best mean (search) | report mean | "
             "search minus clean, same seed (mean / worst) | distractor share |",
             "|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["label"] for r in searches):
        rows = [r for r in searches if r["label"] == label]
        clean = {r["seed"]: r["best"] for r in rows if r["k"] == 0}
        for k in sorted({r["k"] for r in rows}):
            at = sorted((r for r in rows if r["k"] == k), key=lambda r: r["seed"])
            margins = [r["best"] - clean[r["seed"]] for r in at if r["seed"] in clean]
            margin = (f"{statistics.mean(margins):+.4f} / {min(margins):+.4f}"
                      if margins and k else "-")
            lines.append(f"| {label} | {k} | {len(at)} | {spread([r['best'] for r in at])} | "
                         f"{spread([r['report'] for r in at])} | {margin} | "
                         f"{statistics.mean(r['distractor_mass'] for r in at):.3f} |")
    return lines


# -- 2. memory ---------------------------------------------------------------------------

def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def memory_child(k: int, materialise: bool) -> dict[str, Any]:
    """In a fresh process: a worker over the pool, one iterate merged, one probe answered;
    peak anonymous memory above the level before the probe."""
    import resource
    import threading

    import torch

    from mergesearch.execution import fw_probe
    from mergesearch.execution.fw_probe import PROBE, gradient_cosines
    from mergesearch.execution.worker import Worker, WorkerSpec
    from mergesearch.models import checkpoint
    from mergesearch.recipe import Recipe
    from mergesearch.trial import Candidate
    from mergesearch.zoo.hard import build_hard_zoo

    torch.set_num_threads(1)
    zoo = build_hard_zoo(progress=False)
    cache = Path(os.environ["FW_CACHE"])
    refs = list(pool(zoo, k, cache).values())
    if materialise:  # every source copied into memory and kept: a pool held, not streamed
        read = checkpoint.Checkpoint.tensor
        checkpoint.Checkpoint.tensor = lambda self, name: read(self, name).clone()
        fw_probe.transient_reader = lambda pool, base: pool.fetch

    def make_worker() -> Worker:
        return Worker(WorkerSpec(tokenizer=str(zoo.base), evaluator={
            "suite": str(ROOT / "evaluators/hard/search"),
            "objectives": [{"name": "mean", "metric": "char_accuracy"}]}))

    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": str(zoo.base),
                               "models": [{"model": r, "parameters": {"weight": 0.3}}
                                          for r in refs[:2]]})
    cand = Candidate(id=0, genome=None, kind=PROBE, recipe=recipe,
                     meta={"base": str(zoo.base), "pool": refs, "proxy_items": 100})
    warm = make_worker()  # warm-up on another worker: lazy imports, allocator pools
    gradient_cosines(warm, warm.merger.apply(recipe), cand)
    del warm
    gc.collect()
    worker = make_worker()  # measured: its pool has read only the iterate's sources
    model = worker.merger.apply(recipe)
    before = _rss_anon()
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    payload, _ = gradient_cosines(worker, model, cand)
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    peak[0] = max(peak[0], _rss_anon())
    pool_bytes = sum(f.stat().st_size for r in refs for f in Path(r).glob("*.safetensors"))
    return {"k": k, "materialise": materialise, "sources": len(payload["sources"]),
            "anon_before": before, "anon_peak_delta": peak[0] - before,
            "anon_after": _rss_anon(), "maxrss": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss * 1024, "pool_bytes": pool_bytes,
            "probe_s": wall}


def memory(cache: Path, materialise: bool) -> list[dict[str, Any]]:
    rows = []
    for k in COUNTS:
        # freed blocks go back to the OS at once, so RssAnon follows what is alive
        env = os.environ | {"FW_CACHE": str(cache), "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "1",
                            "MALLOC_MMAP_THRESHOLD_": "65536",
                            "MALLOC_TRIM_THRESHOLD_": "65536"}
        cmd = [sys.executable, __file__, "--memory-child", str(k)]
        if materialise:
            cmd.append("--materialise")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                             timeout=600)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"memory k={k} materialise={materialise}: {rows[-1]}", file=sys.stderr)
    return rows


# -- output ------------------------------------------------------------------------------

def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def markdown(searches: list[dict], streamed: list[dict], held: list[dict]) -> str:
    lines = []
    if searches:
        lines += robustness_table(searches) + [""]
        lines += ["| distractors | seed | oracle options | trials + probes | best mean (search) | "
                  "report mean | distractor share of the final coefficients | s/run |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in searches:
            lines.append(f"| {r['k']} | {r['seed']} | {r['label']} | {r['trials']} + "
                         f"{r['probes']} | {r['best']:.4f} | "
                         f"{r['report']:.4f} | {r['distractor_mass']:.3f} | {r['wall']:.0f} |")
        lines.append("")
    if streamed:
        lines += ["| distractors | sources | pool on disk (MiB) | probe's peak anonymous "
                  "RSS above its start (MiB): streamed / held | anonymous RSS kept after "
                  "the probe (MiB): streamed / held | peak RSS (MiB), streamed | probe s |",
                  "|---|---|---|---|---|---|---|"]
        for a, b in zip(streamed, held or [None] * len(streamed), strict=True):
            lines.append(f"| {a['k']} | {a['sources']} | {mib(a['pool_bytes'])} | "
                         f"{mib(a['anon_peak_delta'])} / "
                         f"{mib(b['anon_peak_delta']) if b else '-'} | "
                         f"{mib(a['anon_after'] - a['anon_before'])} / "
                         f"{mib(b['anon_after'] - b['anon_before']) if b else '-'} | "
                         f"{mib(a['maxrss'])} | "
                         f"{a['probe_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--materialise", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fw-distractors")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of the searches")
    ap.add_argument("--counts", default="0,2,4,8", help="distractor counts searched")
    ap.add_argument("--options", default="{}",
                    help="JSON options on top of the search's (e.g. the previous default: "
                         '\'{"base_vertex": false, "min_cosine": 0.0}\')')
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON of finished searches: appended to, and skipped when run again")
    args = ap.parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.materialise)))
        return 0
    import torch

    from mergesearch.zoo.hard import build_hard_zoo

    torch.set_num_threads(args.threads)
    zoo = build_hard_zoo(progress=False)
    args.cache.mkdir(parents=True, exist_ok=True)
    distractors(zoo, max(COUNTS), args.cache)
    searches, streamed, held = [], [], []
    if not args.skip_memory:
        streamed = memory(args.cache, False)
        held = memory(args.cache, True)
    if not args.skip_search:
        options = json.loads(args.options)
        done = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
        searches = list(done)
        with tempfile.TemporaryDirectory() as work:
            for seed in map(int, args.seeds.split(",")):
                for k in map(int, args.counts.split(",")):
                    if any(r["k"] == k and r["seed"] == seed
                           and r["label"] == option_label(options) for r in done):
                        continue
                    searches.append(search(zoo, k, args.cache, Path(work), seed, options))
                    print(f"search k={k} seed={seed}: {searches[-1]}", file=sys.stderr)
                    if args.out:
                        args.out.write_text(json.dumps(searches, indent=1))
    print(markdown(searches, streamed, held))
    return 0


if __name__ == "__main__":
    sys.exit(main())
