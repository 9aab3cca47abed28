"""Tiny synthetic model zoo: a base Llama and per-skill experts, built in code.

>>> from mergesearch.zoo import build_zoo, score_skill
>>> zoo = build_zoo()                      # ~3 min on 2 CPU cores, then cached
>>> model, tok = zoo.load_model("rev"), zoo.load_tokenizer()
>>> score_skill(model, tok, zoo.eval_items("rev"))["char_accuracy"]
"""

from .build import (
    METRICS,
    ZOO_VERSION,
    Zoo,
    ZooConfig,
    build_zoo,
    default_zoo_dir,
    score_all,
    uniform_merge,
)
from .hard import HARD_SKILLS, HardZooConfig, build_hard_zoo
from .scoring import generate_answers, score_skill
from .skills import SKILLS, Item, eval_items, is_heldout, load_eval_items, write_eval_files
from .tokenizer import build_tokenizer

__all__ = [
    "HARD_SKILLS",
    "METRICS",
    "SKILLS",
    "ZOO_VERSION",
    "Item",
    "HardZooConfig",
    "Zoo",
    "ZooConfig",
    "build_hard_zoo",
    "build_tokenizer",
    "build_zoo",
    "default_zoo_dir",
    "eval_items",
    "generate_answers",
    "is_heldout",
    "load_eval_items",
    "score_all",
    "score_skill",
    "uniform_merge",
    "write_eval_files",
]
