"""Search spaces: a small protocol (:class:`Space`) and a registry by ``kind``.

A space file (``search_spaces/*.yaml``) or an inline mapping names its
``kind``; :func:`load_space` validates it with that kind's config model and
binds it to the models.  Kinds:

* ``parameters`` (the default, so files without ``kind`` keep working):
  layer-wise merge parameters (:mod:`.parameters`);
* ``layer_path``: Sakana's data-flow space, which layers of which models run in
  which order, with an input scale per hop (:mod:`.layer_path`);
* ``components``: MERGE's component space, a source model or the merged value
  for each layer's attention and MLP block (:mod:`.components`).

Every space offers ``dims``, ``names``, ``x0``, ``start`` (``x0`` decoded),
``decode(genome) -> Recipe``, ``encode(recipe) -> genome``, ``describe()`` (one
line per part) and ``config`` (what fingerprints digest).  A new kind is one
module calling :func:`register_space`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mergesearch.configs import format_validation_error, read_yaml_mapping
from mergesearch.spaces.base import Models, Space, SpaceError


@dataclass(frozen=True)
class SpaceKind:
    """A registered kind: its config model and how to bind a config to models."""

    name: str
    config: type[BaseModel]
    build: Callable[[Any, Models], Space]
    doc: str = ""


_KINDS: dict[str, SpaceKind] = {}
DEFAULT_KIND = "parameters"


def register_space(name: str, config: type[BaseModel], build: Callable[[Any, Models], Space],
                   doc: str = "") -> SpaceKind:
    """Add a kind (its name must be new)."""
    if name in _KINDS:
        raise ValueError(f"search space kind {name!r} is already registered")
    _KINDS[name] = SpaceKind(name, config, build, doc)
    return _KINDS[name]


def space_kinds() -> dict[str, SpaceKind]:
    """All registered kinds by name."""
    return dict(sorted(_KINDS.items()))


def read_space(source: str | Path | Mapping[str, Any]) -> tuple[BaseModel, SpaceKind]:
    """Validate a space file or mapping with its kind's config model."""
    where, folder = "space", None
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        where, folder = str(source), Path(source).parent
        data = read_yaml_mapping(source, SpaceError, "search space file")
    name = data.get("kind", DEFAULT_KIND)
    kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise SpaceError(f"{where}.kind: unknown search space kind {name!r} "
                         f"(known: {', '.join(sorted(_KINDS))})")
    try:
        config = kind.config.model_validate(data, context={"folder": folder})
    except ValidationError as err:
        raise SpaceError(format_validation_error(err, where)) from None
    return config, kind


def load_space(source: str | Path | Mapping[str, Any] | BaseModel, *, base: str | None,
               sources: dict[str, str], num_layers: int, layer_key: str = "layers",
               seed: int = 0, tensor_names: Sequence[str] | None = None,
               layer_counts: Mapping[str, int] | None = None) -> Space:
    """Read a space (file, mapping, or a config model already read) and bind it to models.

    ``num_layers`` is the first model's depth; ``layer_counts`` (short name -> depth)
    gives the sources that differ (only a layer path can use models of other depths).
    """
    if isinstance(source, BaseModel):
        config = source
        kind = next((k for k in _KINDS.values() if isinstance(source, k.config)), None)
        if kind is None:
            raise SpaceError(f"{type(source).__name__} is not the config of a space kind")
    else:
        config, kind = read_space(source)
    models = Models(base=base, sources=dict(sources), num_layers=num_layers,
                    layer_key=layer_key, seed=seed,
                    tensor_names=None if tensor_names is None else list(tensor_names),
                    layer_counts=dict(layer_counts or {}))
    return kind.build(config, models)


# each module registers its kind
from mergesearch.spaces import components, layer_path, parameters  # noqa: E402

_ = (components, layer_path, parameters)

__all__ = ["Models", "Space", "SpaceError", "SpaceKind", "load_space", "read_space",
           "register_space", "space_kinds"]
