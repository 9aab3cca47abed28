"""Opening checkpoints: local directories or hub ids, safetensors memory-mapped.

Weights are read with ``safetensors.safe_open``, which maps the file instead of
copying it: a worker holding several sources pays in page cache, shared with
every other process reading the same files.  Pickle checkpoints (``.bin``,
``.pt``) can run code when loaded, so they are refused unless the caller
passes ``allow_pickle=True``; even then they are loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from mergesearch.errors import MergesearchError

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class ModelLoadError(MergesearchError, RuntimeError):
    """A model cannot be found or read; the message names it and the fix."""


def resolve_model_dir(ref: str) -> Path:
    """A local directory for a model reference (a path or a hub id)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model {ref!r} is a file; give the checkpoint's directory")
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model {ref!r} not found: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                ref,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
            )
        )
    except Exception as err:  # offline, unknown repo, no access: all say the same to a user
        raise ModelLoadError(
            f"model {ref!r} is not a local directory and could not be fetched from the hub "
            f"({type(err).__name__}: {err}). Download it first or give a local path."
        ) from None


class Checkpoint:
    """Read access to one checkpoint's config and tensors (CPU, memory-mapped)."""

    def __init__(self, ref: str, *, allow_pickle: bool = False) -> None:
        self.ref = ref
        self.path = resolve_model_dir(ref)
        self._files = self._index(allow_pickle)

    def _index(self, allow_pickle: bool) -> dict[str, Path]:
        """Tensor name -> file holding it (every safetensors file's header read and checked
        against its size, so a truncated or corrupt file fails here, naming itself)."""
        index_file = self.path / "model.safetensors.index.json"
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
                files = {name: self.path / file for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise self._error(index_file, "not a valid index (a JSON object with a "
                                  "'weight_map' of tensor name -> shard file)") from None
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise self._error(index_file, f"names the shard {shard.name}, which is "
                                      "missing; copy it there or re-download the model")
                self._open(shard).keys()
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            files = {}
            for shard in shards:
                files.update(dict.fromkeys(self._open(shard).keys(), shard))
            return files
        pickles = sorted(p for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if not pickles:
            raise ModelLoadError(f"model {self.ref!r}: no .safetensors weights in {self.path}")
        if not allow_pickle:
            raise ModelLoadError(
                f"model {self.ref!r} has only pickle weights ({pickles[0].name}), which can run "
                "code when loaded. Convert it to safetensors, or opt in with allow_pickle=True "
                "(CLI: --allow-pickle) if you trust the file."
            )
        return {name: p for p in pickles for name in self._pickle(p)}

    def _error(self, file: Path, problem: str) -> ModelLoadError:
        return ModelLoadError(f"model {self.ref!r}: {file}: {problem}")

    def _open(self, file: Path):
        """A safetensors file opened for reading (its header parsed and checked)."""
        try:
            return safe_open(file, "pt")
        except Exception as err:  # SafetensorError, OSError: a damaged or unreadable file
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise self._error(file, f"not a readable safetensors file ({first}); it may be "
                              "truncated or corrupt: copy or download it again") from None

    def _pickle(self, file: Path) -> dict[str, torch.Tensor]:
        cache = self.__dict__.setdefault("_pickled", {})
        if file not in cache:
            try:
                cache[file] = torch.load(file, map_location="cpu", weights_only=True,
                                         mmap=True)
            except pickle.UnpicklingError:
                raise self._error(file, "refused by the safe pickle loader (it holds objects "
                                  "other than tensors, which could run code); convert it to "
                                  "safetensors where you trust it") from None
            except Exception as err:  # a truncated zip, not a torch file at all ...
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise self._error(file, f"cannot be read as a torch checkpoint ({first})"
                                  ) from None
        return cache[file]

    @cached_property
    def config(self) -> PretrainedConfig:
        try:
            return AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        except Exception as err:
            raise ModelLoadError(f"model {self.ref!r}: cannot read config.json ({err})") from None

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    @cached_property
    def _handles(self) -> dict[Path, object]:
        return {
            file: self._open(file)
            for file in set(self._files.values())
            if file.suffix == ".safetensors"
        }

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped (do not modify it in place)."""
        try:
            file = self._files[name]
        except KeyError:
            raise ModelLoadError(f"model {self.ref!r} has no tensor {name!r}") from None
        if file.suffix == ".safetensors":
            try:
                return self._handles[file].get_tensor(name)
            except Exception as err:  # listed in the index, absent from the shard; damaged
                raise self._error(file, f"cannot read tensor {name!r} ({err})") from None
        return self._pickle(file)[name]

    @cached_property
    def nbytes(self) -> int:
        """Bytes of every tensor in its stored dtype, read from the metadata only (so where
        to hold a model can be decided before any weight is touched)."""
        total = 0
        for name, file in self._files.items():
            if file.suffix == ".safetensors":
                info = self._handles[file].get_slice(name)
                total += math.prod(info.get_shape()) * _bits(info.get_dtype()) // 8
            else:
                t = self._pickle(file)[name]
                total += t.numel() * t.element_size()
        return total

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r})"


def _bits(dtype: str) -> int:
    """Bits per element of a safetensors dtype name (F32, BF16, F8_E4M3, BOOL, ...)."""
    digits = re.search(r"\d+", dtype)
    return int(digits.group()) if digits else 8
