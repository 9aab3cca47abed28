"""Does a smooth metric track task success? Rank correlation with exact match, per skill.

A search optimises a smooth metric (char accuracy, answer log-probability) because exact
match moves in steps; that only helps if the smooth metric ranks candidates the way
exact match does. This reads every ok trial of the studies given (a real search, 100+
candidates) and prints, per task, Spearman's rank correlation of ``char_accuracy`` and
``answer_logprob`` with ``greedy_match`` (exact match under greedy decoding: every answer
token and the final ``<eos>`` is the argmax), over the candidates.

It also prints each skill's **copy baseline**: the char accuracy of answering with the
prompt's word itself (position by position, plus the ``<eos>``), computed from the
evaluation items. A skill with a high copy baseline has the copy trap: char accuracy
rewards echoing the prompt, and a char-accuracy search can trade the skill away
unseen.

    python benchmarks/metric_validity.py sqlite:///runs/hard-long/study.db#hard-long
        [--suite evaluators/hard/search]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

from mergesearch.report.compare import open_studies

ROOT = Path(__file__).resolve().parent.parent


def copy_baseline(jsonl: Path) -> float:
    """Char accuracy of answering each item with its prompt's word (the text between the
    op and ``=``), over answer characters plus the ``<eos>``, averaged per item."""
    total = 0.0
    items = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    for item in items:
        word = item["prompt"].split(" ", 1)[1].rstrip("=")
        answer = item["answer"]
        hits = sum(a == b for a, b in zip(answer, word, strict=False))
        hits += len(word) == len(answer)  # the <eos> comes right when the lengths agree
        total += hits / (len(answer) + 1)
    return total / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", help="study specs, as `mergesearch compare`")
    parser.add_argument("--suite", default=None,
                        help="folder of the tasks' JSONL files, for the copy baselines")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {}
    for store in open_studies(args.studies):
        for t in store.trials():
            if t.state == "ok" and t.fidelity >= 1:
                for task, metrics in t.scores.items():
                    rows.setdefault(task, []).append(metrics)
    print(f"{sum(map(len, rows.values())) // max(1, len(rows))} candidates per task\n")
    print("| task | candidates | distinct exact-match values | Spearman char_accuracy | "
          "Spearman answer_logprob | copy baseline (char accuracy) |")
    print("|---|---|---|---|---|---|")
    for task, ms in sorted(rows.items()):
        em = [m["greedy_match"] for m in ms]
        cells = []
        for metric in ("char_accuracy", "answer_logprob"):
            rho = spearmanr([m[metric] for m in ms], em).statistic if len(set(em)) > 1 \
                else float("nan")
            cells.append(f"{rho:.3f}")
        base = "-"
        if args.suite:
            jsonl = ROOT / args.suite / f"{task.split('_', 1)[1]}.jsonl"
            if jsonl.is_file():
                base = f"{copy_baseline(jsonl):.3f}"
        print(f"| {task} | {len(ms)} | {len(set(em))} | {cells[0]} | {cells[1]} | {base} |")


if __name__ == "__main__":
    main()
