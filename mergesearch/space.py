"""Compatibility module: search spaces live in :mod:`mergesearch.spaces`.

``SearchSpace`` and ``SpaceConfig`` are the layer-wise parameter space
(``kind: parameters``); :func:`load_space` reads a space of any registered kind.
"""

from mergesearch.spaces import Space, SpaceError, load_space, space_kinds
from mergesearch.spaces.parameters import SearchSpace, SpaceConfig

__all__ = ["SearchSpace", "Space", "SpaceConfig", "SpaceError", "load_space", "space_kinds"]
