"""Activation statistics on calibration items, collected on the worker and kept there.

BMM's and RegMean's merges (:mod:`mergesearch.merging.bmm`) need, per source model
and per linear module, the Gram matrix ``X^T X`` of the inputs that module sees when
that source runs on a few calibration items.  A :class:`CalibrationStore` computes
them the first time a merge asks for any of a source's Grams: it builds the source
model over the worker's pool (no weight copies where the pool's dtype matches), runs
the calibration batches once with forward pre-hooks on every ``nn.Linear``, keeps the
``in x in`` Grams (``in = weight.shape[1]``) keyed by the weight's tensor name, and
drops the model.  Every later merge over that source reads them from memory: one
forward pass over the calibration items per source per worker, never shipped back.

:class:`CalibratingWorker` is a :class:`~mergesearch.execution.worker.Worker` that
attaches a store to its merger's context (``execution.worker_class:
mergesearch.execution.calibration:CalibratingWorker``); each result carries the
calibration's cost (items run, per source, the first time) in ``cost`` and its time
in ``timings["calibrate"]``, so a cost budget counts it.

Calibration items (:func:`calibration_texts`): each source runs on the tasks named
after it (source ``rev`` on task ``zoo_rev``: RegMean's per-task Grams; a source no
task is named after, on every task), per task the first ``items_per_task`` documents
the search does not score (those beyond the evaluator's ``limit``), topped up with
search documents where there are too few; each runs as its prompt followed by its
reference answer (the gold choice for multiple choice), since a generating model's
linear modules see answer tokens as much as prompt tokens (``answers=False``: prompts
only).  On the hard zoo, whose search files hold only search items, the calibration
items are search items: their inputs and answers, as RegMean uses training data.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mergesearch.execution.worker import Worker, WorkerSpec
from mergesearch.merging.bmm import INPUT_GRAM
from mergesearch.merging.context import MergeContext
from mergesearch.trial import Candidate, Result

log = logging.getLogger(__name__)

Batch = torch.Tensor | dict[str, torch.Tensor]
"""One calibration batch: a tensor for ``model(x)``, or keyword tensors for ``model(**b)``
(``attention_mask`` then selects the tokens whose inputs count)."""


def linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    """``nn.Linear`` modules by their weight's tensor name (``...q_proj.weight``).

    A linear weight shared with an embedding (a tied output head) is left out: its
    stored tensor is the embedding table, which merges as a non-linear tensor.
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in embedded}


@torch.no_grad()
def input_grams(model: nn.Module, batches: Sequence[Batch]) -> tuple[dict[str, torch.Tensor],
                                                                      int]:
    """The Gram ``X^T X`` of every linear module's inputs over ``batches`` (float32, or
    float64 for a float64 model, on the model's device), and the number of input rows
    (tokens) they sum over."""
    modules = linear_weights(model)
    grams: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]
    rows = [0]

    def hook(name: str) -> Callable:
        def pre(module: nn.Linear, args: tuple) -> None:
            x = args[0]
            m = mask[0]
            if m is not None and x.ndim == m.ndim + 1 and x.shape[:-1] == m.shape:
                x = x[m]
            x = x.reshape(-1, x.shape[-1])
            if x.dtype != torch.float64:  # half-precision models sum in float32
                x = x.float()
            g = x.T @ x
            grams[name] = g if name not in grams else grams[name] + g
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if isinstance(batch, dict):
                m = batch.get("attention_mask")
                mask[0] = None if m is None else m.bool()
                rows[0] += int(mask[0].sum()) if m is not None else int(
                    batch["input_ids"].numel())
                model(**batch)
            else:
                mask[0] = None
                rows[0] += int(batch.reshape(-1, batch.shape[-1]).shape[0])
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return grams, rows[0]


class CalibrationStore:
    """Input Grams per source, collected on first use (one pass per source) and kept.

    ``build(source)`` gives the source's model; ``batches`` are the calibration batches,
    or ``batches(source) -> (batches, items)`` for calibration sets that differ by source;
    ``items`` how many calibration items fixed batches hold (the cost of one pass; by
    default one per batch).
    """

    def __init__(self, build: Callable[[str], nn.Module],
                 batches: Sequence[Batch] | Callable[[str], tuple[Sequence[Batch], int]],
                 items: int | None = None):
        self._build = build
        if callable(batches):
            self._batches = batches
        else:
            fixed = list(batches)
            count = len(fixed) if items is None else int(items)
            self._batches = lambda source: (fixed, count)
        self.grams: dict[str, dict[str, torch.Tensor]] = {}
        self.tokens: dict[str, int] = {}
        self.cost = 0.0  # calibration items run, all sources together
        self.seconds = 0.0

    def collect(self, source: str) -> dict[str, torch.Tensor]:
        """Every linear input Gram of ``source`` (collected now if not yet)."""
        if source not in self.grams:
            t0 = time.perf_counter()
            batches, items = self._batches(source)
            model = self._build(source)
            self.grams[source], self.tokens[source] = input_grams(model, batches)
            del model
            self.cost += items
            self.seconds += time.perf_counter() - t0
            log.info("calibration: %d linear input Grams of %s over %d tokens",
                     len(self.grams[source]), source, self.tokens[source])
        return self.grams[source]

    def gram(self, source: str, tensor: str) -> torch.Tensor | None:
        """The input Gram of linear weight ``tensor`` in ``source`` (None: not a linear
        weight of that model)."""
        return self.collect(source).get(tensor)

    def attach(self, context: MergeContext) -> None:
        """Answer the context's ``input_gram`` statistic from this store."""
        context.provide(INPUT_GRAM, self.gram)


def source_tasks(source: str, tasks: Sequence[str]) -> list[str]:
    """The tasks named after a source model (its folder's name, e.g. ``rev`` for task
    ``zoo_rev``), or every task when none is."""
    name = source.rstrip("/").rsplit("/", 1)[-1].lower()
    own = [t for t in tasks if name in re.split(r"[^a-z0-9]+", t.lower())]
    return own or list(tasks)


def calibration_texts(evaluator: Any, items_per_task: int, *, answers: bool = True,
                      tasks: Sequence[str] | None = None) -> list[str]:
    """``items_per_task`` calibration texts per task of an HF evaluator (``tasks``: only
    these): documents the search does not score first, then search documents; each its
    prompt and, with ``answers``, its reference answer (see the module docstring)."""
    only, tasks = tasks, getattr(evaluator, "tasks", None)
    if not isinstance(tasks, dict):
        raise TypeError(f"activation statistics need the hf evaluator backend (its tasks' "
                        f"prompts); {type(evaluator).__name__} has none: use data-free Grams")
    texts = []
    data = getattr(evaluator, "_data", {})
    for name in tasks if only is None else only:
        spec = tasks[name]
        docs = spec.docs()
        searched = getattr(data.get(name), "doc_ids", None) or list(range(len(docs)))
        chosen = set(searched)
        order = [i for i in range(len(docs)) if i not in chosen] + list(searched)
        for i in order[:items_per_task]:
            item = spec.render(docs[i], i)
            text = item.context
            if answers:
                answer = item.target if not item.choices else item.choices[item.gold]
                text += spec.target_delimiter + answer
            texts.append(text)
    return texts


def tokenised_batches(tokenizer: Any, prompts: Sequence[str], batch_size: int,
                      device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Right-padded ``input_ids`` / ``attention_mask`` batches of ``prompts``."""
    pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    ids = [x or [pad] for x in tokenizer(list(prompts))["input_ids"]]
    out = []
    for k in range(0, len(ids), batch_size):
        chunk = ids[k:k + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, row in enumerate(chunk):
            input_ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        out.append({"input_ids": input_ids.to(device), "attention_mask": mask.to(device)})
    return out


def source_module(worker: Worker, ref: str) -> nn.Module:
    """Source model ``ref`` over the worker's pool (a copy of a loader's module with that
    model's tensors, or an HF model over the pool's tensors)."""
    from mergesearch.models.generic import LoadedCheckpoint
    from mergesearch.models.path_model import source_model

    merger = worker.merger
    ckpt = merger.pool.checkpoint(ref)
    if isinstance(ckpt, LoadedCheckpoint):
        return ckpt.make_module(merger.device, merger.dtype)
    return source_model(merger.pool, ref, merger.dtype)


class CalibratingWorker(Worker):
    """A worker whose merges can ask for activation Grams (:class:`CalibrationStore`).

    Each source runs on the calibration items of its own tasks (those named after it,
    :func:`source_tasks`: RegMean's per-task Grams), every task's when none is.
    Subclass to change the calibration set: ``items_per_task`` and ``own_tasks`` (class
    attributes; :class:`EveryTaskCalibratingWorker` runs every source on every task), or
    :meth:`calibration_batches` for models the hf evaluator does not score.
    """

    items_per_task: ClassVar[int] = 32
    batch_size: ClassVar[int] = 32
    own_tasks: ClassVar[bool] = True  # False: every source on every task's items

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        if self.merger is None:  # an evaluator that merges inside itself (backend vllm)
            raise ValueError("execution.worker_class CalibratingWorker collects activation "
                             "Grams on the worker's resident model, which evaluator backend "
                             f"{self.spec.evaluator.get('backend')!r} does not have: use "
                             "backend hf, or the data-free Grams (activations: false)")
        self.calibration = CalibrationStore(lambda ref: source_module(self, ref),
                                            self.calibration_batches)
        self.merger.context.provide(INPUT_GRAM, self.calibration.gram)

    def calibration_batches(self, source: str) -> tuple[list[Batch], int]:
        """The calibration batches of ``source`` and how many items they hold."""
        tasks = list(getattr(self.evaluator, "tasks", None) or ())
        if self.own_tasks:
            tasks = source_tasks(source, tasks)
        texts = calibration_texts(self.evaluator, self.items_per_task, tasks=tasks)
        return (tokenised_batches(self.tokenizer, texts, self.batch_size, self.merger.device),
                len(texts))

    def evaluate(self, candidate: Candidate) -> Result:
        """As :meth:`Worker.evaluate`, plus the calibration run for it (if any) in the
        result's cost and timings."""
        store = self.calibration
        cost0, secs0 = store.cost, store.seconds
        result = super().evaluate(candidate)
        if store.cost > cost0:
            result.cost += store.cost - cost0
            result.timings["calibrate"] = store.seconds - secs0
        return result


class EveryTaskCalibratingWorker(CalibratingWorker):
    """A :class:`CalibratingWorker` whose sources all run on every task's calibration items
    (the objective's skills), not only on the tasks named after them: each source's Gram
    then counts its outputs wherever the merged model is scored."""

    own_tasks: ClassVar[bool] = False
