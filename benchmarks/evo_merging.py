"""Evo-Merging on the hard zoo: what sign flips buy, and pruning LoRA A only versus A and B.

Both measurements run the ``evo_merging`` strategy with the same settings per variant
(popsize, step, L1 weight, evaluations split 1/3 : 2/3) and the same seeds, scoring
candidates on the hard zoo's search items (``--limit`` per skill) with the objective
``ce`` = answer_logprob (the mean log-probability of the answer tokens; higher is
better, its negative is the cross entropy the paper minimises).  The best candidate of
each search (by the search objective, not the penalised loss) is re-scored on the
report items (``evaluators/hard/report``, 200 other items per skill).

1. **Sign flips.**  Sources ``rot``, ``inc``, ``pos`` (experts) and ``anti`` (trained to
   copy the prompt: a harmful source).  Task-vector rule (breadcrumbs, gamma 0, no
   normalisation: ``search_spaces/evo_merging_task_vectors.yaml``), beta in [-1.5, 1.5]
   against the same search with beta in [0, 1.5] (the paper's "without sign flip").
   ``flip``: the same with ``inc`` replaced by ``neg_inc = base - tau_inc`` (written under
   ``--work``), a source only a negative beta can use.
2. **LoRA: prune A only vs A and B.**  Each of the four sources becomes a PEFT LoRA
   adapter over the hard zoo's base: per linear layer of the blocks, the rank-``--rank``
   truncated SVD of its task vector, split evenly (``B = U sqrt(S)``, ``A = sqrt(S) V^T``,
   scaling 1), written under ``--work`` (never into the repository).  Method
   ``evo_lora`` with ``prune_b: false`` (the paper's asymmetric rule) against
   ``prune_b: true``.

Output: progress on stderr; on stdout a markdown table per measurement (mean ± std over
seeds, std with n - 1) and the reference rows (each source alone, the start point).

    python benchmarks/evo_merging.py [--seeds 3] [--evaluations 120] [--limit 25]
        [--rank 8] [--sigma0 0.05] [--only sign|flip|lora] [--work /tmp/evo_merging_bench]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("rot", "inc", "pos", "anti")
STRATEGY = "mergesearch.strategies.evo_merging:EvoMerging"  # registered or not
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def experiment(sources: dict[str, str], space: dict[str, Any], *, suite: str,
               limit: int | None, work: Path, objectives: list[dict[str, str]]):
    from mergesearch.experiment import Experiment

    data = yaml.safe_load((ROOT / "experiments/hard/evo_merging.yaml").read_text())
    data["models"]["sources"] = sources
    data |= {"space": space, "output": str(work / "scorer"),
             "strategy": {"name": STRATEGY, "options": {}}}
    data["evaluator"] |= {"suite": str(ROOT / suite), "limit": limit,
                          "objectives": objectives}
    if limit is None:
        del data["evaluator"]["limit"]
    return Experiment.from_dict(data)


def space(kind: str, *, beta_low: float = -1.5, prune_b: bool = False) -> dict[str, Any]:
    file = "evo_merging_task_vectors.yaml" if kind == "tv" else "evo_merging.yaml"
    data = yaml.safe_load((ROOT / "search_spaces" / file).read_text())
    data["parameters"]["weight"]["bounds"] = [beta_low, 1.5]
    if kind == "lora":
        data["fixed"]["prune_b"] = prune_b
    return data


class Scorer:
    """The controller's worker for a set of models, on the search or the report items."""

    def __init__(self, sources: dict[str, str], kind: str, work: Path, limit: int):
        import mergesearch.strategies.evo_merging  # noqa: F401  (registers evo_lora too)
        from mergesearch import controller

        search = [{"name": "ce", "metric": "answer_logprob"}]
        report = search + [{"name": "acc", "metric": "char_accuracy"}]
        self.bound = controller.BoundExperiment(
            experiment(sources, space(kind), suite="evaluators/hard/search", limit=limit,
                       work=work, objectives=search), progress=False)
        self.search = self.bound.make_executor().worker
        self.report = controller.BoundExperiment(
            experiment(sources, space(kind), suite="evaluators/hard/report", limit=None,
                       work=work, objectives=report), progress=False).make_executor().worker
        self.count = 0

    def score(self, recipe, items: str = "search") -> dict[str, float] | None:
        from mergesearch.trial import Candidate

        self.count += 1
        worker = self.search if items == "search" else self.report
        result = worker.evaluate(Candidate(id=self.count, genome=[], recipe=recipe))
        return dict(result.values) if result.ok else None


def one_search(scorer: Scorer, space_data: dict[str, Any], seed: int,
               options: dict[str, Any]) -> dict[str, Any]:
    """One evo_merging search driven here (one generation at a time), its best re-scored."""
    from mergesearch.spaces import load_space
    from mergesearch.strategies import Problem
    from mergesearch.strategies.evo_merging import EvoMerging
    from mergesearch.trial import Result

    b = scorer.bound
    sp = load_space(space_data, base=b.base, sources=b.sources, num_layers=b.space.num_layers,
                    layer_key=b.space.layer_key, seed=seed)
    problem = Problem(tuple(sp.dims), b.problem.objectives, decode=sp.decode)
    strategy = EvoMerging(problem, options, seed=seed)
    start = time.perf_counter()
    best: tuple[float, list[float]] | None = None
    evaluated = 0
    while not strategy.done:
        cands = strategy.ask(strategy.options.popsize)
        if not cands:
            break
        results = []
        for c in cands:
            values = scorer.score(sp.decode(c.genome))
            evaluated += 1
            if values is None:
                results.append(Result.failed(c.id, "failed"))
                continue
            results.append(Result(c.id, values))
            if best is None or values["ce"] > best[0]:
                best = (values["ce"], list(c.genome))
        strategy.tell(results)
    names = [d.name for d in sp.dims]
    genome = dict(zip(names, best[1], strict=True))
    report = scorer.score(sp.decode(best[1]), "report")
    return {"seed": seed, "evaluations": evaluated, "wall": time.perf_counter() - start,
            "best_ce": best[0], "genome": genome, "report": report}


def make_lora_adapters(work: Path, rank: int) -> tuple[str, dict[str, str], dict[str, float]]:
    """Rank-``rank`` LoRA adapters of the hard zoo's experts (SVD of each linear layer's
    task vector), cached under ``work``; returns the base, the adapters and each one's
    relative approximation error ||tau - BA|| / ||tau|| over the layers it covers."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from mergesearch.zoo.hard import build_hard_zoo

    zoo = build_hard_zoo(progress=False)
    base_dir = zoo.model_path("base")
    base = load_file(str(Path(base_dir) / "model.safetensors"))
    out, errors = {}, {}
    for name in SOURCES:
        folder = work / f"lora-r{rank}" / name
        out[name] = str(folder)
        if (folder / "adapter_model.safetensors").is_file() and name in _read_errors(folder):
            errors[name] = _read_errors(folder)[name]
            continue
        expert = load_file(str(Path(zoo.model_path(name)) / "model.safetensors"))
        tensors, num, den = {}, 0.0, 0.0
        for key, w in base.items():
            module = key.removesuffix(".weight")
            if not key.endswith(".weight") or module.rsplit(".", 1)[-1] not in LINEAR:
                continue
            tau = (expert[key] - w).double()
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            root = s[:rank].sqrt()
            b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.float().contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.float().contiguous()
            num += float(torch.linalg.norm(tau - b @ a) ** 2)
            den += float(torch.linalg.norm(tau) ** 2)
        folder.mkdir(parents=True, exist_ok=True)
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LINEAR),
                   base_model_name_or_path=str(base_dir)).save_pretrained(str(folder))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        errors[name] = (num / den) ** 0.5 if den else 0.0
        (folder / "error.json").write_text(json.dumps({name: errors[name]}))
    return str(base_dir), out, errors


def negated_expert(work: Path, name: str) -> str:
    """A checkpoint ``base - tau_name`` (the expert's task vector reversed), under ``work``:
    only beta = -1 gets the expert's skill back from it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mergesearch.zoo.hard import build_hard_zoo

    zoo = build_hard_zoo(progress=False)
    folder = work / f"neg_{name}"
    if not (folder / "model.safetensors").is_file():
        src = Path(zoo.model_path(name))
        shutil.copytree(src, folder, dirs_exist_ok=True)
        base = load_file(str(Path(zoo.model_path("base")) / "model.safetensors"))
        expert = load_file(str(src / "model.safetensors"))
        save_file({k: (2 * base[k] - v).contiguous() for k, v in expert.items()},
                  str(folder / "model.safetensors"))
    return str(folder)


def _read_errors(folder: Path) -> dict[str, float]:
    path = folder / "error.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# -- tables -----------------------------------------------------------------------------------

def pm(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(title: str, rows: dict[str, list[dict[str, Any]]], refs: dict[str, Any],
          watch: str = "anti") -> str:
    lines = [f"### {title}", "",
             f"| variant | best search ce | report ce | report char acc | beta[{watch}] | "
             "alpha mean | evals | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for label, runs in rows.items():
        rep = [r["report"] for r in runs if r["report"]]
        alphas = [statistics.fmean(v for k, v in r["genome"].items() if k.startswith("density"))
                  for r in runs]
        lines.append(
            f"| {label} | {pm([r['best_ce'] for r in runs])} | {pm([x['ce'] for x in rep])} | "
            f"{pm([x['acc'] for x in rep])} | {pm([r['genome'][f'weight[{watch}]'] for r in runs])}"
            f" | {pm(alphas)} | {runs[0]['evaluations']} | "
            f"{statistics.fmean(r['wall'] for r in runs):.0f} |")
    lines += ["", "Reference points (report items): "
              + "; ".join(f"{k}: ce {v['ce']:.3f}, char acc {v['acc']:.3f}"
                          for k, v in refs.items() if v), ""]
    return "\n".join(lines)


def references(scorer: Scorer, kind: str) -> dict[str, Any]:
    """Each source alone (alpha 1, beta 1) and the start point (alpha 1, beta 1/N)."""
    from mergesearch.recipe import Recipe

    sp = scorer.bound.space
    out = {}
    for i, name in enumerate(scorer.bound.sources):
        recipe = sp.decode([1.0] * 4 + [1.0 if j == i else 0.0 for j in range(4)])
        out[f"{name} alone"] = scorer.score(Recipe.from_dict(recipe.to_dict()), "report")
    out["start (beta 1/4)"] = scorer.score(sp.decode([1.0] * 4 + [0.25] * 4), "report")
    if kind == "lora":  # the same start with beta 1: every own term at full scale
        out["alpha 1, beta 1"] = scorer.score(sp.decode([1.0] * 8), "report")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--evaluations", type=int, default=120)
    ap.add_argument("--limit", type=int, default=25, help="search items per skill")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--sigma0", type=float, default=0.05)
    ap.add_argument("--only", choices=("sign", "flip", "lora"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/evo_merging_bench"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    options = {"popsize": args.popsize, "sigma0": args.sigma0, "l1": 0.05,
               "evaluations": args.evaluations}
    seeds = range(args.seeds)
    out: dict[str, Any] = {"options": options, "limit": args.limit, "seeds": list(seeds)}
    sections = []

    def run(scorer: Scorer, variants: dict[str, dict[str, Any]],
            watch: str = "anti") -> dict[str, list]:
        rows: dict[str, list] = {label: [] for label in variants}
        for seed in seeds:  # seeds outermost: a cut-short run still compares like with like
            for label, sp in variants.items():
                rows[label].append(one_search(scorer, sp, seed, options))
                r = rows[label][-1]
                print(f"  {label} seed {seed}: best ce {r['best_ce']:.4f}, beta[{watch}] "
                      f"{r['genome'][f'weight[{watch}]']:.3f}, {r['wall']:.0f} s",
                      file=sys.stderr)
        return rows

    if args.only in (None, "sign"):
        from mergesearch.zoo.hard import build_hard_zoo

        build_hard_zoo(progress=False)
        scorer = Scorer({s: f"zoo:hard/{s}" for s in SOURCES}, "tv", args.work, args.limit)
        refs = references(scorer, "tv")
        rows = run(scorer, {"beta in [-1.5, 1.5]": space("tv"),
                            "beta in [0, 1.5]": space("tv", beta_low=0.0)})
        out["sign"] = {"rows": rows, "references": refs}
        sections.append(table("Sign flips: task vectors of rot, inc, pos, anti", rows, refs))

    if args.only in (None, "flip"):
        sources = {s: f"zoo:hard/{s}" for s in ("rot", "pos", "anti")}
        sources["neg_inc"] = negated_expert(args.work, "inc")
        scorer = Scorer(sources, "tv", args.work, args.limit)
        refs = references(scorer, "tv")
        rows = run(scorer, {"beta in [-1.5, 1.5]": space("tv"),
                            "beta in [0, 1.5]": space("tv", beta_low=0.0)}, "neg_inc")
        out["flip"] = {"rows": rows, "references": refs}
        sections.append(table("Sign flips with a negated expert: rot, pos, anti and "
                              "neg_inc = base - tau_inc", rows, refs, "neg_inc"))

    if args.only in (None, "lora"):
        base, adapters, errors = make_lora_adapters(args.work, args.rank)
        scorer = Scorer(adapters, "lora", args.work, args.limit)
        refs = references(scorer, "lora")
        rows = run(scorer, {"prune A only": space("lora"),
                            "prune A and B": space("lora", prune_b=True)})
        out["lora"] = {"rows": rows, "references": refs, "errors": errors, "rank": args.rank,
                       "base": base}
        err = ", ".join(f"{k} {v:.2f}" for k, v in errors.items())
        sections.append(table(f"LoRA (rank {args.rank} SVD adapters; relative error {err}): "
                              "evo_lora, prune A only vs A and B", rows, refs))

    print(f"evo_merging, {args.evaluations} evaluations per search "
          f"({options}), {args.seeds} seeds, {args.limit} search items per skill\n")
    print("\n".join(sections))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
