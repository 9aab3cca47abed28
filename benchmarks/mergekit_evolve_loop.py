"""Search loop vs mergekit-evolve's in-memory loop: candidates per minute on the tiny zoo.

Scores the same random genomes (task arithmetic, one weight per expert per group of two
layers: 8 dimensions on the zoo) with 100 items per skill, in one process, interleaved
candidate by candidate so that every loop sees the same machine load:

* **mergesearch**: the worker the controller builds for ``experiments/zoo/random.yaml``
  (merge into the resident model, then our evaluator), as configured (char accuracy:
  one teacher-forced pass, float32) and like-for-like with mergekit-evolve (objective
  ``exact_match``: greedy generation; bfloat16); then the same candidates through the whole
  controller (start-up, SQLite storage, ask/tell included) for end-to-end candidates/min;
* **mergekit-evolve in memory**: mergekit 0.1.5's ``InMemoryMergeEvaluator`` (its merge graph
  written into one resident bfloat16 model, then ``lm_eval.simple_evaluate`` on the zoo's
  lm-eval tasks: what ``mergekit-evolve --in-memory`` runs per candidate), called in this
  process without Ray (no actor dispatch counted against it), with lm-eval batch 128; and,
  for a couple of candidates, as shipped (its ``HFLM(pretrained=model)`` gets no batch size:
  batch 1);
* **naive loop**: what users write by hand: mergekit's ``run_merge`` to a temp dir,
  ``from_pretrained``, score with our evaluator (char accuracy, float32).

Needs lm-eval and Ray next to mergekit, which the project venv does not carry. Set up once
(a separate venv that reuses the project venv's packages, torch included):

    python3 -m venv /tmp/evo-venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/evo-venv/lib/python3.11/site-packages/zz_project_venv.pth
    /tmp/evo-venv/bin/pip install 'lm-eval[hf]' ray
    /tmp/evo-venv/bin/python benchmarks/mergekit_evolve_loop.py [--candidates 20]

Two patches, neither on the timed path: lm-eval's vLLM backend module is replaced by a stub
(mergekit's actor module names it in a type hint; importing it needs vllm, which has no CPU
wheel here), and mergekit's ``ReturnTensor`` input field is loosened (see
``fix_return_tensor``: without it mergekit 0.1.5's in-memory merge fails on every candidate).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["zoo_rev", "zoo_srt", "zoo_dup", "zoo_evn"]
SKILLS = ["rev", "srt", "dup", "evn"]


def stub_vllm() -> None:
    import lm_eval.models
    import lm_eval.models.huggingface  # noqa: F401

    stub = types.ModuleType("lm_eval.models.vllm_causallms")
    stub.VLLM = type("VLLM", (), {})
    sys.modules["lm_eval.models.vllm_causallms"] = stub
    lm_eval.models.vllm_causallms = stub


def fix_return_tensor() -> None:
    """mergekit 0.1.5's in-memory plan fails for every merge method: ``ReturnTensor`` types
    its input as ``Task[torch.Tensor]`` while merge tasks are ``Task[Optional[Tensor]]``,
    so pydantic tries to build the abstract ``Task`` ("Can't instantiate abstract class
    Task[Tensor]").  Loosen the field to ``Task`` (as ``SaveTensor``, the on-disk path, has)."""
    from mergekit.graph import Task
    from mergekit.io.tasks import ReturnTensor

    ReturnTensor.model_fields["tensor_task"].annotation = Task
    ReturnTensor.model_rebuild(force=True)


def genomes(n: int, seed: int) -> list[np.ndarray]:
    """Random genomes in mergesearch's order: weight[source]@group, source-major."""
    rng = np.random.default_rng(seed)
    return [np.full(8, 0.5)] + [rng.uniform(0, 1, 8) for _ in range(n - 1)]


def to_mergekit(genome: np.ndarray) -> np.ndarray:
    """mergesearch's (source, group) order -> mergekit's (group, model, set, param)."""
    return genome.reshape(4, 2).T.reshape(2, 4, 1, 1).copy()


# -- mergekit-evolve, in memory --------------------------------------------------------


class MergekitInMemory:
    def __init__(self, zoo, batch_size: int | None, storage: str):
        import lm_eval.tasks
        from mergekit.common import ModelReference
        from mergekit.evo.actors import InMemoryMergeEvaluator
        from mergekit.evo.config import EvolMergeConfiguration, TaskConfiguration
        from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition
        from mergekit.options import MergeOptions

        definition = ModelGenomeDefinition(
            models=[ModelReference.parse(str(zoo.model_path(s))) for s in SKILLS],
            merge_method="task_arithmetic", base_model=ModelReference.parse(str(zoo.base)),
            layer_granularity=2)
        config = EvolMergeConfiguration(
            genome=definition,
            tasks=[TaskConfiguration(name=t, metric="exact_match,none") for t in TASKS],
            limit=100, apply_chat_template=False, fewshot_as_multiturn=False)
        actor_cls = InMemoryMergeEvaluator.__ray_metadata__.modified_class.__bases__[0]
        self.actor = actor_cls(config, ModelGenome(definition), MergeOptions(device="cpu"),
                               model_storage_path=storage, vllm=False, batch_size=batch_size,
                               task_manager=lm_eval.tasks.TaskManager(
                                   include_path=str(ROOT / "evaluators" / "zoo")))
        if batch_size:  # lm-eval's HFLM(pretrained=model) is built with batch 1: raise it
            self.actor._maybe_init_model(
                self.actor.genome.genotype_merge_config(to_mergekit(np.full(8, 0.5))))
            self.actor.model.batch_size_per_gpu = batch_size

    def evaluate(self, genome: np.ndarray) -> dict:
        return self.actor.evaluate_genotype(to_mergekit(genome))


class Ours:
    """mergesearch's worker, built exactly as the controller builds it for an experiment."""

    def __init__(self, tmp: Path, name: str, overrides: list[str]):
        from mergesearch.controller import BoundExperiment

        self.exp = experiment(tmp, name, overrides)
        self.search = BoundExperiment(self.exp, progress=False)
        self.worker = self.search.make_executor().worker
        self.next_id = 0

    def evaluate(self, genome: np.ndarray) -> float:
        from mergesearch.trial import Candidate

        cand = Candidate(id=self.next_id, genome=list(genome),
                         recipe=self.search.space.decode(genome))
        self.next_id += 1
        result = self.worker.evaluate(cand)
        return result.values["mean"]


def experiment(tmp: Path, name: str, overrides: list[str], n: int = 1):
    from mergesearch.experiment import Experiment

    return Experiment.load(ROOT / "experiments" / "zoo" / "random.yaml",
                           [f"name={name}", f"output={tmp / name}", f"budget.evaluations={n}",
                            "evaluator.limit=100", *overrides])


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


class Replay:
    """Replace the random strategy's samples with the given genomes (same candidates)."""

    def __init__(self, gens):
        self.gens = gens

    def __enter__(self):
        from mergesearch.strategies.random_search import RandomSearch

        self.cls, self.orig = RandomSearch, RandomSearch._ask
        gens = self.gens

        def _ask(strategy, n):
            start = strategy._next_id
            return [(gens[i], 1.0) for i in range(start, min(start + n, len(gens)))]

        RandomSearch._ask = _ask

    def __exit__(self, *exc):
        self.cls._ask = self.orig


def controller_run(gens, tmp: Path, name: str) -> tuple[float, int]:
    """Ours end to end through the controller: total seconds (start-up included), trials."""
    from mergesearch import controller

    exp = experiment(tmp, name, [], len(gens))
    with Replay(gens):
        seconds, summary = timed(lambda: controller.run(exp, progress=False))
    return seconds, summary.evaluated_now


# -- the naive loop: merge to disk, reload, score ----------------------------------------


class Naive:
    """Merge to disk with mergekit, reload with transformers, score with our evaluator."""

    def __init__(self, zoo, tmp: Path, space):
        from transformers import AutoTokenizer

        from mergesearch.evaluation import EvaluatorConfig, ObjectiveConfig, make_evaluator

        self.tmp, self.space, self.k = tmp, space, 0
        self.evaluator = make_evaluator(EvaluatorConfig(
            suite=str(ROOT / "evaluators" / "zoo"), limit=100, batch_size=128,
            objectives=[ObjectiveConfig(name="mean", metric="char_accuracy")]),
            AutoTokenizer.from_pretrained(zoo.base))

    def evaluate(self, genome: np.ndarray) -> float:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
        from transformers import AutoModelForCausalLM

        from mergesearch.mergekit_config import to_mergekit as recipe_to_mergekit

        out = self.tmp / f"naive-{self.k}"
        self.k += 1
        config = MergeConfiguration.model_validate(recipe_to_mergekit(self.space.decode(genome)))
        run_merge(config, str(out), options=MergeOptions(device="cpu", copy_tokenizer=False))
        model = AutoModelForCausalLM.from_pretrained(out)
        score = self.evaluator.evaluate(model).values["mean"]
        shutil.rmtree(out)
        return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--batch1", type=int, default=2,
                        help="candidates for mergekit-evolve as shipped (lm-eval batch 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.chdir(ROOT)  # lm-eval resolves the task YAMLs' data_files against the cwd
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stub_vllm()
    fix_return_tensor()
    from mergesearch.zoo import build_zoo

    zoo = build_zoo(progress=False)
    gens = genomes(args.candidates, args.seed)
    print(f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{args.candidates} candidates, 8 dims, 100 items x 4 skills")
    names = ["mergesearch worker, char accuracy, float32",
             "mergesearch worker, exact_match (generation), bfloat16",
             "mergekit-evolve in memory, lm-eval batch 128",
             "naive loop: mergekit run_merge to disk + from_pretrained + our evaluator (char)"]
    times: dict[str, list[float]] = {n: [] for n in names}
    scores: dict[str, list[float]] = {n: [] for n in names}
    setup: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="evo-loop-") as tmp_name:
        tmp = Path(tmp_name)
        setup[names[0]], ours = timed(Ours, tmp, "ours-char", [])
        setup[names[1]], ours_em = timed(Ours, tmp, "ours-em", [
            "evaluator.objectives=[{name: mean, metric: exact_match}]",
            "execution.dtype=bfloat16"])
        setup[names[2]], mk = timed(MergekitInMemory, zoo, 128, str(tmp / "mk"))
        setup[names[3]], naive = timed(Naive, zoo, tmp, ours.search.space)
        loops = [ours.evaluate, ours_em.evaluate, lambda g: mk.evaluate(g)["score"] / 4,
                 naive.evaluate]
        # interleaved, candidate by candidate: every loop sees the same machine load
        for k, g in enumerate(gens):
            for name, fn in zip(names, loops, strict=True):
                seconds, score = timed(fn, g)
                times[name].append(seconds)
                scores[name].append(float(score))
            print(f"candidate {k + 1}: " + ", ".join(
                f"{times[n][-1]:.2f} s" for n in names), flush=True)
        total, n = controller_run(gens, tmp, "ours-controller")
        print(f"controller, char accuracy, float32: {n} candidates in {total:.1f} s "
              "(start-up included)", flush=True)
        extra = []
        if args.batch1:
            t0 = time.perf_counter()
            mk1 = MergekitInMemory(zoo, None, str(tmp / "mk1"))
            per = [timed(mk1.evaluate, g)[0] for g in gens[: args.batch1]]
            extra.append(("mergekit-evolve in memory as shipped (lm-eval batch 1)", per,
                          time.perf_counter() - t0))
            print(f"mergekit in memory batch 1: {per}", flush=True)

    mk_name = names[2]
    ours_name = names[0]

    def paired(a: str, b: str) -> float:  # median over candidates of time(a) / time(b)
        return statistics.median(x / y for x, y in zip(times[a][1:], times[b][1:], strict=True))

    print("\nSeconds per candidate, median over candidates 2..n (the first builds the model "
          "and compiles). Ratios are medians over candidates of per-candidate time ratios, "
          "the loops having run back to back on each candidate:\n")
    print("| loop | candidates | s per candidate, median (min-max) | cand/min | "
          "mergekit-evolve b128 time / this | this / ours (char, fp32) | "
          "set-up + first candidate s |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        warm = times[name][1:]
        med = statistics.median(warm)
        print(f"| {name} | {len(gens)} | {med:.2f} ({min(warm):.2f}-{max(warm):.2f}) | "
              f"{60 / med:.1f} | {paired(mk_name, name):.2f}x | {paired(name, ours_name):.2f}x "
              f"| {setup[name] + times[name][0]:.1f} |")
    mk_med = statistics.median(times[mk_name][1:])
    print(f"| mergesearch controller end to end (char, float32: start-up, storage, ask/tell "
          f"included; run after the loop above) | {n} | {total / n:.2f} (mean) | "
          f"{60 * n / total:.1f} | {mk_med / (total / n):.2f}x (vs median) | - | - |")
    for name, per, _total in extra:
        warm = per[1:] or per
        med = statistics.median(warm)
        print(f"| {name} | {len(per)} | {med:.2f} ({min(warm):.2f}-{max(warm):.2f}) | "
              f"{60 / med:.1f} | {mk_med / med:.2f}x (vs median) | - | - |")
    em, mk_scores = scores[names[1]], scores[mk_name]
    diff = [abs(a - b) for a, b in zip(em, mk_scores, strict=True)]
    corr = float(np.corrcoef(em, mk_scores)[0, 1]) if len(em) > 2 else float("nan")
    print(f"\nSanity: mean exact match of the same candidates, ours (bf16) vs "
          f"mergekit-evolve: mean |diff| {statistics.mean(diff):.3f}, correlation {corr:.2f} "
          f"(uniform merge: ours {em[0]:.3f}, mergekit {mk_scores[0]:.3f}); ours char "
          f"accuracy of the uniform merge {scores[names[0]][0]:.4f}")


if __name__ == "__main__":
    main()
