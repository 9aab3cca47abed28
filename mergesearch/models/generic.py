"""Any torch model as a source: a loader entry point gives ``(module, state_dict)``.

An experiment names a loader, ``models.loader: "package.module:function"``; each
model reference (a path or any string) is passed to ``function(ref)``, which
returns a ``torch.nn.Module`` and its state dict.  :class:`LoadedCheckpoint`
reads that state dict with the interface of
:class:`~mergesearch.models.checkpoint.Checkpoint` (``ref``, ``names``, ``in``,
``tensor``, ``nbytes``, ``num_layers``, ``config``), so the merge methods, all
tensor-wise, run on it unchanged; the resident model is a copy of one loaded
module, its parameters overwritten in place per candidate.

Layers are read from the tensor names (``layers.3.weight``: see
:mod:`mergesearch.merging.layers`), so layer-wise settings work on models whose
names say where a block sits; a model without such names has 0 layers and takes
``global`` settings only.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from mergesearch.merging.layers import layer_index
from mergesearch.models.checkpoint import ModelLoadError

Loader = Callable[[str], tuple[nn.Module, Mapping[str, torch.Tensor]]]
_SAMPLE = 64  # values read per tensor for a model's identity


def import_function(path: str, what: str) -> Callable[..., Any]:
    """The callable named ``"package.module:function"``; ``what`` names the setting in errors."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ModelLoadError(f"{what} {path!r}: give it as 'package.module:function'")
    try:
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as err:
        raise ModelLoadError(f"{what} {path!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ModelLoadError(f"{what} {path!r} is not callable")
    return fn


@dataclass(frozen=True)
class LoadedConfig:
    """What the merger needs to know of a loaded model's structure (no HF config)."""

    loader: str
    num_hidden_layers: int
    layout: str  # digest of the merged tensors' names and shapes

    def to_dict(self) -> dict[str, Any]:
        return {"loader": self.loader, "num_hidden_layers": self.num_hidden_layers,
                "layout": self.layout}


class TensorDict:
    """The read side of a ``Checkpoint`` over tensors held in memory (``self._tensors``,
    ``self.ref``): what loader models and recipe-defined models share."""

    ref: str
    _tensors: dict[str, torch.Tensor]

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor (do not modify it in place)."""
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelLoadError(f"model {self.ref[:80]!r} has no tensor {name!r}") from None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


class LoadedCheckpoint(TensorDict):
    """A model from a loader entry point, read like a ``Checkpoint`` (CPU tensors).

    ``merge_shapes`` are the tensors a merge writes: the module's parameters (tied
    ones once) and its floating-point buffers that the state dict holds; anything
    else (integer buffers such as step counters) keeps the resident copy's value.
    """

    def __init__(self, ref: str, loader: str, module: nn.Module,
                 state_dict: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(module, nn.Module):
            raise ModelLoadError(f"loader {loader!r} returned {type(module).__name__} for "
                                 f"{ref!r}, not a torch.nn.Module (return (module, state_dict))")
        self.ref = ref
        self.loader = loader
        self.module = module
        self._tensors = {name: t.detach().cpu() for name, t in state_dict.items()
                         if isinstance(t, torch.Tensor)}
        wanted = [n for n, _ in module.named_parameters()]
        wanted += [n for n, b in module.named_buffers()
                   if b.is_floating_point() and n in self._tensors]
        missing = [n for n in wanted if n not in self._tensors]
        if missing:
            raise ModelLoadError(f"model {ref!r}: the state dict from {loader!r} lacks the "
                                 f"module's parameters {missing[:5]}; return module.state_dict()")
        self.merge_shapes = {n: tuple(self._tensors[n].shape) for n in wanted}

    @classmethod
    def load(cls, loader: str, ref: str) -> LoadedCheckpoint:
        """Call the loader ``"package.module:function"`` on ``ref``."""
        fn = import_function(loader, "models.loader")
        try:
            out = fn(ref)
        except ModelLoadError:
            raise
        except Exception as err:
            raise ModelLoadError(f"models.loader {loader!r} failed on {ref!r}: "
                                 f"{type(err).__name__}: {err}") from err
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
            raise ModelLoadError(f"models.loader {loader!r} must return (module, state_dict) "
                                 f"for {ref!r}, not {type(out).__name__}")
        return cls(ref, loader, *out)

    @cached_property
    def num_layers(self) -> int:
        """One more than the highest block index in the names (0: no blocks)."""
        found = [i for i in map(layer_index, self._tensors) if i is not None]
        return max(found) + 1 if found else 0

    @cached_property
    def config(self) -> LoadedConfig:
        layout = _digest([[n, list(s)] for n, s in self.merge_shapes.items()])
        return LoadedConfig(self.loader, self.num_layers, layout)

    def make_module(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """A copy of the loaded module on ``device`` in ``dtype``, holding this state dict
        (the loaded module and tensors are left untouched)."""
        module = copy.deepcopy(self.module)
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            module = module.to_empty(device=device)
        module = module.to(device=device, dtype=dtype)
        module.load_state_dict(self._tensors, strict=False)
        return module.eval()

    def identity(self) -> str:
        """A digest of the loader, the tensor index (names, dtypes, shapes) and a sample of
        every tensor's values (evenly spaced elements): what a resumed search must match."""
        parts = {"loader": self.loader}
        for name in sorted(self._tensors):
            t = self._tensors[name]
            flat = t.reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            sample = flat[::step][:_SAMPLE].to(torch.float64 if t.is_floating_point()
                                                else torch.int64)
            parts[name] = [str(t.dtype), list(t.shape),
                           hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]]
        return _digest(parts)

    def __repr__(self) -> str:
        return f"LoadedCheckpoint({self.ref!r}, loader={self.loader!r})"


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
