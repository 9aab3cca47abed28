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
            recipe_obj = self._mergesearch_plan(recipe)
            weights = weight_sink(state, recipe_obj) if state.extra_objectives else None
            stream = state.merger.stream(recipe_obj)
            compat.reload_weights(self, _teed(stream, weights))
            values = weights.close().values() if weights is not None else {}
        except Exception as err:  # noqa: BLE001
            return _error(err)
        return {"weights": values, "merge": time.perf_counter() - t0}

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
