"""The gradient-cosine probe of Frank-Wolfe merging: how each pool source aligns with the
loss gradient at the merged model, reduced on the worker so gradients never leave it.

Called as a probe (``kind="mergesearch.execution.fw_probe:gradient_cosines"``) on a
candidate whose recipe is the current Frank-Wolfe iterate, after the worker merged it
into its resident model.  The candidate's ``meta`` names the pool:
``{"base": ref, "pool": [ref, ...], "proxy_items": 100}``.

1. The proxy loss: cross-entropy on the answer tokens (the continuation, and the end of
   sequence for generated answers; the gold choice's tokens for multiple choice) of the
   first ``proxy_items`` items of each task the worker's evaluator holds (the search
   items, never the report items), one gradient per task, and their sum.
2. The reduction: for every pool source ``i`` and parameter tensor ``p``, the inner
   product and cosine of each gradient with the task vector ``tau_ip = theta_ip - base_p``
   and the task vector's norm.  Sources are read one tensor at a time from their
   checkpoint files (:func:`transient_reader`), not kept in the worker's
   :class:`~mergesearch.models.resident.ModelPool`, so what the probe holds is the
   gradients and one source tensor: it does not grow with the size of the pool.

The cost it reports is ``3 x`` the proxy items (a forward and a backward pass are about
three forward passes), in the units trials report (items scored), so a ``budget.cost``
counts probes for what they cost.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mergesearch.execution.probes import ProbeError
from mergesearch.models.resident import ModelPool, check_finite

if TYPE_CHECKING:
    from mergesearch.execution.worker import Worker
    from mergesearch.trial import Candidate

PROBE = "mergesearch.execution.fw_probe:gradient_cosines"
TOTAL = "total"  # the key of the summed gradient, beside the tasks' own
BACKWARD_FACTOR = 3.0  # forward + backward, in forward passes


def proxy_rows(evaluator: Any, limit: int) -> dict[str, list[tuple[torch.Tensor, int, int]]]:
    """Per task: ``(token ids, first answer position, end)`` of its first ``limit`` items.

    Reads the rows an :class:`~mergesearch.evaluation.hf.HFEvaluator` tokenised once (the
    same items the search scores); other evaluator backends have no tokens to take a
    cross-entropy over.
    """
    data = getattr(evaluator, "_data", None)
    if data is None:
        raise ProbeError("the gradient-cosine probe needs the hf evaluator backend (token "
                         f"rows for a cross-entropy); this worker has {type(evaluator).__name__}")
    out = {}
    for name, task in data.items():
        rows = []
        for i in range(min(limit, task.n)):
            row = task.row_ptr[i] + (task.gold[i] if task.gold else 0)
            rows.append((task.ids[row], int(task.starts[row]) + 1, int(task.lengths[row])))
        out[name] = rows
    return out


def answer_loss(model: nn.Module, rows: list[tuple[torch.Tensor, int, int]],
                batch: int = 128) -> torch.Tensor:
    """Mean cross-entropy over every answer token of ``rows`` (teacher-forced)."""
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    count = sum(end - start for _, start, end in rows)
    for k in range(0, len(rows), batch):
        chunk = rows[k:k + batch]
        width = max(end for _, _, end in chunk)
        ids = torch.stack([r[0][:width] for r in chunk]).to(device)
        logits = model(input_ids=ids).logits.float()
        for j, (_, start, end) in enumerate(chunk):
            total = total + nn.functional.cross_entropy(
                logits[j, start - 1:end - 1], ids[j, start:end], reduction="sum")
    return total / max(count, 1)


def task_gradients(model: nn.Module, proxy: dict[str, list]) -> tuple[
        list[str], dict[str, list[torch.Tensor]], dict[str, float]]:
    """Parameter names, each task's gradient (and their sum under :data:`TOTAL`), losses."""
    params = [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]
    names = [n for n, _ in params]
    grads, losses = {}, {}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for task, rows in proxy.items():
                for _, p in params:
                    p.requires_grad_(True)
                loss = answer_loss(model, rows)
                grads[task] = [g.detach().float() for g in
                               torch.autograd.grad(loss, [p for _, p in params])]
                losses[task] = float(loss.detach())
    finally:
        model.train(was_training)
    grads[TOTAL] = [sum(g[i] for g in grads.values()) for i in range(len(names))]
    losses[TOTAL] = sum(losses.values())
    return names, grads, losses


@torch.no_grad()
def alignments(names: list[str], grads: dict[str, list[torch.Tensor]], base: str,
               sources: list[str], fetch) -> dict[str, Any]:
    """Per gradient key, source and tensor: inner product and cosine with the source's task
    vector, reading one source tensor at a time through ``fetch(ref, name)``."""
    keys = list(grads)
    gnorm = {k: [float(g.norm()) for g in grads[k]] for k in keys}
    dot = {k: [] for k in keys}
    cos = {k: [] for k in keys}
    tnorm = []
    for ref in sources:  # one source at a time, one tensor at a time
        rows = {k: ([], []) for k in keys}
        norms = []
        for i, name in enumerate(names):
            tau = fetch(ref, name).float() - fetch(base, name).float()
            norm = float(tau.norm())
            norms.append(norm)
            for k in keys:
                d = float(torch.dot(grads[k][i].reshape(-1), tau.reshape(-1)))
                denom = gnorm[k][i] * norm
                rows[k][0].append(d)
                rows[k][1].append(d / denom if denom > 0 else 0.0)
            del tau
        tnorm.append(norms)
        for k in keys:
            dot[k].append(rows[k][0])
            cos[k].append(rows[k][1])
    return {"keys": keys, "sources": list(sources), "tensors": list(names), "dot": dot,
            "cos": cos, "gnorm": gnorm, "tnorm": tnorm}


def transient_reader(pool: ModelPool, base: str):
    """``fetch(ref, name)`` for the probe: the base through the pool (held, as for every
    merge), every other source read from its checkpoint file and dropped after use, so
    the pool's cache does not grow by the distractors' tensors (on a GPU each tensor is
    copied over for its turn; ``hold: host`` pools keep theirs as they are)."""
    def fetch(ref: str, name: str) -> torch.Tensor:
        if ref == base:
            return pool.fetch(ref, name)
        x = pool.checkpoint(ref).tensor(name)
        check_finite(ref, name, x)
        return x.to(pool.device, non_blocking=True)
    return fetch


def gradient_cosines(worker: Worker, model: nn.Module, candidate: Candidate
                     ) -> tuple[dict[str, Any], float]:
    """The probe: proxy losses and per-(gradient, source, tensor) inner products and
    cosines with the pool's task vectors at the merged ``model``, and its cost."""
    meta = candidate.meta or {}
    base, pool = meta.get("base"), meta.get("pool")
    if not base or not pool:
        raise ProbeError("the gradient-cosine probe needs meta {'base': ref, 'pool': [ref, "
                         "...]} naming the base and the pool's sources")
    limit = int(meta.get("proxy_items", 100))
    proxy = proxy_rows(worker.evaluator, limit)
    names, grads, losses = task_gradients(model, proxy)
    merger_pool = worker.merger.pool
    known = merger_pool.checkpoint(base)
    kept = [i for i, n in enumerate(names) if n in known]  # tied heads are stored once
    names = [names[i] for i in kept]
    grads = {k: [g[i] for i in kept] for k, g in grads.items()}
    payload = alignments(names, grads, base, list(pool), transient_reader(merger_pool, base))
    items = sum(len(r) for r in proxy.values())
    payload["loss"] = {k: v for k, v in losses.items() if math.isfinite(v)}
    payload["items"] = items
    return payload, BACKWARD_FACTOR * items
