"""What every search space is: the :class:`Space` protocol, its error and its binding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from mergesearch.errors import MergesearchError
from mergesearch.recipe import Recipe
from mergesearch.strategies.base import Dimension


class SpaceError(MergesearchError, ValueError):
    """A search space is invalid or does not fit the models; the message names the fix."""


@runtime_checkable
class Space(Protocol):
    """A genome <-> :class:`~mergesearch.recipe.Recipe` mapping bound to a set of models.

    ``dims`` are the genome's coordinates (real, int, categorical as a choice index,
    binary); ``x0`` their start values and ``start`` the recipe ``x0`` decodes to;
    ``config`` the space as written (pydantic), which fingerprints digest.
    ``decode`` raises :class:`SpaceError` for a genome that gives no valid recipe
    (the controller records such a candidate as a failed trial); ``encode`` raises it
    for a recipe the space cannot express.
    """

    config: BaseModel
    dims: list[Dimension]

    @property
    def names(self) -> list[str]: ...

    @property
    def x0(self) -> np.ndarray: ...

    @property
    def start(self) -> Recipe: ...

    def decode(self, genome: Sequence[float]) -> Recipe: ...

    def encode(self, recipe: Recipe) -> np.ndarray: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Models:
    """What a space is bound to: the base, the sources (short name -> reference), the
    depth (``num_layers`` of the first model; ``layer_counts`` per source where they
    differ), the block key in tensor names, the recipe seed and, optionally, the first
    model's tensor names (to check module filters)."""

    base: str | None
    sources: dict[str, str]
    num_layers: int
    layer_key: str = "layers"
    seed: int = 0
    tensor_names: list[str] | None = None
    layer_counts: dict[str, int] = field(default_factory=dict)

    def depth(self, name: str) -> int:
        return self.layer_counts.get(name, self.num_layers)


class GenomeDims:
    """What every space derives from its ``dims`` alike: the start point and the names."""

    dims: list[Dimension]

    @property
    def x0(self) -> np.ndarray:
        return np.array([d.init for d in self.dims])

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]


def genome_array(genome: Sequence[float], dims: Sequence[Dimension]) -> np.ndarray:
    """``genome`` as a float vector, refused when its length is not the space's."""
    genome = np.asarray(genome, dtype=float)
    if genome.shape != (len(dims),):
        raise SpaceError(f"genome has {genome.size} values, the space has {len(dims)}")
    return genome


def source_index(data: Mapping[str, Any] | Sequence[Any], names: Sequence[str],
                 where: str) -> dict[str, Any]:
    """A per-source value given as ``{name: value}`` (``"*"``: every other source) or as a
    list in source order, as one value per source name."""
    if isinstance(data, Mapping):
        unknown = [k for k in data if k != "*" and k not in names]
        if unknown:
            raise SpaceError(f"{where}: {unknown[0]!r} is not a source model "
                             f"(sources: {', '.join(names)})")
        missing = [n for n in names if n not in data and "*" not in data]
        if missing:
            raise SpaceError(f"{where}: no value for {', '.join(missing)}: name every source "
                             "or add '*' for the rest")
        return {n: data.get(n, data.get("*")) for n in names}
    if len(data) != len(names):
        raise SpaceError(f"{where}: {len(data)} values for {len(names)} sources "
                         f"({', '.join(names)}); give one per source, in order")
    return dict(zip(names, data, strict=True))
