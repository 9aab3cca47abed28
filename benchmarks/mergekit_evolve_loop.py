"""Search loop vs mergekit-evolve's in-memory loop: candidates per minute on the tiny zoo.

Scores the same random genomes with 100 items per skill, in one process, interleaved
candidate by candidate so that every loop sees the same machine load. The genome is
``--space task_arithmetic`` (one weight per expert per group of two layers: 8 dimensions on
the zoo) or ``--space dare_ties`` (Sakana's parameter-space genome, ``sakana_ps``'s and
mergekit-evolve's: a DARE-TIES weight and density per expert per group of two layers,
16 dimensions, weights not normalised, ``search_spaces/dare_ties_layer_groups.yaml``):

* **mergesearch**: the worker the controller builds for ``experiments/zoo/random.yaml``
  (merge into the resident model, then our evaluator), as configured (char accuracy:
  one teacher-forced pass, float32) and like-for-like with mergekit-evolve (objective
  ``exact_match``: greedy generation; bfloat16); then the same candidates through the whole
  controller (start-up, SQLite storage, ask/tell included) for end-to-end candidates/min:
  replaying the same genomes through the random strategy (task_arithmetic), or letting
  ``sakana_ps`` propose its own (dare_ties; ``cmaes`` with sigma0 1/6 where sakana_ps is not
  registered);
* **mergekit-evolve in memory**: mergekit 0.1.5's ``InMemoryMergeEvaluator`` (its merge graph
  written into one resident bfloat16 model, then ``lm_eval.simple_evaluate`` on the zoo's
  lm-eval tasks: what ``mergekit-evolve --in-memory`` runs per candidate), called in this
  process without Ray (no actor dispatch counted against it), with lm-eval batch 128; and,
  for a couple of candidates, as shipped (its ``HFLM(pretrained=model)`` gets no batch size:
  batch 1);
* **naive loop**: what users write by hand: mergekit's ``run_merge`` to a temp dir,
  ``from_pretrained``, score with our evaluator (char accuracy, float32);
* **mergekit-evolve end to end** (``--mergekit-e2e N``, default ``--candidates``): its own
  command (``mergekit.scripts.evolve.main``: ``--in-memory --strategy pool``, pycma from
  its own start point, its Ray actor pool of one ``InMemoryMergeEvaluator``) for N
  evaluations, on a private Ray cluster started with one logical GPU (the actor asks for
  one; it merges and evaluates on the CPU), lm-eval batch 128 (its in-memory actor builds
  ``HFLM`` without a batch size; a worker set-up hook raises the default), start-up
  (Ray, lm-eval's task index, actor, model) included; timed once without ``ray.init``.

Needs lm-eval and Ray next to mergekit, which the project venv does not carry. Set up once
(a separate venv that reuses the project venv's packages, torch included):

    python3 -m venv /tmp/evo-venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/evo-venv/lib/python3.11/site-packages/zz_project_venv.pth
    /tmp/evo-venv/bin/pip install 'lm-eval[hf]' ray
    /tmp/evo-venv/bin/python benchmarks/mergekit_evolve_loop.py [--candidates 20]

    /tmp/evo-venv/bin/python benchmarks/mergekit_evolve_loop.py --space dare_ties

Two patches, neither on the timed path: lm-eval's vLLM backend module is replaced by a stub
(mergekit's actor module names it in a type hint; importing it needs vllm, which has no CPU
wheel here), and mergekit's ``ReturnTensor`` input field is loosened (see
``fix_return_tensor``: without it mergekit 0.1.5's in-memory merge fails on every candidate).
The end-to-end leg applies both, and the batch size, in its Ray worker too.
"""

from __future__ import annotations

import argparse
import json
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
#: --space: (search space file, merge method, per-expert parameters in genome order,
#: mergekit's normalize: None = its default, False for task arithmetic; our DARE-TIES
#: space fixes normalize: false, as Sakana's merge)
SPACES = {
    "task_arithmetic": ("search_spaces/task_arithmetic_layers.yaml", "task_arithmetic",
                        ("weight",), None),
    "dare_ties": ("search_spaces/dare_ties_layer_groups.yaml", "dare_ties",
                  ("weight", "density"), False),
}
LM_EVAL_BATCH = 128


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


def batch_lm_eval(size: int = LM_EVAL_BATCH) -> None:
    """lm-eval's ``HFLM`` built without a batch size (mergekit's in-memory actor) gets
    ``size`` instead of 1 (the end-to-end leg's Ray worker: no handle on its HFLM)."""
    from lm_eval.models.huggingface import HFLM

    if getattr(HFLM.__init__, "_batched", False):
        return
    init = HFLM.__init__

    def __init__(self, *args, batch_size=size, **kwargs):
        init(self, *args, batch_size=batch_size, **kwargs)

    __init__._batched = True
    HFLM.__init__ = __init__


def worker_patches() -> None:
    """Ray worker set-up hook of the end-to-end leg: the two patches and the batch size."""
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    stub_vllm()
    fix_return_tensor()
    batch_lm_eval()


def genomes(n: int, seed: int, dims) -> list[np.ndarray]:
    """The start point, then random genomes uniform in the bounds, in mergesearch's order
    (param-major, then source, then group: weight[rev]@L0-1, weight[rev]@L2-3, ...)."""
    rng = np.random.default_rng(seed)
    low = np.array([d.low for d in dims])
    high = np.array([d.high for d in dims])
    return [np.array([d.init for d in dims], dtype=float)] + \
        [rng.uniform(low, high, len(dims)) for _ in range(n - 1)]


def to_mergekit(genome: np.ndarray, params: int = 1) -> np.ndarray:
    """mergesearch's (param, source, group) order -> mergekit's (group, model, set, param)."""
    return genome.reshape(params, 4, 2).transpose(2, 1, 0).reshape(2, 4, 1, params).copy()


# -- mergekit-evolve, in memory --------------------------------------------------------


def genome_definition(zoo, space: str):
    from mergekit.common import ModelReference
    from mergekit.evo.genome import ModelGenomeDefinition

    _, method, _, normalize = SPACES[space]
    return ModelGenomeDefinition(
        models=[ModelReference.parse(str(zoo.model_path(s))) for s in SKILLS],
        merge_method=method, base_model=ModelReference.parse(str(zoo.base)),
        layer_granularity=2, normalize=normalize)


class MergekitInMemory:
    def __init__(self, zoo, batch_size: int | None, storage: str, space: str):
        import lm_eval.tasks
        from mergekit.evo.actors import InMemoryMergeEvaluator
        from mergekit.evo.config import EvolMergeConfiguration, TaskConfiguration
        from mergekit.evo.genome import ModelGenome
        from mergekit.options import MergeOptions

        self.params = len(SPACES[space][2])
        definition = genome_definition(zoo, space)
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
            start = np.full(8 * self.params, 0.5)
            self.actor._maybe_init_model(
                self.actor.genome.genotype_merge_config(to_mergekit(start, self.params)))
            self.actor.model.batch_size_per_gpu = batch_size

    def evaluate(self, genome: np.ndarray) -> dict:
        return self.actor.evaluate_genotype(to_mergekit(genome, self.params))


def mergekit_end_to_end(zoo, space: str, evaluations: int, tmp: Path) -> dict:
    """mergekit-evolve's own command, in memory, on a private one-actor Ray cluster: wall
    seconds with and without ``ray.init``, evaluations run, time to the first result."""
    import ray
    import yaml
    from mergekit.evo import strategy
    from mergekit.scripts.evolve import main as evolve_main

    storage = tmp / "mk-e2e"
    storage.mkdir()
    definition = genome_definition(zoo, space)
    config = {"genome": definition.model_dump(mode="json"),
              "tasks": [{"name": t, "metric": "exact_match,none"} for t in TASKS],
              "limit": 100, "apply_chat_template": False, "fewshot_as_multiturn": False}
    config_path = tmp / "mk-e2e.yaml"
    config_path.write_text(yaml.safe_dump(config))
    stamps: list[tuple[float, int]] = []
    original = strategy.ActorPoolEvaluationStrategy.evaluate_genotypes

    def counted(self, genotypes):
        out = original(self, genotypes)
        stamps.append((time.perf_counter(), len(out)))
        return out

    strategy.ActorPoolEvaluationStrategy.evaluate_genotypes = counted
    t0 = time.perf_counter()
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))),
             runtime_env={"worker_process_setup_hook": worker_patches})
    t1 = time.perf_counter()
    try:
        evolve_main.main(
            [str(config_path), "--max-fevals", str(evaluations), "--in-memory",
             "--strategy", "pool", "--num-gpus", "1", "--no-merge-cuda",
             "--storage-path", str(storage), "--batch-size", str(LM_EVAL_BATCH),
             "--no-save-final-model", "--task-search-path", str(ROOT / "evaluators" / "zoo")],
            standalone_mode=False)
        t2 = time.perf_counter()
    finally:
        strategy.ActorPoolEvaluationStrategy.evaluate_genotypes = original
        ray.shutdown()
    n = sum(k for _, k in stamps)
    return {"total": t2 - t0, "no_ray_init": t2 - t1, "ray_init": t1 - t0, "evaluations": n,
            "generations": len(stamps),
            "steady": ((stamps[-1][0] - stamps[0][0]) / (n - stamps[0][1])
                       if len(stamps) > 1 else float("nan"))}


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


SPACE = "task_arithmetic"  # set by main from --space


def experiment(tmp: Path, name: str, overrides: list[str], n: int = 1):
    from mergesearch.experiment import Experiment

    return Experiment.load(ROOT / "experiments" / "zoo" / "random.yaml",
                           [f"name={name}", f"output={tmp / name}", f"budget.evaluations={n}",
                            "evaluator.limit=100", f"space={SPACES[SPACE][0]}", *overrides])


def ps_strategy() -> str:
    """The controller leg's strategy on the DARE-TIES genome: sakana_ps, or CMA-ES with its
    sigma0 where sakana_ps is not registered."""
    from mergesearch.strategies import strategies

    if "sakana_ps" in strategies():
        return "{name: sakana_ps}"
    return "{name: cmaes, options: {sigma0: 0.16666666666666666}}"


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


def controller_run(gens, tmp: Path, name: str, strategy: str | None = None
                   ) -> tuple[float, int]:
    """Ours end to end through the controller: total seconds (start-up included), trials.
    Without ``strategy`` the random strategy replays ``gens``; with one, it proposes."""
    from mergesearch import controller

    if strategy is None:
        exp = experiment(tmp, name, [], len(gens))
        with Replay(gens):
            seconds, summary = timed(lambda: controller.run(exp, progress=False))
    else:
        exp = experiment(tmp, name, [f"strategy={strategy}"], len(gens))
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
    parser.add_argument("--space", choices=sorted(SPACES), default="task_arithmetic",
                        help="the genome: task-arithmetic weights, or Sakana's DARE-TIES "
                             "weight + density (sakana_ps's genome)")
    parser.add_argument("--mergekit-e2e", type=int, default=None, metavar="N",
                        help="evaluations of mergekit-evolve's own command end to end "
                             "(default: --candidates; 0: skip)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    global SPACE
    SPACE = args.space
    params = len(SPACES[SPACE][2])
    e2e_n = args.candidates if args.mergekit_e2e is None else args.mergekit_e2e
    os.chdir(ROOT)  # lm-eval resolves the task YAMLs' data_files against the cwd
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stub_vllm()
    fix_return_tensor()
    from mergesearch.zoo import build_zoo

    zoo = build_zoo(progress=False)
    print(f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{args.candidates} candidates, space {SPACE} ({8 * params} dims), "
          "100 items x 4 skills", flush=True)
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
        gens = genomes(args.candidates, args.seed, ours.search.space.dims)
        setup[names[1]], ours_em = timed(Ours, tmp, "ours-em", [
            "evaluator.objectives=[{name: mean, metric: exact_match}]",
            "execution.dtype=bfloat16"])
        setup[names[2]], mk = timed(MergekitInMemory, zoo, LM_EVAL_BATCH, str(tmp / "mk"), SPACE)
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
        leg = None if SPACE == "task_arithmetic" else ps_strategy()
        total, n = controller_run(gens, tmp, "ours-controller", leg)
        leg_name = "random replaying the genomes" if leg is None else leg
        print(f"controller ({leg_name}), char accuracy, float32: {n} candidates in "
              f"{total:.1f} s (start-up included)", flush=True)
        e2e = None
        if e2e_n:
            logs = ROOT / "outcmaes"  # pycma's fmin2 (inside mergekit-evolve) logs there
            had_logs = logs.exists()
            try:
                e2e = mergekit_end_to_end(zoo, SPACE, e2e_n, tmp)
            finally:
                if not had_logs:
                    shutil.rmtree(logs, ignore_errors=True)
            print(f"mergekit-evolve end to end: {e2e}", flush=True)
        extra = []
        if args.batch1:
            t0 = time.perf_counter()
            mk1 = MergekitInMemory(zoo, None, str(tmp / "mk1"), SPACE)
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
    print(f"| mergesearch controller end to end ({leg_name}; char, float32: start-up, "
          f"storage, ask/tell included; run after the loop above) | {n} | {total / n:.2f} "
          f"(mean) | {60 * n / total:.1f} | {mk_med / (total / n):.2f}x (vs median) | - | - |")
    if e2e:
        for label, secs in (("start-up incl. ray.init", e2e["total"]),
                            ("without ray.init", e2e["no_ray_init"])):
            k = e2e["evaluations"]
            print(f"| mergekit-evolve end to end (its command, in memory, Ray pool of 1, "
                  f"lm-eval batch {LM_EVAL_BATCH}; {label}) | {k} | {secs / k:.2f} (mean) | "
                  f"{60 * k / secs:.1f} | {mk_med / (secs / k):.2f}x (vs median) | - | - |")
    for name, per, _total in extra:
        warm = per[1:] or per
        med = statistics.median(warm)
        print(f"| {name} | {len(per)} | {med:.2f} ({min(warm):.2f}-{max(warm):.2f}) | "
              f"{60 / med:.1f} | {mk_med / med:.2f}x (vs median) | - | - |")
    if e2e:
        ratio = (n / total) / (e2e["evaluations"] / e2e["total"])
        ratio_nr = (n / total) / (e2e["evaluations"] / e2e["no_ray_init"])
        print(f"\nEnd to end, candidates/min, ours (controller) / mergekit-evolve (its "
              f"command): {ratio:.2f}x ({ratio_nr:.2f}x not counting its ray.init of "
              f"{e2e['ray_init']:.1f} s); mergekit-evolve after its first generation: "
              f"{e2e['steady']:.2f} s per candidate over {e2e['generations']} generations")
    em, mk_scores = scores[names[1]], scores[mk_name]
    diff = [abs(a - b) for a, b in zip(em, mk_scores, strict=True)]
    corr = float(np.corrcoef(em, mk_scores)[0, 1]) if len(em) > 2 else float("nan")
    print(f"\nSanity: mean exact match of the same candidates, ours (bf16) vs "
          f"mergekit-evolve: mean |diff| {statistics.mean(diff):.3f}, correlation {corr:.2f} "
          f"(uniform merge: ours {em[0]:.3f}, mergekit {mk_scores[0]:.3f}); ours char "
          f"accuracy of the uniform merge {scores[names[0]][0]:.4f}")
    if args.json:
        args.json.write_text(json.dumps({
            "space": SPACE, "candidates": len(gens), "threads": torch.get_num_threads(),
            "times": times, "scores": scores, "setup": setup,
            "controller": {"strategy": leg_name, "seconds": total, "trials": n},
            "mergekit_e2e": e2e, "extra": [{"name": a, "per": b, "total": c}
                                           for a, b, c in extra]}, indent=1))


if __name__ == "__main__":
    main()
