"""Probes: named questions a strategy asks a worker about a merged model.

A probe request is a candidate whose ``kind`` is not ``"score"``.  The worker
merges its recipe into the resident model as for a trial, then calls the
probe, which returns a JSON payload (never weights) and optionally what it cost
in evaluation items.  The controller records the answer durably, beside the
trials but not among them, and tells it to the strategy.

A probe is registered by name with :func:`register_probe`, or named by import
path, ``"package.module:function"``; either way it is called as
``probe(worker, model, candidate)`` and returns ``payload`` or ``(payload, cost)``.
Built in: ``delta_stats``, the L2 norm and the share of exact zeros of the
merged model's change from the base, per tensor and overall.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from mergesearch.errors import MergesearchError
from mergesearch.models.sinks import ReducerSink, drain

if TYPE_CHECKING:
    from mergesearch.execution.worker import Worker
    from mergesearch.trial import Candidate

Probe = Callable[["Worker", torch.nn.Module, "Candidate"], Any]
_PROBES: dict[str, Probe] = {}


class ProbeError(MergesearchError, ValueError):
    """A probe cannot be found or answered something that is not a JSON payload."""


def register_probe(name: str) -> Callable[[Probe], Probe]:
    """Decorator: make ``fn`` answer probe requests of kind ``name``."""
    def decorate(fn: Probe) -> Probe:
        if name in _PROBES and _PROBES[name] is not fn:
            raise ValueError(f"probe {name!r} is already registered")
        _PROBES[name] = fn
        return fn
    return decorate


def get_probe(kind: str) -> Probe:
    if kind in _PROBES:
        return _PROBES[kind]
    module, sep, attr = kind.partition(":")
    if sep:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ProbeError(f"probe {kind!r} cannot be imported: {err}") from None
    raise ProbeError(f"unknown probe {kind!r}; built in: {', '.join(sorted(_PROBES))}, or "
                     "give one as module:function")


def answer(worker: Worker, model: torch.nn.Module, candidate: Candidate
           ) -> tuple[dict[str, Any], float]:
    """Run the candidate's probe: its payload (checked to be plain JSON) and cost."""
    out = get_probe(candidate.kind)(worker, model, candidate)
    payload, cost = out if isinstance(out, tuple) else (out, 0.0)
    if not isinstance(payload, dict):
        raise ProbeError(f"probe {candidate.kind!r} answered {type(payload).__name__}, not a "
                         "mapping")
    try:
        payload = json.loads(json.dumps(payload, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ProbeError(f"probe {candidate.kind!r} answered something that is not plain "
                         f"JSON: {err}") from None
    return payload, float(cost)


class _DeltaStats:
    """Per tensor and overall: the L2 norm of merged - base and its share of exact zeros."""

    def __init__(self) -> None:
        self.tensors: dict[str, dict[str, float]] = {}
        self.squares, self.zeros, self.count = 0.0, 0, 0

    def update(self, name: str, merged: torch.Tensor, base: torch.Tensor) -> None:
        delta = merged.float() - base.float()
        sq = float(delta.square().sum())
        z = int((delta == 0).sum())
        self.tensors[name] = {"l2": math.sqrt(sq), "zeros": z / delta.numel()}
        self.squares, self.zeros, self.count = (self.squares + sq, self.zeros + z,
                                                self.count + delta.numel())

    def payload(self) -> dict[str, Any]:
        return {"l2": math.sqrt(self.squares), "zeros": self.zeros / max(self.count, 1),
                "tensors": self.tensors}


@register_probe("delta_stats")
@torch.no_grad()
def delta_stats(worker: Worker, model: torch.nn.Module, candidate: Candidate) -> dict[str, Any]:
    """How far the merged model moved from its base: per tensor and overall, the L2 norm of
    the change and the share of its entries that are exactly zero (every tensor of the
    merged model that the base has, fed through a
    :class:`~mergesearch.models.sinks.ReducerSink`)."""
    base = candidate.recipe.base if candidate.recipe is not None else None
    if base is None:
        raise ProbeError("probe 'delta_stats' needs a recipe with a base model")
    pool = worker.merger.pool
    ckpt = pool.checkpoint(base)
    sink = ReducerSink(_DeltaStats(), lambda name: pool.fetch(base, name) if name in ckpt
                       else None)
    return drain(model.state_dict().items(), sink).payload()
