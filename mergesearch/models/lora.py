"""LoRA adapters as source models: ``W = W_base + scaling * B @ A``, built per tensor.

A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
reads like a full checkpoint through :class:`LoraCheckpoint`: the same names,
config and tensors as the model ``merge_and_unload()`` would give, but each
tensor is built only when it is asked for, from the base tensor (memory-mapped)
and the adapter's two small factors.  Nothing is cached here: whoever holds the
tensors (the merger's ``ModelPool``) decides what to keep, and a second cache
would only double the memory.

The base model is the recipe's base when the caller gives one (adapter configs
often name a hub id or a path on another machine), else the adapter config's
``base_model_name_or_path``.  :func:`open_checkpoint` is the factory: a
:class:`~mergesearch.models.checkpoint.Checkpoint` for a full model, a
:class:`LoraCheckpoint` for an adapter folder.

Adapters whose effect is not ``W + scaling * B @ A`` on stored tensors (DoRA,
other LoRA variants, IA3 and the other PEFT methods, layer replication, LoRA on
bare parameters) are refused with a :class:`ModelLoadError` naming the feature.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from transformers import PretrainedConfig

from mergesearch.merging.context import LoraFactors
from mergesearch.models.checkpoint import Checkpoint, ModelLoadError, resolve_model_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"

_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped transformers model

# ``<module>.lora_A.weight``, ``<module>.lora_B.bias``, ``<module>.lora_embedding_A``,
# each optionally with the adapter's name kept (``lora_A.default.weight``)
_FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?P<factor>lora_(?:embedding_)?[AB])"
    r"(?:\.(?!(?:weight|bias)$)[^.]+)?(?:\.(?P<leaf>weight|bias))?$"
)
# peft's wrappers around a layer's own tensors: the wrapped layer (``q_proj.base_layer.bias``,
# saved with ``bias="all"``) and a ``modules_to_save`` copy (``.modules_to_save.default``)
_WRAPPER = re.compile(r"\.(?:base_layer|modules_to_save(?:\.[^.]+)?)(?=\.[^.]+$)")

_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
"""Config fields that make an adapter more than ``W + scaling * B @ A``; peft's own
variant markers (dataclass field metadata) are read as well, so new variants are
refused too."""


def is_lora_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def open_checkpoint(ref: str, *, allow_pickle: bool = False,
                    base: str | Checkpoint | None = None) -> Checkpoint | LoraCheckpoint:
    """A model reference opened for reading: a :class:`LoraCheckpoint` for an adapter
    folder (on ``base`` if given, else the adapter's own base), else a ``Checkpoint``
    (``base`` is then ignored); a ``recipe:{...}`` reference is a recipe-defined model,
    merged once (:mod:`mergesearch.models.recipe_model`)."""
    if ref.startswith("recipe:"):
        from mergesearch.models.recipe_model import RecipeModel

        return RecipeModel(ref)
    if is_lora_adapter(resolve_model_dir(ref)):
        return LoraCheckpoint(ref, base=base, allow_pickle=allow_pickle)
    return Checkpoint(ref, allow_pickle=allow_pickle)


@dataclass
class _Update:
    """How the adapter changes one base tensor: a replacement, a delta added, or both."""

    replace: str | None = None  # adapter tensor replacing the base's (modules_to_save, bias)
    delta: Literal["lora", "bias"] | None = None
    keys: tuple[str, ...] = ()  # the delta's adapter tensors: (A, B) or (B's bias,)
    scaling: float = 1.0
    transpose: bool = False  # the delta is (B @ A).T: embeddings, Conv1D (fan_in_fan_out)


class LoraCheckpoint:
    """A LoRA adapter read as the full model it makes with its base (CPU, on demand).

    Offers the read interface of :class:`~mergesearch.models.checkpoint.Checkpoint`
    (``ref``, ``path``, ``config``, ``names``, ``in``, ``tensor``, ``nbytes``,
    ``num_layers``).  ``base`` is a model reference or an open ``Checkpoint``; a
    reference equal to ``ref`` itself is ignored (a recipe may list the adapter as
    its own base).
    """

    def __init__(self, ref: str, *, base: str | Checkpoint | None = None,
                 allow_pickle: bool = False) -> None:
        self.ref = ref
        self.path = resolve_model_dir(ref)
        self.lora_config = _read_config(ref, self.path)
        self.base = self._open_base(base, allow_pickle)
        self._base_names = set(self.base.names)
        self._adapter = _AdapterFile(ref, self.path, allow_pickle)
        self._updates = self._plan()

    def _open_base(self, base: str | Checkpoint | None, allow_pickle: bool) -> Checkpoint:
        if isinstance(base, Checkpoint):
            return base
        base_ref = base if base and base != self.ref else self.lora_config.base_model_name_or_path
        if not base_ref:
            raise ModelLoadError(
                f"LoRA adapter {self.ref!r} does not name its base model "
                "(base_model_name_or_path is empty): give the base explicitly (a recipe's base)"
            )
        try:
            if is_lora_adapter(resolve_model_dir(base_ref)):
                raise ModelLoadError(f"{base_ref!r} is itself an adapter; give the full model "
                                     "it was trained on (or merge that adapter first)")
            return Checkpoint(base_ref, allow_pickle=allow_pickle)
        except ModelLoadError as err:
            raise ModelLoadError(
                f"LoRA adapter {self.ref!r}: cannot open its base model {base_ref!r}: {err}. "
                "If the adapter config's base_model_name_or_path is out of date, give the base "
                "explicitly (a recipe's base)"
            ) from None

    # ------------------------------------------------------------- planning
    def _plan(self) -> dict[str, _Update]:
        """Base tensor name -> the update the adapter makes to it, checked against the base."""
        factors: dict[str, dict[str, str]] = {}  # peft module name -> factor -> key
        updates: dict[str, _Update] = {}
        for key in self._adapter.keys():
            short = key.removeprefix(_PREFIX)
            found = _FACTOR.match(short)
            if found:
                factor = found["factor"] + (".bias" if found["leaf"] == "bias" else "")
                factors.setdefault(found["module"], {})[factor] = key
            elif any(part.startswith("lora_") for part in short.split(".")):
                raise ModelLoadError(f"LoRA adapter {self.ref!r}: tensor {key!r} is not a LoRA "
                                     "factor this reader knows (an unsupported PEFT variant?)")
            else:  # a modules_to_save copy or a trained bias: replaces the base's tensor
                self._add(updates, _WRAPPER.sub("", short), key, replace=key)

        for module, parts in factors.items():
            scaling = self._scaling(module, parts)
            for a, b in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
                if a in parts or b in parts:
                    if a not in parts or b not in parts:
                        have = parts.get(a) or parts.get(b)
                        raise ModelLoadError(f"LoRA adapter {self.ref!r}: {have!r} has no "
                                             f"{b if a in parts else a} partner; the file is "
                                             "incomplete")
                    transpose = a == "lora_embedding_A" or bool(self.lora_config.fan_in_fan_out)
                    self._add(updates, f"{module}.weight", parts[a], delta="lora",
                              keys=(parts[a], parts[b]), scaling=scaling, transpose=transpose)
            if "lora_B.bias" in parts:  # lora_bias: B's bias, scaled, adds to the layer's bias
                key = parts["lora_B.bias"]
                self._add(updates, f"{module}.bias", key, delta="bias", keys=(key,),
                          scaling=scaling)
        return updates

    def _scaling(self, module: str, parts: dict[str, str]) -> float:
        """alpha / r (rsLoRA: alpha / sqrt(r)), with the module's rank and alpha patterns."""
        cfg = self.lora_config
        r = _pattern_value(cfg.rank_pattern or {}, module, cfg.r)
        alpha = _pattern_value(cfg.alpha_pattern or {}, module, cfg.lora_alpha)
        a = parts.get("lora_A") or parts.get("lora_embedding_A")
        if a is not None and self._adapter.shape(a)[0] != r:
            raise ModelLoadError(
                f"LoRA adapter {self.ref!r}: {a!r} has rank {self._adapter.shape(a)[0]} but its "
                f"config says r={r} (r / rank_pattern); the config does not match the weights"
            )
        return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r

    def _add(self, updates: dict[str, _Update], name: str, key: str, **fields) -> None:
        """Record ``fields`` of the update to the base tensor ``name`` means."""
        base_name = _match_name(name, self._base_names)
        if base_name is None:
            raise ModelLoadError(
                f"LoRA adapter {self.ref!r}: tensor {key!r} matches no tensor of its base "
                f"{self.base.ref!r} (or several); is the adapter for this base model?"
            )
        update = updates.setdefault(base_name, _Update())
        if fields.get("replace") and update.replace or fields.get("delta") and update.delta:
            raise ModelLoadError(f"LoRA adapter {self.ref!r} changes {base_name!r} twice "
                                 f"(again with {key!r})")
        for field, value in fields.items():
            setattr(update, field, value)

    # ------------------------------------------------------------- reading
    @property
    def config(self) -> PretrainedConfig:
        return self.base.config

    @property
    def names(self) -> list[str]:
        return self.base.names

    def __contains__(self, name: str) -> bool:
        return name in self.base

    @property
    def touched(self) -> list[str]:
        """Names of the tensors the adapter changes (the others are the base's)."""
        return list(self._updates)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor of the adapted model, in the base's dtype (computed in float32);
        an untouched tensor is the base's own, memory-mapped (do not modify it in place)."""
        if name not in self.base:
            raise ModelLoadError(f"model {self.ref!r} has no tensor {name!r}")
        w = self.base.tensor(name)
        update = self._updates.get(name)
        if update is None:
            return w
        out = w
        if update.replace:
            out = self._adapter.get(update.replace)
            self._check_shape(name, out, w, "replacement")
        if update.delta:
            delta = self._delta(update)
            self._check_shape(name, delta, w, "delta")
            out = out.float() + delta
        return out.to(w.dtype)

    def factors(self, name: str) -> LoraFactors | None:
        """The update to ``name`` as its two LoRA factors (as stored, on CPU), for merges
        that work on factors; rank 0 where the adapter leaves the tensor alone, None where
        its change is not ``scaling * B @ A`` alone (a replaced tensor, a bias update)."""
        if name not in self.base:
            raise ModelLoadError(f"model {self.ref!r} has no tensor {name!r}")
        update = self._updates.get(name)
        if update is None:
            return LoraFactors(None, None)
        if update.delta != "lora" or update.replace:
            return None
        a, b = (self._adapter.get(key) for key in update.keys)
        return LoraFactors(a, b, update.scaling, update.transpose)

    def _delta(self, update: _Update) -> torch.Tensor:
        """What a LoRA update adds, in float32 (peft's order: (B @ A), transposed, scaled)."""
        if update.delta == "bias":
            return self._adapter.get(update.keys[0]).float() * update.scaling
        a, b = (self._adapter.get(key).float() for key in update.keys)
        delta = b @ a
        return (delta.T if update.transpose else delta) * update.scaling

    def _check_shape(self, name: str, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        if got.shape != want.shape:
            hint = " (is fan_in_fan_out right?)" if what == "delta" and got.ndim == 2 else ""
            raise ModelLoadError(
                f"LoRA adapter {self.ref!r} gives {name!r} a {what} of shape {list(got.shape)}, "
                f"but its base {self.base.ref!r} has {list(want.shape)}: is the adapter for "
                f"this base{hint}?"
            )

    @cached_property
    def nbytes(self) -> int:
        """Bytes of every tensor: the base's, since each keeps the base's shape and dtype."""
        return self.base.nbytes

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    def __repr__(self) -> str:
        return f"LoraCheckpoint({self.ref!r}, base={self.base.ref!r})"


class _AdapterFile:
    """The adapter's tensors: safetensors memory-mapped, or (opt-in) a pickle file."""

    def __init__(self, ref: str, path: Path, allow_pickle: bool) -> None:
        safe, pickle = path / ADAPTER_WEIGHTS, path / ADAPTER_PICKLE
        self._handle = self._tensors = None
        try:
            if safe.is_file():
                self._handle = safe_open(safe, "pt")
            elif pickle.is_file() and allow_pickle:
                self._tensors = torch.load(pickle, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, corrupt, or a pickle holding more than tensors
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelLoadError(f"LoRA adapter {ref!r}: cannot read its weights ({first}); "
                                 "the file may be truncated or corrupt: copy it again") from None
        if self._handle is not None or self._tensors is not None:
            return
        if pickle.is_file():
            raise ModelLoadError(
                f"LoRA adapter {ref!r} has only pickle weights ({ADAPTER_PICKLE}), which can run "
                "code when loaded. Convert it to safetensors, or opt in with allow_pickle=True "
                "(CLI: --allow-pickle) if you trust the file."
            )
        raise ModelLoadError(f"LoRA adapter {ref!r}: no {ADAPTER_WEIGHTS} in {path}")

    def keys(self) -> list[str]:
        return list(self._handle.keys() if self._handle is not None else self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._handle is not None:
            return tuple(self._handle.get_slice(key).get_shape())
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key) if self._handle is not None else self._tensors[key]


def _read_config(ref: str, path: Path):
    """The adapter's ``LoraConfig``; other PEFT methods and LoRA variants are refused."""
    from peft import LoraConfig, PeftConfig  # imported here: peft is slow to import

    try:
        config = PeftConfig.from_pretrained(str(path))
    except Exception as err:
        raise ModelLoadError(
            f"adapter {ref!r}: cannot read {ADAPTER_CONFIG} ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(config, LoraConfig):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise ModelLoadError(
            f"adapter {ref!r} is a PEFT {kind} adapter; only LoRA adapters can be merged. "
            "Merge it into its base with peft (merge_and_unload) and use that checkpoint"
        )
    found = [label for name, label in _FEATURES.items() if getattr(config, name, None)]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        marked = field.metadata.get("is_lora_variant") and value
        if marked or (isinstance(value, str) and value in field.metadata.get("lora_variants", ())):
            label = _FEATURES.get(field.name, f"{field.name}={value!r}")
            if label not in found:
                found.append(label)
    if found:
        raise ModelLoadError(
            f"LoRA adapter {ref!r} uses {', '.join(found)}, which is not W + scale * B @ A "
            "and cannot be merged as a LoRA source. Merge it into its base with peft "
            "(merge_and_unload) and use that checkpoint"
        )
    return config


def _pattern_value(patterns: dict, module: str, default):
    """The value of the first pattern matching the end of a module name (peft's rule for
    ``rank_pattern`` and ``alpha_pattern``: the key is a regex for the last name parts)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _match_name(name: str, names: set[str]) -> str | None:
    """The base tensor an adapter's tensor name means: the same name, or the one name that
    differs only by leading parts (an adapter trained on the bare decoder, or saved with an
    extra wrapper prefix); ``None`` if there is none or several."""
    if name in names:
        return name
    hits = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None
