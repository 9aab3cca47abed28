"""Where a tensor sits in the layer stack, and layer-path (data-flow) assembly.

Decoder-only checkpoints name block tensors ``<prefix>.layers.<i>.<rest>``
(``h.<i>`` in GPT-2, ``blocks.<i>`` elsewhere).  Tensors outside the blocks are
*pre* (embeddings, which run before the first block) or *post* (final norm,
LM head).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_LAYER = re.compile(r"(?<![^.])(layers|h|blocks|layer)\.(\d+)\.")
# Input embeddings; GPT-NeoX's output head is called embed_out, so no bare "embed".
_PRE = ("embed_tokens", "embed_in", "embed_positions", "wte", "wpe", "word_embeddings")


def layer_index(name: str) -> int | None:
    """The block index of a tensor, or None for tensors outside the blocks."""
    m = _LAYER.search(name)
    return int(m.group(2)) if m else None


def layer_key(names: Iterable[str]) -> str:
    """The word naming the block list in these tensor names (``layers``, ``h``, ...)."""
    for name in names:
        m = _LAYER.search(name)
        if m:
            return m.group(1)
    return "layers"


def with_layer(name: str, index: int) -> str:
    """The same tensor name in block ``index``."""
    return _LAYER.sub(lambda m: f"{m.group(1)}.{index}.", name, count=1)


def is_pre(name: str) -> bool:
    """True for tensors outside the blocks that run before them (embeddings)."""
    return layer_index(name) is None and any(p in name for p in _PRE)


def gradient_position(name: str, num_layers: int) -> float:
    """Where a tensor reads a layer gradient, as mergekit does.

    Block ``i`` of ``L`` sits at ``i / (L - 1)`` (1 for a single block);
    tensors outside the blocks read position 0.
    """
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def lines_scale(name: str, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS scale of a tensor's task vector: ``alpha + beta * l / (L - 1)``.

    Our choice for tensors outside the blocks: embeddings take the shallowest
    scale (``alpha``), the final norm and head the deepest (``alpha + beta``).
    """
    index = layer_index(name)
    if index is None:
        depth = 0.0 if is_pre(name) else 1.0
    else:
        depth = index / (num_layers - 1) if num_layers > 1 else 1.0
    return alpha + beta * depth


@dataclass(frozen=True)
class Source:
    """Where one output tensor comes from: tensor ``name`` of model ``model``."""

    model: str
    name: str


def assemble_path(
    out_names: Iterable[str], hops: Sequence[tuple[str, int]]
) -> dict[str, Source]:
    """Map each tensor of the output model (one block per hop) to its source.

    ``out_names`` are the tensor names of a model with ``len(hops)`` blocks;
    block ``k`` is copied from layer ``hops[k][1]`` of model ``hops[k][0]``.
    Embeddings come from the first hop's model and the final norm and head
    from the last hop's model (as mergekit's passthrough does).
    """
    plan = {}
    for name in out_names:
        index = layer_index(name)
        if index is None:
            model = hops[0][0] if is_pre(name) else hops[-1][0]
            plan[name] = Source(model, name)
        else:
            model, layer = hops[index]
            plan[name] = Source(model, with_layer(name, layer))
    return plan
