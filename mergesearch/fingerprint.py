"""What a search's results depend on, by content, so a resume cannot mis-attribute them.

A study records its fingerprint when it is created; resuming compares the
fingerprint of the experiment at hand with it and refuses on any difference,
naming the differing parts.  Content, not paths: the search space's
definition, the evaluation suite's files, each model's identity, the settings
that change a score (evaluator, dtype, device type, worker class), the
strategy and seed, and the versions of the libraries the strategy draws its
randomness from (an upgrade may make the replayed strategy propose other
genomes under the same candidate ids).

A model's identity is its config, its tensor index (names, dtypes, shapes) and
a sample of its weight bytes (16 x 4 KiB per file): cheap for a 70B
checkpoint, and it tells apart two fine-tunes of one base, which share config
and index.
"""

from __future__ import annotations

import hashlib
import json
import struct
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergesearch.controller import BoundExperiment

_SAMPLES = 16
_SAMPLE_BYTES = 4096
# config keys that name where or with what a checkpoint was saved, not what it is
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "_commit_hash")
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _digest(data: Any) -> str:
    blob = data if isinstance(data, bytes) else json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tree_digest(path: str | Path) -> str:
    """A digest of a folder's files (relative names and bytes), or of one file."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _sample(file: Path, start: int) -> bytes:
    """Bytes at evenly spaced places of a file's data region (from ``start``)."""
    size = file.stat().st_size
    span = max(size - start, 0)
    out = []
    with open(file, "rb") as f:
        for k in range(_SAMPLES):
            f.seek(start + span * k // _SAMPLES)
            out.append(f.read(_SAMPLE_BYTES))
    return b"".join(out)


def _safetensors_index(file: Path) -> tuple[dict[str, Any], int]:
    """Tensor name -> (dtype, shape) from a safetensors header, and where the data starts."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"]) for k, v in header.items()}, 8 + n


def model_identity(path: str | Path) -> str:
    """A digest of a checkpoint folder: config, tensor index and sampled weight bytes."""
    path = Path(path)
    parts: dict[str, Any] = {}
    for name in ("config.json", "adapter_config.json"):
        if (path / name).is_file():
            config = json.loads((path / name).read_text())
            parts[name] = {k: v for k, v in config.items() if k not in _CONFIG_NOISE}
    for file in sorted(p for p in path.iterdir() if p.suffix in _WEIGHTS):
        if file.suffix == ".safetensors":
            index, start = _safetensors_index(file)
        else:
            index, start = {"size": file.stat().st_size}, 0
        parts[file.name] = {"index": index, "sample": _digest(_sample(file, start))}
    return _digest(parts)


def of_search(search: BoundExperiment) -> dict[str, Any]:
    """The fingerprint of a bound search (see the module docstring)."""
    from mergesearch.models.checkpoint import resolve_model_dir

    exp = search.exp
    evaluator = exp.evaluator.model_dump(mode="json")
    evaluator.pop("suite", None)
    # tracked metrics change what is shown, not a score: adding one continues the study
    # (its earlier trials show none)
    evaluator.pop("track", None)
    fp: dict[str, Any] = {
        "strategy": exp.strategy.model_dump(mode="json"),
        "seed": exp.seed,
        "space": _digest(search.space.config.model_dump(mode="json")),
        # the genome's layout: which value means what (source order, granularity, kinds)
        "space.dimensions": _digest([[d.name, d.kind, d.low, d.high, list(d.choices)]
                                     for d in search.space.dims]),
        "evaluator": evaluator,
        "evaluator.suite": tree_digest(search.suite) if search.suite is not None else None,
        "models.options": {"allow_pickle": exp.models.allow_pickle,
                           "trust_remote_code": exp.models.trust_remote_code},
        "execution.dtype": search.worker_spec.dtype,
        "execution.device": search.device_type,
        "execution.worker_class": exp.execution.worker_class,
        "libraries": {lib: _version(lib) for lib in search.strategy.rng_libraries},
    }
    refs = ({"models.base": search.base} if search.base else {}) | {
        f"models.sources.{name}": ref for name, ref in search.sources.items()}
    for key, ref in refs.items():
        if exp.models.loader is not None and not ref.startswith("recipe:"):  # any torch model
            from mergesearch.models.generic import LoadedCheckpoint

            fp[key] = LoadedCheckpoint.load(exp.models.loader, ref).identity()
            continue
        fp[key] = _digest(ref) if ref.startswith("recipe:") else \
            model_identity(resolve_model_dir(ref))  # a recipe-defined model: its recipe
    return fp


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys whose values differ, as a reader wants them: ``space``, ``models.sources.rev``,
    ``library optuna 4.5.0 -> 5.0.0``."""
    out = []
    for key in sorted(before.keys() | now.keys()):
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        if key == "libraries" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"library {lib} {a.get(lib)} -> {b.get(lib)}"
                    for lib in sorted(a.keys() | b.keys()) if a.get(lib) != b.get(lib)]
        elif isinstance(a, str | int | float | None) and isinstance(b, str | int | float | None) \
                and key.startswith("execution."):
            out.append(f"{key} ({a} -> {b})")
        else:
            out.append(key)
    return out
