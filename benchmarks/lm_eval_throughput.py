"""Items per second on the zoo: our hf backend vs the lm-eval backend (lm-eval's own task
code through HFLM on the resident module), the same items, the same candidates, one run.

Candidates: the zoo base and task-arithmetic merges of its experts written into the
same resident module in place (as the worker does). Per candidate every evaluator
scores all 800 items of evaluators/zoo (4 tasks x 200); the figures are the median
over the candidates after a warm-up call. Rows:

- ``hf, char_accuracy``: our teacher-forced pass only (no generation);
- ``lm_eval, char_accuracy``: the zoo tasks as dict tasks with only our token metrics
  (TokenScoredTask without generation: one loglikelihood request per answer token);
- ``hf, char_accuracy + exact_match``: plus greedy generation;
- ``lm_eval, zoo suite``: the committed zoo YAMLs (generation + token requests).

Each lm-eval row checks that its values equal the hf row's (max abs difference shown).
Also the fixed cost of one call (one item per task).

    OMP_NUM_THREADS=1 python benchmarks/lm_eval_throughput.py [--candidates 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "evaluators" / "zoo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="lm_eval_bench_"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.evaluation import EvaluatorConfig, make_evaluator
    from mergesearch.evaluation.tasks import load_suite
    from mergesearch.zoo import build_zoo

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    zoo = build_zoo(progress=False)
    tok = AutoTokenizer.from_pretrained(zoo.base)
    model = AutoModelForCausalLM.from_pretrained(zoo.base).eval()
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    experts = [dict(AutoModelForCausalLM.from_pretrained(zoo.model_path(s)).named_parameters())
               for s in ("rev", "srt", "dup", "evn")]

    def candidate(i: int) -> None:
        """Write candidate ``i`` into the resident module in place."""
        g = torch.Generator().manual_seed(i)
        weights = (torch.rand(len(experts), generator=g) * 0.8 + 0.2).tolist()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + sum(w * (e[name] - base[name])
                                         for w, e in zip(weights, experts, strict=True)))

    char = [{"name": "chars", "metric": "char_accuracy"},
            {"name": "logprob", "metric": "answer_logprob"}]
    both = [*char, {"name": "exact", "metric": "exact_match"}]
    specs = load_suite(ZOO)
    token_tasks = [{"task": f"{name}_tokens", "dataset_path": "json", "test_split": "test",
                    "dataset_kwargs": {"data_files": {"test": str(spec.data_files[0])}},
                    "output_type": "generate_until", "doc_to_text": "{{prompt}}",
                    "doc_to_target": "{{answer}}", "target_delimiter": "",
                    "generation_kwargs": {"until": ["<eos>"], "max_gen_toks": 12},
                    "metric_list": [{"metric": m, "aggregation": "mean",
                                     "higher_is_better": True}
                                    for m in ("char_accuracy", "answer_logprob")]}
                   for name, spec in sorted(specs.items())]
    bs = args.batch_size
    t0 = time.perf_counter()
    evaluators = {
        "hf, char_accuracy": make_evaluator(EvaluatorConfig(
            suite=str(ZOO), objectives=char, batch_size=bs), tok),
        "lm_eval, char_accuracy": make_evaluator(EvaluatorConfig(
            backend="lm_eval", objectives=char, batch_size=bs,
            lm_eval={"tasks": token_tasks}), tok),
        "hf, char_accuracy + exact_match": make_evaluator(EvaluatorConfig(
            suite=str(ZOO), objectives=both, batch_size=bs), tok),
        "lm_eval, zoo suite": make_evaluator(EvaluatorConfig(
            backend="lm_eval", suite=str(ZOO), objectives=both, batch_size=bs,
            lm_eval={"tasks": ["zoo"]}), tok),
    }
    setup = time.perf_counter() - t0
    reference = {"lm_eval, char_accuracy": "hf, char_accuracy",
                 "lm_eval, zoo suite": "hf, char_accuracy + exact_match"}
    times: dict[str, list[float]] = {k: [] for k in evaluators}
    diffs: dict[str, float] = dict.fromkeys(reference, 0.0)
    fixed: dict[str, float] = {}
    for name, ev in evaluators.items():  # warm-up, and the fixed cost of one call
        ev.evaluate(model)
        t = time.perf_counter()
        ev.evaluate(model, fidelity=1 / 200)
        fixed[name] = time.perf_counter() - t
    n_items = 0
    for i in range(args.candidates):
        candidate(i)
        values = {}
        for name, ev in evaluators.items():
            t = time.perf_counter()
            out = ev.evaluate(model)
            times[name].append(time.perf_counter() - t)
            values[name] = out.values
            n_items = sum(out.n_items.values())
        for name, ref in reference.items():
            diffs[name] = max(diffs[name], *(abs(values[name][k] - values[ref][k])
                                             for k in values[name]))
    print(f"zoo: {n_items} items per candidate, {args.candidates} candidates, batch {bs}, "
          f"torch threads {torch.get_num_threads()}; evaluators built in {setup:.1f} s\n")
    print("| evaluator | s per candidate (median) | items/s | one-item call s | "
          "max abs diff vs hf |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        diff = f"{diffs[name]:.1e}" if name in diffs else "-"
        print(f"| {name} | {med:.2f} | {n_items / med:.0f} | {fixed[name]:.2f} | {diff} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
