"""Build (or reuse) the tiny zoo: one base model and one expert per skill.

Designed so that plain task arithmetic of all experts works, a little:

* the base is pretrained on a copy task plus every skill's *format* (real prompts
  with well-formed answers in the wrong order) and a 10% share of true answers,
  so it holds the machinery of every skill but is poor at all of them;
* each expert is a short, small-lr fine-tune of the base on its skill, with 30%
  of every batch replayed from the base's mixture so that its task vector leaves
  the other skills' behaviour alone.

Without the replay, or with a base that has never seen true answers, merges of
all experts fell back to the base (measured while designing the zoo).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from mergesearch.atomic import atomic_dir

from .scoring import score_skill
from .skills import COPY, SKILL_TABLE, SKILLS, Item, load_eval_items, train_item
from .tokenizer import build_tokenizer
from .train import make_model, train

logger = logging.getLogger(__name__)

#: Bump when a code change alters the built weights: it is part of the cache key.
ZOO_VERSION = 1
MANIFEST = "manifest.json"
METRICS = ("exact_match", "char_accuracy", "answer_logprob")


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines the zoo's weights (with the seed and ``ZOO_VERSION``)."""

    skills: tuple[str, ...] = tuple(SKILLS)
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    base_steps: int = 600
    base_lr: float = 3e-3
    base_batch_size: int = 64
    base_copy_fraction: float = 0.5  # rest: skill items, mostly with format-only answers
    base_real_fraction: float = 0.1  # share of those skill items with the true answer
    expert_steps: int = 150
    expert_lr: float = 1e-3
    expert_batch_size: int = 64
    expert_replay: float = 0.3  # share of each expert batch drawn from the base mixture
    merge_weight: float = 0.5  # canonical uniform task-arithmetic weight (manifest baseline)
    eval_limit: int | None = None  # items per skill scored into the manifest (None: all)

    @classmethod
    def tiny(cls) -> ZooConfig:
        """A seconds-fast variant (tiny model, a few steps) for tests: same code path."""
        return cls(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                   base_steps=12, base_batch_size=16, expert_steps=6, expert_batch_size=16,
                   eval_limit=16)

    def key(self, seed: int) -> str:
        """Short hash naming this config + seed + code version (the cache directory)."""
        blob = json.dumps({"config": asdict(self), "seed": seed, "version": ZOO_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Zoo:
    """A built zoo on disk: HF model directories plus ``manifest.json``."""

    root: Path
    base: Path
    experts: dict[str, Path]
    skills: list[str]
    manifest: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, root: str | Path) -> Zoo:
        """Open a complete zoo directory (one with a manifest)."""
        root = Path(root)
        manifest = json.loads((root / MANIFEST).read_text())
        return cls(
            root=root,
            base=root / manifest["models"]["base"],
            experts={s: root / manifest["models"][s] for s in manifest["skills"]},
            skills=list(manifest["skills"]),
            manifest=manifest,
        )

    def model_path(self, name: str) -> Path:
        """Directory of ``"base"`` or of the expert for skill ``name``."""
        if name == "base":
            return self.base
        if name not in self.experts:
            raise KeyError(f"zoo has no model {name!r}; choose 'base' or one of {self.skills}")
        return self.experts[name]

    def load_model(self, name: str = "base") -> PreTrainedModel:
        """``"base"`` or a skill's expert as a float32 ``LlamaForCausalLM``."""
        return AutoModelForCausalLM.from_pretrained(self.model_path(name), dtype=torch.float32)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.base)

    def eval_items(self, skill: str, limit: int | None = None) -> list[Item]:
        """Held-out evaluation items of one of this zoo's skills."""
        if skill not in self.skills:
            raise KeyError(f"zoo has no skill {skill!r}; choose one of {self.skills}")
        return load_eval_items(skill, limit)


def cache_root(env: str, name: str) -> Path:
    """Where a built-in testbed is cached: ``$<env>`` or ``~/.cache/mergesearch/<name>``."""
    parent = os.environ.get(env)
    root = Path(parent) if parent else Path.home() / ".cache" / "mergesearch" / name
    return root.expanduser()


def default_zoo_dir(config: ZooConfig, seed: int) -> Path:
    """``$MERGESEARCH_ZOO/<key>`` or ``~/.cache/mergesearch/zoo/<key>``."""
    return cache_root("MERGESEARCH_ZOO", "zoo") / config.key(seed)


def uniform_merge(
    base: Mapping[str, torch.Tensor], experts: Iterable[Mapping[str, torch.Tensor]], weight: float
) -> dict[str, torch.Tensor]:
    """Task arithmetic with one weight: ``base + weight * sum_i (expert_i - base)``.

    A reference baseline for the zoo (manifest, tests, benchmarks), not the
    project's merge library.
    """
    experts = list(experts)
    return {k: v + weight * sum(e[k] - v for e in experts) for k, v in base.items()}


def score_all(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    skills: Iterable[str],
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{skill: {metric: value}}`` for every skill (per-item lists dropped)."""
    out = {}
    for skill in skills:
        res = score_skill(model, tokenizer, load_eval_items(skill, limit))
        out[skill] = {m: round(res[m], 6) for m in METRICS}
    return out


def build_zoo(
    out: str | Path | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    config: ZooConfig | None = None,
) -> Zoo:
    """Build the zoo into ``out`` (default: :func:`default_zoo_dir`), or reuse it.

    A zoo already at ``out`` with the same config, seed and ``ZOO_VERSION`` is
    reused unless ``force``. The build happens in a temporary directory beside
    ``out`` that is renamed into place at the end, so an interrupted build never
    leaves a directory that looks complete. Deterministic for a given seed (same
    machine: it is trained at :data:`BUILD_THREADS` torch threads).
    """
    config = config or ZooConfig()
    unknown = [s for s in config.skills if s not in SKILL_TABLE]
    if unknown:
        raise ValueError(f"unknown zoo skills {unknown}; available: {SKILLS}")
    key = config.key(seed)
    root = Path(out).expanduser() if out is not None else default_zoo_dir(config, seed)
    return build_cached(root, key, force, lambda tmp: _build_into(tmp, config, seed, key,
                                                                   progress))


def build_cached(root: Path, key: str, force: bool, build: Callable[[Path], None]) -> Zoo:
    """The zoo at ``root`` if its manifest has ``key`` (and not ``force``), else one
    built by ``build(tmp)`` in a temporary folder renamed into place (an interrupted
    build never leaves a folder that looks complete). Refuses to replace a zoo with
    another key, or a folder that is not a zoo, unless ``force``."""
    if (root / MANIFEST).exists() and not force and (zoo := _reuse(root, key)):
        return zoo
    with _build_lock(root), _build_threads():
        # another process may have built it while this one waited for the lock
        if (root / MANIFEST).exists() and not force and (zoo := _reuse(root, key)):
            return zoo
        return _build_locked(root, force, build)


#: torch threads every zoo is trained with, whatever the caller's setting: float
#: reductions depend on the thread count, so a zoo built with another count has other
#: weights, and league figures made on one are not comparable with another's (one thread
#: also runs anywhere, and does not slow down on a loaded machine as two do). The weights
#: still depend on the CPU: benchmarks/RESULTS.md, "Zoo builds".
BUILD_THREADS = 1


@contextmanager
def _build_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reuse(root: Path, key: str) -> Zoo | None:
    """The zoo at ``root``; None when it was built with another thread count than
    :data:`BUILD_THREADS` (a stale cache, rebuilt)."""
    zoo = Zoo.load(root)
    if zoo.manifest.get("key") == key:
        threads = zoo.manifest.get("torch_threads", BUILD_THREADS)
        if threads != BUILD_THREADS:
            logger.warning("the zoo at %s was trained with %d torch threads, not %d; "
                           "rebuilding it", root, threads, BUILD_THREADS)
            return None
        logger.info("reusing zoo at %s", root)
        return zoo
    raise FileExistsError(
        f"{root} holds a zoo built with another config or seed; pass force=True to "
        "rebuild it or choose another directory"
    )


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """One builder per zoo folder across processes (benchmarks, tests and workers started
    together would otherwise each train the same zoo): an exclusive ``flock`` on a file
    named after the folder in the system's temporary folder; the others wait, then reuse
    what it built.  Where ``fcntl`` is missing (Windows) builds are not serialised, and
    stay correct (atomic rename)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    locks = Path(tempfile.gettempdir()) / "mergesearch-locks"
    locks.mkdir(exist_ok=True)
    name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    with open(locks / f"zoo-{name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another process is building the zoo at %s; waiting for it", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_locked(root: Path, force: bool, build: Callable[[Path], None]) -> Zoo:
    if not force and root.is_dir() and any(root.iterdir()) and not (root / MANIFEST).exists():
        raise FileExistsError(
            f"{root} exists and is not a zoo; pass force=True to replace it or choose another "
            "directory"
        )
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar of our own, not one per save
    try:
        with atomic_dir(root, overwrite=True) as tmp:
            build(tmp)
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()
    logger.info("built zoo at %s", root)
    return Zoo.load(root)


def _build_into(tmp: Path, config: ZooConfig, seed: int, key: str, progress: bool) -> None:
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    skills = [SKILL_TABLE[s] for s in config.skills]

    def base_sample(rng: random.Random) -> Item:
        if rng.random() < config.base_copy_fraction:
            return train_item(COPY, rng)
        return train_item(rng.choice(skills), rng, fake=rng.random() >= config.base_real_fraction)

    total = config.base_steps + config.expert_steps * len(skills)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    with (
        tqdm(total=total, desc="zoo: base", disable=not progress, unit="step") as bar,
        torch.random.fork_rng(devices=[]),
    ):
        torch.manual_seed(seed)
        base = make_model(
            len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        train(base, tokenizer, base_sample, random.Random(f"{seed}-base"),
              steps=config.base_steps, lr=config.base_lr, batch_size=config.base_batch_size,
              weight_decay=0.01, on_step=lambda *_: bar.update())
        _save(base, tokenizer, tmp / "base")
        scores["base"] = score_all(base, tokenizer, config.skills, config.eval_limit)
        base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
        expert_sds = []
        for skill in skills:
            bar.set_description(f"zoo: {skill.name}")
            expert = copy.deepcopy(base)

            def expert_sample(rng: random.Random, skill=skill) -> Item:
                if rng.random() < config.expert_replay:
                    return base_sample(rng)
                return train_item(skill, rng)

            train(expert, tokenizer, expert_sample, random.Random(f"{seed}-expert-{skill.name}"),
                  steps=config.expert_steps, lr=config.expert_lr,
                  batch_size=config.expert_batch_size, on_step=lambda *_: bar.update())
            _save(expert, tokenizer, tmp / "experts" / skill.name)
            scores[skill.name] = score_all(expert, tokenizer, config.skills, config.eval_limit)
            expert_sds.append({k: v.detach().clone() for k, v in expert.state_dict().items()})
    base.load_state_dict(uniform_merge(base_sd, expert_sds, config.merge_weight))
    scores["uniform_merge"] = score_all(base, tokenizer, config.skills, config.eval_limit)
    manifest = {
        "zoo_version": ZOO_VERSION,
        "key": key,
        "seed": seed,
        "config": asdict(config),
        "skills": list(config.skills),
        "models": {"base": "base", **{s: f"experts/{s}" for s in config.skills}},
        "uniform_merge": {"method": "task_arithmetic", "weight": config.merge_weight},
        "metrics": list(METRICS),
        "scores": scores,
        "build_seconds": round(time.perf_counter() - start, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "torch_threads": torch.get_num_threads(),  # bitwise reproducibility assumes the same
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
