"""The paper-reproduction experiments (experiments/evollm_jp/) and their MGSM-JA-style
suite (evaluators/mgsm_ja/): the files validate and bind to the paper's shapes without
fetching a model, and the last-number scoring reads hand-written answers right."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mergesearch.evaluation.base import EvaluationError
from mergesearch.evaluation.tasks import _LAST_NUMBER, load_suite
from mergesearch.experiment import Experiment
from mergesearch.models.recipe_model import recipe_ref
from mergesearch.spaces import load_space
from mergesearch.strategies.base import strategies

ROOT = Path(__file__).resolve().parents[1]
EVOLLM = sorted((ROOT / "experiments" / "evollm_jp").glob("*.yaml"))
SOURCES = {"shisa": "augmxnt/shisa-gamma-7b-v1", "wizardmath": "WizardLMTeam/WizardMath-7B-V1.1",
           "abel": "GAIR/Abel-7B-002"}
MISTRAL_LAYERS = 32


def bind(space, sources: dict[str, str]):
    """A space bound to Mistral-7B-shaped models by name only (nothing is opened)."""
    return load_space(space, base="mistralai/Mistral-7B-v0.1", sources=sources,
                      num_layers=MISTRAL_LAYERS,
                      layer_counts={n: MISTRAL_LAYERS for n in sources if n in SOURCES})


def test_every_evollm_file_validates():
    assert {p.name for p in EVOLLM} >= {"ps.yaml", "ps_dfs.yaml"}
    for path in EVOLLM:
        exp = Experiment.load(path)  # schema, stages, paths: hub ids are not fetched here
        assert exp.models.base == "mistralai/Mistral-7B-v0.1"
        assert exp.models.sources == SOURCES
        assert exp.execution.backend == "ray" and exp.execution.gpus_per_worker == 1
        assert exp.execution.dtype == "bfloat16"
        assert [o.metric for o in exp.evaluator.objectives] == ["exact_match,last_number"]
        assert exp.find(exp.evaluator.suite) == ROOT / "evaluators" / "mgsm_ja" / "train"


def test_ps_is_the_papers_genome_and_budget():
    exp = Experiment.load(ROOT / "experiments" / "evollm_jp" / "ps.yaml")
    space = bind(exp.space, SOURCES)
    names = [d.name for d in space.dims]
    # a weight and a density per source per layer: 2 x 3 x 32
    assert len(names) == 192 and len(set(names)) == 192
    assert {n.split("[")[0] for n in names} == {"weight", "density"}
    assert all(x == 0.5 for x in space.x0)  # the paper's init
    start = space.start
    assert (start.method, start.dtype, start.parameters["normalize"]) == \
        ("dare_ties", "bfloat16", False)
    assert exp.strategy.name == "sakana_ps" and exp.budget.evaluations == 1000
    # pycma's default population for 192 dimensions, which sakana_ps keeps
    assert 4 + math.floor(3 * math.log(len(names))) == 19


def test_ps_dfs_lays_out_the_papers_192_slots():
    exp = Experiment.load(ROOT / "experiments" / "evollm_jp" / "ps_dfs.yaml")
    ps_stage, dfs_stage = exp.stages
    assert dfs_stage.sources_from == {"ps": "ps"}
    assert (dfs_stage.strategy.name, dfs_stage.strategy.options["popsize"]) == ("sakana_dfs", 128)
    assert dfs_stage.budget.evaluations == 128 * 100
    ps_space = bind(ps_stage.space, SOURCES)
    assert len(ps_space.dims) == 192
    # stage dfs sees the PS model as one more source, a recipe-defined model
    sources = {**SOURCES, "ps": recipe_ref(ps_space.start.to_dict())}
    dfs = bind(exp.stage(1, {"ps": sources["ps"]}).space, sources)
    kinds = [d.kind for d in dfs.dims]
    # T = M r = (32 + 32) x 3 slots; slot 0 is fixed on (the first layer), the others
    # each have an indicator and an input scale
    assert kinds.count("binary") == 64 * 3 - 1 and kinds.count("real") == 64 * 3 - 1
    path = dfs.start.layer_path  # the start is model A (the PS model) itself
    assert [h.layer for h in path] == list(range(MISTRAL_LAYERS))
    assert {h.model for h in path} == {sources["ps"]}


@pytest.mark.parametrize("path", EVOLLM, ids=lambda p: p.name)
def test_strategies_named_exist_with_those_options(path):
    exp = Experiment.load(path)
    used = [exp.strategy] if exp.stages is None else \
        [st.strategy or exp.strategy for st in exp.stages]
    known = strategies()
    missing = sorted({s.name for s in used} - set(known))
    if missing:
        pytest.skip(f"strategies {missing} are not registered yet")
    for s in used:
        known[s.name].Options.model_validate(s.options)


def test_the_smoke_command_in_ps_yaml_is_valid():
    exp = Experiment.load(ROOT / "experiments" / "evollm_jp" / "ps.yaml",
                          ["budget.evaluations=4", "evaluator.suite=evaluators/mgsm_ja/sample",
                           "name=evollm-jp-ps-smoke"])
    assert exp.budget.evaluations == 4 and exp.run_dir == Path("runs/evollm-jp-ps-smoke")
    assert "exact_match,last_number" in load_suite(exp.find(exp.evaluator.suite))["mgsm_ja"].metrics


def test_the_training_split_is_the_users_file_and_its_absence_is_named():
    with pytest.raises(EvaluationError, match="mgsm_ja_train.jsonl.*not found"):
        load_suite(ROOT / "evaluators" / "mgsm_ja" / "train")


def test_the_sample_suite_loads_and_renders_in_japanese():
    task = load_suite(ROOT / "evaluators" / "mgsm_ja" / "sample")["mgsm_ja"]
    docs = task.docs()
    assert len(docs) == 5
    first = task.render(docs[0], 0)
    assert first.context.endswith("### 解答:\n") and docs[0]["question"] in first.context
    assert first.target == "15"
    assert task.until == ("### 問題:",) and task.max_gen_toks == 512


# hand-written answers to the 5 sample items, and what each should score
ANSWERS = [
    ("12 - 5 = 7 個残り、7 + 8 = 15 個です。答えは 15 です", True),
    ("ノートは 150 × 4 = 600 円、ペンは 80 × 3 = 240 円。合計 600 + 240 = 840 円。", True),
    ("1,250 × 8 = 10,000 なので、10,000個です。", True),  # thousands separators
    ("3.6 ÷ 4 = 0.9 より、1本は0.9メートルです。", True),  # a decimal
    ("2 - 7 = -5 なので、夜の気温は -5 度です。", True),  # a negative number
]
WRONG = [
    ("答えは 15 です。(1,250個の部品は関係ありません)", False),  # the LAST number counts
    ("840円の半分は420円", False),
    ("10,001個", False),
    ("0.09メートル", False),
    ("5度です", False),  # the sign matters
]


@pytest.mark.parametrize("answers", [ANSWERS, WRONG], ids=["right", "wrong"])
def test_last_number_scores_hand_written_answers(answers):
    task = load_suite(ROOT / "evaluators" / "mgsm_ja" / "sample")["mgsm_ja"]
    targets = [task.render(d, i).target for i, d in enumerate(task.docs())]
    for (text, right), target in zip(answers, targets, strict=True):
        picked = task.filtered(text)["last_number"]
        assert task.matches(picked, target) is right, (text, picked, target)


def test_last_number_edge_cases():
    task = load_suite(ROOT / "evaluators" / "mgsm_ja" / "sample")["mgsm_ja"]
    pick = lambda s: task.filtered(s)["last_number"]  # noqa: E731
    assert pick("…答えは 42 です") == "42"
    assert pick("合計は1,234円です。") == "1,234" and task.matches("1,234", "1234")
    assert _LAST_NUMBER.findall("1,234")[-1] == "234"  # why the built-in filter is not used
    assert pick("3, 5, 7") == "7"  # a list, not one number: "," + 3 digits only
    assert pick("12.0個") == "12.0" and task.matches("12.0", "12")
    assert not task.matches("12.05", "12")
    assert pick("答えは４２です") == "[invalid]"  # full-width digits are not read
    assert pick("わかりません") == "[invalid]" and not task.matches("[invalid]", "0")
