"""Tokenizer, skill generators, held-out split and the committed eval files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mergesearch.zoo import SKILLS, build_tokenizer, eval_items, is_heldout, load_eval_items
from mergesearch.zoo.skills import COPY, SKILL_TABLE, train_item, write_eval_files

REPO = Path(__file__).resolve().parents[2]


def test_tokenizer_round_trips_adds_bos_and_reloads(tmp_path: Path) -> None:
    tok = build_tokenizer()
    text = "rev hello=olleh"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character, plus <bos>
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.decode(ids, skip_special_tokens=True) == text
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tok.unk_token_id not in tok("0123456789 abcdefghijklmnopqrstuvwxyz=")["input_ids"]


@pytest.mark.parametrize("skill", SKILLS)
def test_items_are_well_formed_and_solved(skill: str) -> None:
    tok = build_tokenizer()
    rng = random.Random(0)
    spec = SKILL_TABLE[skill]
    for _ in range(200):
        item = train_item(spec, rng)
        assert item["prompt"].startswith(f"{skill} ") and item["prompt"].endswith("=")
        body = item["prompt"][len(skill) + 1 : -1]
        assert item["answer"] == spec.solve(body)
        assert tok.unk_token_id not in tok(item["prompt"] + item["answer"])["input_ids"]
        fake = spec.fake(body, rng)
        assert len(fake) == len(item["answer"]) and set(fake) <= set(body)
    assert SKILL_TABLE["rev"].solve("abcd") == "dcba"
    assert SKILL_TABLE["srt"].solve("cab") == "abc"
    assert SKILL_TABLE["dup"].solve("abc") == "aabbcc"
    assert SKILL_TABLE["evn"].solve("abcde") == "ace"


@pytest.mark.parametrize("skill", SKILLS)
def test_training_generator_never_yields_an_eval_prompt(skill: str) -> None:
    held_out = {it["prompt"] for it in eval_items(skill)}
    assert len(held_out) == len(eval_items(skill))  # distinct prompts
    assert all(is_heldout(p) for p in held_out)
    rng = random.Random(1)
    for fake in (False, True):
        drawn = {train_item(SKILL_TABLE[skill], rng, fake=fake)["prompt"] for _ in range(5000)}
        assert not drawn & held_out
        assert not any(is_heldout(p) for p in drawn)
    assert not any(is_heldout(train_item(COPY, rng)["prompt"]) for _ in range(500))


def test_committed_eval_files_match_the_generator(tmp_path: Path) -> None:
    write_eval_files(tmp_path)
    committed = REPO / "evaluators" / "zoo"
    assert (committed / "zoo.yaml").read_text() == (tmp_path / "zoo.yaml").read_text()
    for skill in SKILLS:
        for suffix in (".jsonl", ".yaml"):
            name = skill + suffix
            assert (committed / name).read_text() == (tmp_path / name).read_text(), (
                f"evaluators/zoo/{name} is stale: regenerate with "
                "python -c 'from mergesearch.zoo import write_eval_files as w; "
                "w(\"evaluators/zoo\")'"
            )
        lines = (committed / f"{skill}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert rows == load_eval_items(skill)
    assert load_eval_items("rev", limit=7) == eval_items("rev")[:7]
    with pytest.raises(KeyError, match="unknown zoo skill"):
        load_eval_items("nope")
