"""The vLLM evaluator (``evaluator.backend: vllm``): one engine per worker, candidates
merged inside it.

:class:`VLLMEvaluator` scores the same suite of task YAMLs as the hf backend, with the
same items, rows and metric code (it is an :class:`~mergesearch.evaluation.hf.HFEvaluator`
whose model runs are replaced): the teacher-forced metrics (``char_accuracy``,
``answer_logprob``, ``greedy_match``, multiple choice ``acc`` / ``acc_norm``) read vLLM's
prompt log-probabilities of each row (the continuation token's log-probability and its
rank: rank 1 is the argmax), and ``exact_match``, its filters and custom scorers read
vLLM generations: one ``generate`` call per evaluation for every generating task, each
prompt with its own task's SamplingParams. On the zoo in float32 both backends give the
same per-item answers (tests/evaluation/test_vllm.py).

The engine is built once, when the worker starts (:meth:`VLLMEvaluator.start`), from a
checkpoint folder of the search's architecture. Each candidate then crosses vLLM's
process boundary as its recipe only: the worker extension
(:mod:`mergesearch.evaluation.vllm_worker`) merges it from the sources it holds and
streams the tensors into vLLM's own weight loading, and the prefix cache is reset.
Every vLLM call that depends on its version is in
:mod:`mergesearch.evaluation.vllm_compat`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import vllm_compat as compat
from .base import Evaluation, EvaluationError
from .config import EvaluatorConfig
from .hf import HFEvaluator, _Batches, _cut, _Task
from .scorers import RowStats
from .vllm_config import VLLMOptions

if TYPE_CHECKING:
    from mergesearch.evaluation.config import ObjectiveConfig
    from mergesearch.execution.worker import WorkerSpec
    from mergesearch.recipe import Recipe

log = logging.getLogger(__name__)

#: The task YAML's generation_kwargs a vLLM SamplingParams takes (as named there).
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                  "presence_penalty", "frequency_penalty")
_HANDLED_KEYS = ("until", "max_gen_toks", "do_sample")


class _Engine:
    """The running engine, as the model argument of the scoring code (not a torch module)."""

    def __init__(self, llm: Any):
        self.llm = llm


class VLLMEvaluator(HFEvaluator):
    """Scores recipes on a suite of lm-eval task YAMLs, each merged inside one vLLM engine.

    The worker calls :meth:`start` once (engine, sources), then
    :meth:`evaluate_recipe` per candidate (``merges_recipes``: the worker merges
    nothing itself). :meth:`evaluate` of a ``transformers`` module scores it with the
    hf code, in this process (estimator calibration does that).
    """

    merges_recipes = True

    def __init__(self, config: EvaluatorConfig, tokenizer: Any, *,
                 base_dir: str | Path | None = None, metrics: Collection[str] = ()) -> None:
        self.vllm_version = compat.check_version()
        self.options = config.vllm or VLLMOptions()
        super().__init__(config, tokenizer, base_dir=base_dir, metrics=metrics)
        self._sampling = {name: self._sampling_params(task.spec)
                          for name, task in self._data.items() if name in self._generate}
        self._engine: _Engine | None = None
        self._weight_objectives: list[str] = []
        self.timings: dict[str, float] = {}  # of the last evaluate_recipe: merge, evaluate
        # False after a candidate whose scoring saw NaN/inf or did not finish: the next swap
        # zeroes the KV cache (see MergeExtension.mergesearch_clear_kv)
        self._kv_clean = True
        self._all_finite = True

    # -- the engine --------------------------------------------------------------------

    def start(self, spec: WorkerSpec, objectives: list[ObjectiveConfig] = ()) -> None:
        """Build the engine and open the sources in its worker, once.

        The engine's model is ``evaluator.vllm.model``, else the first model of the
        spec's start recipe; ``objectives`` (weight objectives) are reduced inside vLLM's
        worker while each merge streams.
        """
        from mergesearch.models.checkpoint import ModelLoadError, resolve_model_dir
        from mergesearch.models.lora import is_lora_adapter
        from mergesearch.recipe import Recipe

        if self._engine is not None:
            raise EvaluationError("the vllm evaluator's engine is already started")
        if spec.loader is not None:
            raise EvaluationError("backend vllm loads Hugging Face checkpoints only; models "
                                  "from models.loader need backend hf")
        recipe = Recipe.from_dict(spec.check_recipe) if spec.check_recipe else None
        model = self.options.model or (recipe.model_names[0] if recipe else None)
        if model is None:
            raise EvaluationError("backend vllm needs the model the engine is built from: "
                                  "set evaluator.vllm.model (a checkpoint folder)")
        try:
            folder = resolve_model_dir(model)
        except ModelLoadError as err:
            raise EvaluationError(f"evaluator.vllm.model: {err}") from None
        if is_lora_adapter(folder):
            raise EvaluationError(f"the vLLM engine is built from {model}, a LoRA adapter; set "
                                  "evaluator.vllm.model to a full checkpoint of the "
                                  "architecture the recipes merge to")
        bad = [o.name for o in objectives if o.source != "weights"]
        if bad:
            raise EvaluationError(f"start: objectives {bad} are not weight objectives")
        t0 = time.perf_counter()
        engine = {"trust_remote_code": spec.trust_remote_code} | self.options.engine
        llm = compat.make_llm(str(folder), dtype=spec.dtype, engine=engine)
        self._engine = _Engine(llm)
        try:
            self._check_lengths(compat.max_model_len(llm))
        except EvaluationError:
            self.close()
            raise
        self._call("mergesearch_setup", {
            "hold": spec.hold_sources, "allow_pickle": spec.allow_pickle,
            "engine_model": str(folder),
            "objectives": [o.model_dump(mode="json") for o in objectives]})
        self._weight_objectives = [o.name for o in objectives]
        if recipe is not None:
            self._call("mergesearch_check", recipe.to_dict())
        log.info("vllm %s engine of %s ready in %.1f s", self.vllm_version, folder,
                 time.perf_counter() - t0)

    def _check_lengths(self, limit: int) -> None:
        """Every row and every prompt plus its generation must fit the engine."""
        for name, task in self._data.items():
            longest = int(task.lengths.max())
            if name in self._generate:
                longest = max(longest, max(map(len, task.prompts)) + task.spec.max_gen_toks)
            if longest > limit:
                raise EvaluationError(
                    f"task {name!r} needs sequences of {longest} tokens (prompt, answer and "
                    f"max_gen_toks), more than the vLLM engine's max_model_len {limit}: raise "
                    "evaluator.vllm.engine.max_model_len (if the model allows it) or lower "
                    "the task's max_gen_toks")

    def _call(self, method: str, *args: Any) -> dict[str, Any]:
        answer = compat.call(self._engine.llm, method, *args)
        if "error" in answer:
            raise EvaluationError(answer["error"])
        return answer

    def close(self) -> None:
        """Shut the engine down (its processes end); the evaluator cannot score after."""
        if self._engine is not None:
            llm, self._engine = self._engine.llm, None
            compat.shutdown(llm)
            del llm

    # -- per candidate -----------------------------------------------------------------

    def swap(self, recipe: Recipe) -> dict[str, float]:
        """Merge ``recipe`` into the engine (and reset its prefix cache): the weight
        objectives' values."""
        if self._engine is None:
            raise EvaluationError("the vllm evaluator has no engine yet: call start() "
                                  "(the worker does, with its spec)")
        answer = self._call("mergesearch_swap", recipe.to_dict())
        compat.reset_prefix_cache(self._engine.llm)
        if not self._kv_clean:
            self._call("mergesearch_clear_kv")
            self._kv_clean = True
        return answer["weights"]

    def evaluate_recipe(self, recipe: Recipe, *, fidelity: float = 1.0, seed: int = 0
                        ) -> Evaluation:
        """Merge ``recipe`` into the engine and score it (see :meth:`HFEvaluator.evaluate`
        for fidelity, seed and estimators); weight objectives join ``values``."""
        t0 = time.perf_counter()
        weights = self.swap(recipe)
        merged = time.perf_counter()
        self._kv_clean, self._all_finite = False, True
        out = self._evaluate(self._engine, fidelity=fidelity, seed=seed,
                             estimate=self.estimator is not None and fidelity >= 1)
        self._kv_clean = self._all_finite
        out.values |= weights
        self.timings = {"merge": merged - t0, "evaluate": time.perf_counter() - merged}
        return out

    def evaluate(self, model: nn.Module, *, fidelity: float = 1.0, seed: int = 0
                 ) -> Evaluation:
        """Score a ``transformers`` module with the hf code (the engine scores recipes:
        :meth:`evaluate_recipe`)."""
        if not isinstance(model, nn.Module):
            raise EvaluationError("the vllm evaluator scores recipes (evaluate_recipe), or a "
                                  f"torch module with the hf code, not {type(model).__name__}")
        return super().evaluate(model, fidelity=fidelity, seed=seed)

    # -- the model runs, on the engine ------------------------------------------------------

    @contextmanager
    def _scoring(self, model: Any) -> Iterator[torch.device]:
        if isinstance(model, nn.Module):
            with super()._scoring(model) as device:
                yield device
        else:
            yield torch.device("cpu")  # the rows are sent as token ids

    def _teacher_forced(self, model: Any, task: _Task, batches: _Batches) -> RowStats:
        """Row statistics from the engine's prompt log-probabilities, in item order."""
        if isinstance(model, nn.Module):
            return super()._teacher_forced(model, task, batches)
        rows = [r for i in batches.idx for r in range(task.row_ptr[i], task.row_ptr[i + 1])]
        lengths, starts = task.lengths.tolist(), task.starts.tolist()
        prompts = [compat.tokens_prompt(task.ids[r, : lengths[r]].tolist()) for r in rows]
        params = compat.sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = model.llm.generate(prompts, params, use_tqdm=False)
        n_target, n_hit, logprob, finite = [], [], [], []
        for r, output in zip(rows, outputs, strict=True):
            stats = compat.prompt_stats(output, starts[r] + 1)
            lps = torch.tensor([lp for lp, _ in stats], dtype=torch.float32)
            n_target.append(len(stats))
            n_hit.append(sum(rank == 1 for _, rank in stats))
            logprob.append(float(lps.sum()))
            finite.append(bool(torch.isfinite(lps).all()))
        self._all_finite &= all(finite)
        return RowStats(torch.tensor(n_target), torch.tensor(n_hit),
                        torch.tensor(logprob, dtype=torch.float32), torch.tensor(finite))

    def _generation_pools(self, model: Any, names: list[str]) -> list[list[str]]:
        """On the engine, one pool of every task: each prompt carries its task's own
        sampling settings, so one ``generate`` call serves them all."""
        if isinstance(model, nn.Module) or not self.pool_generation:
            return super()._generation_pools(model, names)
        return [names] if names else []

    def _generate_texts(self, model: Any, jobs: Sequence[tuple[_Task, list[int]]]
                        ) -> list[list[str]]:
        """Generations for each ``(task, items)`` (cut at eos and at the task's stop
        strings), from one engine call with each prompt's own SamplingParams."""
        if isinstance(model, nn.Module):
            return super()._generate_texts(model, jobs)
        tok = self.tokenizer
        prompts = [compat.tokens_prompt(task.prompts[i]) for task, idx in jobs for i in idx]
        params = [self._sampling[task.spec.name] for task, idx in jobs for _ in idx]
        outputs = iter(model.llm.generate(prompts, params, use_tqdm=False))
        texts = []
        for task, idx in jobs:
            texts.append([])
            for _ in idx:
                ids = compat.generated_ids(next(outputs))
                if tok.eos_token_id in ids:
                    ids = ids[: ids.index(tok.eos_token_id)]
                texts[-1].append(_cut(tok.decode(ids, skip_special_tokens=True),
                                      task.spec.until))
        return texts

    def _sampling_params(self, spec: Any) -> Any:
        """Greedy, up to the task's max_gen_toks, stopping at eos; then the task YAML's
        generation_kwargs; then ``evaluator.vllm.sampling``."""
        gen: Mapping[str, Any] = spec.generation_kwargs
        unknown = sorted(set(gen) - set(_SAMPLING_KEYS) - set(_HANDLED_KEYS))
        if unknown:
            raise EvaluationError(f"task {spec.name!r}: generation_kwargs {unknown} have no "
                                  f"vLLM meaning here; use {list(_SAMPLING_KEYS)} (or "
                                  "evaluator.vllm.sampling)")
        kwargs: dict[str, Any] = {"temperature": 0.0, "max_tokens": spec.max_gen_toks,
                                  "stop_token_ids": [self.tokenizer.eos_token_id]}
        kwargs |= {k: gen[k] for k in _SAMPLING_KEYS if k in gen}
        if gen.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        elif gen.get("do_sample") and "temperature" not in gen:
            kwargs["temperature"] = 1.0  # sampling, as transformers' generate does it
        kwargs |= self.options.sampling
        try:
            return compat.sampling_params(**kwargs)
        except (TypeError, ValueError) as err:
            raise EvaluationError(f"task {spec.name!r}: vLLM sampling settings {kwargs}: "
                                  f"{err}") from None
