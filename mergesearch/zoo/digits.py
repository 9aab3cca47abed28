"""The digits testbed: M2N2's reference problem, an MLP on sklearn's 8x8 digits.

A merge problem that is not a language model, small enough for a test: the
1797 images of ``sklearn.datasets.load_digits`` (shipped inside scikit-learn,
no download), a fixed seeded 80/20 split, an MLP 64-256-10, and two experts
pretrained from one shared initialisation (the base), one on the digits 0-4
(``low``) and one on 5-9 (``high``): Adam, lr 3e-3, 10 full-batch epochs, as
in the M2N2 paper (shared/ALGORITHMS.md).  Each expert knows half the classes,
so each alone is right on under half the test set, and merging them helps.

The from-scratch setting (M2N2's other experiment) starts from untrained MLPs instead:
``scratch:<k>`` is the ``k``-th, torch's default initialisation seeded by ``k``.  Search
on ``split: train`` (M2N2 scores fitness on the training images) and report on ``test``:
``experiments/digits/pretrained.yaml`` and ``scratch.yaml`` do.

It plugs into an experiment through the two generic entry points::

    models:
      loader: mergesearch.zoo.digits:load
      base: base
      sources: {low: low, high: high}
    evaluator:
      backend: python
      function: mergesearch.zoo.digits:evaluate
      objectives: [{name: accuracy, metric: accuracy}]

The weights are built on first use (well under a second) and cached like the
zoo: ``$MERGESEARCH_DIGITS/<key>`` or ``~/.cache/mergesearch/digits/<key>``,
written atomically, the key a hash of the config and :data:`DIGITS_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergesearch.atomic import atomic_dir

#: Bump when a code change alters the built weights: it is part of the cache key.
DIGITS_VERSION = 1
MANIFEST = "manifest.json"
MODELS = {"base": None, "low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9)}
TASK = "digits"
SCRATCH_SEED = 10_000  # scratch:<k> is initialised with seed SCRATCH_SEED + k


@dataclass(frozen=True)
class DigitsConfig:
    """Everything that determines the data split and the weights."""

    hidden: int = 256
    epochs: int = 10  # full-batch Adam steps per expert
    lr: float = 3e-3
    test_fraction: float = 0.2
    split_seed: int = 0
    init_seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"config": asdict(self), "version": DIGITS_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class MLP(nn.Module):
    """64 -> hidden -> 10 with a ReLU; blocks named ``layers.0``/``layers.1``, so layer-wise
    merge settings address them."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, hidden), nn.Linear(hidden, 10)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](torch.relu(self.layers[0](x)))


@lru_cache(maxsize=4)
def load_split(split: str, test_fraction: float = 0.2,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [n, 64] in [0, 1], labels [n])`` of the ``train`` or ``test`` split: a
    ``seed``-seeded permutation, its first ``round(test_fraction * 1797)`` images the test
    set.  Item ids are positions in the split."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"digits has the splits train and test, not {split!r}")
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    n_test = round(test_fraction * len(order))
    idx = order[:n_test] if split == "test" else order[n_test:]
    x = torch.tensor(data.data[idx] / 16.0, dtype=torch.float32)
    return x, torch.tensor(data.target[idx], dtype=torch.long)


def pretrain(model: MLP, digits: tuple[int, ...], config: DigitsConfig) -> MLP:
    """Train ``model`` in place on the training images of ``digits`` (full-batch Adam)."""
    x, y = load_split("train", config.test_fraction, config.split_seed)
    keep = torch.isin(y, torch.tensor(digits))
    x, y = x[keep], y[keep]
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    for _ in range(config.epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def default_dir(config: DigitsConfig) -> Path:
    """``$MERGESEARCH_DIGITS/<key>`` or ``~/.cache/mergesearch/digits/<key>``."""
    from .build import cache_root

    return cache_root("MERGESEARCH_DIGITS", "digits") / config.key()


def build_digits(root: str | Path | None = None, *,
                 config: DigitsConfig | None = None) -> Path:
    """The folder holding ``base``, ``low`` and ``high`` (safetensors) and a manifest with
    their test accuracies: reused if built with this config, else built (atomically)."""
    config = config or DigitsConfig()
    root = Path(root).expanduser() if root is not None else default_dir(config)
    manifest = root / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == config.key():
        return root
    with atomic_dir(root, overwrite=True) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        base = MLP(config.hidden)
        states = {"base": {k: v.clone() for k, v in base.state_dict().items()}}
        for name, digits in MODELS.items():
            if digits is not None:
                expert = MLP(config.hidden)
                expert.load_state_dict(states["base"])
                states[name] = pretrain(expert, digits, config).state_dict()
        for name, state in states.items():
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / f"{name}.safetensors")
        uniform = {k: (states["low"][k] + states["high"][k]) / 2 for k in states["base"]}
        accuracy = {name: _accuracy(state, config) for name, state in
                    [*states.items(), ("uniform_merge", uniform)]}
        (tmp / MANIFEST).write_text(json.dumps({
            "key": config.key(), "version": DIGITS_VERSION, "config": asdict(config),
            "models": {n: f"{n}.safetensors" for n in states},
            "test_accuracy": accuracy, "torch": torch.__version__}, indent=2) + "\n")
    return root


def _accuracy(state: dict[str, torch.Tensor], config: DigitsConfig) -> float:
    model = MLP(config.hidden)
    model.load_state_dict(state)
    x, y = load_split("test", config.test_fraction, config.split_seed)
    with torch.no_grad():
        return round(float((model(x).argmax(-1) == y).float().mean()), 6)


def scratch(k: int, config: DigitsConfig | None = None) -> MLP:
    """The ``k``-th untrained MLP of the from-scratch setting: torch's default init, seeded
    by ``k`` (never the pretrained halves' shared initialisation, which is seed
    ``init_seed``)."""
    config = config or DigitsConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SCRATCH_SEED + k)
        return MLP(config.hidden)


def load(ref: str) -> tuple[MLP, dict[str, torch.Tensor]]:
    """The loader entry point: ``base``, ``low``, ``high`` (built on first use),
    ``scratch:<k>`` (the ``k``-th untrained MLP of the from-scratch setting, k >= 0), or a
    path to a ``.safetensors`` state dict of this MLP."""
    config = DigitsConfig()
    if ref.startswith("scratch:"):
        k = ref.removeprefix("scratch:")
        if not k.isdigit():
            raise ValueError(f"digits model {ref!r}: scratch:<k> takes a number k >= 0")
        model = scratch(int(k), config)
        return model, {n: t.detach().clone() for n, t in model.state_dict().items()}
    if ref in MODELS:
        path = build_digits(config=config) / f"{ref}.safetensors"
    else:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"digits model {ref!r}: use base, low, high, scratch:<k> "
                                    "or the path of a .safetensors state dict")
    state = load_file(path)
    model = MLP(config.hidden)
    model.load_state_dict(state)
    return model, state


def evaluate(model: nn.Module, split: str = "test", *, fidelity: float = 1.0, seed: int = 0,
             limit: int | None = None, subset_seed: int = 0) -> dict:
    """The evaluator entry point: per-image correctness on ``split`` (task ``digits``,
    metric ``accuracy``).

    ``limit`` keeps a ``subset_seed``-seeded sample of that many images; ``fidelity < 1``
    scores the first ``ceil(fidelity * n)`` of a ``seed``-seeded shuffle of those (so lower
    fidelities nest in higher ones).  Item ids are positions in the split.
    """
    config = DigitsConfig()
    x, y = load_split(split, config.test_fraction, config.split_seed)
    items = _sample(list(range(len(y))), limit, f"{subset_seed}:{TASK}")
    if fidelity < 1:
        items = _sample(items, max(1, math.ceil(fidelity * len(items) - 1e-9)),
                        f"{seed}:{TASK}")
    param = next(model.parameters())
    idx = torch.tensor(items, dtype=torch.long)
    with torch.no_grad():
        pred = model(x[idx].to(param.device, param.dtype)).argmax(-1).cpu()
    correct = (pred == y[idx]).tolist()
    return {"correct": {TASK: correct}, "items": {TASK: items},
            "scores": {TASK: {"accuracy": sum(correct) / len(correct)}}}


def _sample(items: list[int], k: int | None, key: str) -> list[int]:
    """``k`` of ``items`` from a ``key``-seeded shuffle, in their order (all if ``k`` is
    None or not smaller)."""
    if k is None or k >= len(items):
        return list(items)
    order = list(items)
    random.Random(key).shuffle(order)
    return sorted(order[:k])
