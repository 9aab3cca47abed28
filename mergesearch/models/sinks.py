"""Sinks: where the merged tensors of a recipe go, one at a time.

A merge plan yields ``(name, tensor)`` pairs
(:meth:`~mergesearch.models.resident.ResidentMerger.stream`) and never holds a
whole merged model; a *sink* consumes them.  The protocol is two calls::

    sink.accept(name, tensor)   # once per tensor, in stream order
    result = sink.close()       # once, after the last tensor: what the sink made

``tensor`` lives on the merger's device, in the compute dtype (float32) for a
merged tensor or in the merger's dtype for a layer path's tensor; a sink casts
it to what it stores.  It is read-only to the sink (it may be a source model's
own tensor: a layer path's, a passthrough's), which may keep a reference.  When
the stream fails, ``close`` is not called; a sink writing files leaves them for
its caller to remove (the export writes into an atomic temporary directory).
:func:`drain` runs a stream into a sink.

Sinks here: :class:`ModuleSink` (the resident model, parameters overwritten in
place), :class:`SafetensorsSink` (checkpoint shards written while the merge
streams), :class:`ReducerSink` (merged - base statistics for weight-derived
objectives) and :class:`Tee` (several sinks fed in one pass).  A vLLM
weight-loader sink needs only the same two methods.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils.hub import convert_file_size_to_int

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class Sink(Protocol):
    """Consumes a merge's stream of ``(name, tensor)`` (see the module docstring)."""

    def accept(self, name: str, tensor: torch.Tensor) -> None: ...

    def close(self) -> Any: ...


def drain(stream: Iterable[tuple[str, torch.Tensor]], sink: Sink) -> Any:
    """Feed every tensor of ``stream`` to ``sink``, then close it; its result."""
    for name, tensor in stream:
        sink.accept(name, tensor)
    return sink.close()


class ModuleSink:
    """Overwrite a module's parameters and buffers in place, by name; closes to the module."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._targets = dict(module.named_parameters()) | dict(module.named_buffers())

    def accept(self, name: str, tensor: torch.Tensor) -> None:
        try:
            target = self._targets[name]
        except KeyError:
            raise KeyError(f"{type(self.module).__name__} has no parameter or buffer "
                           f"{name!r}") from None
        if not _same_memory(tensor, target):  # merged straight into it: nothing to copy
            with torch.no_grad():
                target.copy_(tensor)

    def close(self) -> nn.Module:
        return self.module


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same entries of the same memory."""
    return (a.data_ptr() == b.data_ptr() and a.device == b.device and a.dtype == b.dtype
            and a.shape == b.shape and a.stride() == b.stride())


class SafetensorsSink:
    """Write the stream as safetensors shards of a checkpoint directory, while it streams.

    Tensors are cast to ``dtype`` (their own when None), moved to the CPU and
    buffered until the next one would take the shard past ``max_shard_size``
    (bytes, or a size such as ``"2GB"``), then written: the sink holds at most one
    shard, never the whole model (one tensor larger than a shard gets a shard of its
    own).  :meth:`close` names the files as ``save_pretrained`` does:
    ``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors``
    and ``model.safetensors.index.json``; it returns their paths.  Config, tokenizer
    and the like are the caller's (see :func:`mergesearch.export.save_merged`).
    """

    def __init__(self, directory: str | Path, *, dtype: torch.dtype | None = None,
                 max_shard_size: int | str = "2GB"):
        self.directory = Path(directory)
        self.dtype = dtype
        self.max_shard_size = convert_file_size_to_int(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._storages: set[int] = set()  # of pending tensors: shared ones are copied
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.total_params = 0
        self.peak_bytes = 0  # most bytes buffered at once (at most a shard, or one tensor)

    def accept(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach() if tensor.requires_grad else tensor
        t = t.to(device="cpu", dtype=self.dtype or t.dtype).contiguous()
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        storage = t.untyped_storage().data_ptr()
        if storage in self._storages:  # e.g. a layer repeated on a path: safetensors
            t = t.clone()              # refuses tensors that share memory
        self._storages.add(t.untyped_storage().data_ptr())
        self._pending[name] = t
        self._pending_bytes += size
        self.total_bytes += size
        self.total_params += t.numel()
        self.peak_bytes = max(self.peak_bytes, self._pending_bytes)

    def _flush(self) -> None:
        path = self.directory / f"model-{len(self._shards) + 1:05d}.safetensors.part"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes, self._storages = {}, 0, set()

    def close(self) -> list[Path]:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.directory / WEIGHTS_NAME
            self._shards[0][0].rename(final)
            return [final]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._shards, 1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_parameters": self.total_params,
                              "total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True)
                                                 + "\n")
        return files


class ReducerSink:
    """Feed a reducer ``update(name, merged, base)`` for every tensor the base has.

    ``base(name)`` returns the base model's tensor of that name, or None where the
    base has none (such tensors are skipped).  ``dtype``: compare the merge as a
    model of that dtype holds it (the resident model's), not in the stream's
    float32.  Closes to the reducer (read its values there).
    """

    def __init__(self, reducer: Any, base: Callable[[str], torch.Tensor | None], *,
                 dtype: torch.dtype | None = None):
        self.reducer = reducer
        self._base = base
        self.dtype = dtype

    def accept(self, name: str, tensor: torch.Tensor) -> None:
        base = self._base(name)
        if base is None:
            return
        merged = tensor.to(self.dtype) if self.dtype is not None else tensor
        with torch.no_grad():
            self.reducer.update(name, merged, base.to(merged.device))

    def close(self) -> Any:
        return self.reducer


class Tee:
    """Several sinks fed the same stream in one pass, in order; closes to their results."""

    def __init__(self, *sinks: Sink):
        self.sinks = sinks

    def accept(self, name: str, tensor: torch.Tensor) -> None:
        for sink in self.sinks:
            sink.accept(name, tensor)

    def close(self) -> tuple[Any, ...]:
        return tuple(sink.close() for sink in self.sinks)
