"""Reading lm-eval task YAMLs: the zoo suite, templates, filters and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergesearch.evaluation import EvaluationError, load_suite
from mergesearch.evaluation.tasks import find_suite

from .conftest import ZOO_SUITE, WriteTask, zoo_docs


def test_zoo_suite_reads_every_task_and_skips_the_group_file() -> None:
    suite = load_suite(ZOO_SUITE)
    assert sorted(suite) == ["zoo_dup", "zoo_evn", "zoo_rev", "zoo_srt"]
    rev = suite["zoo_rev"]
    assert rev.data_files == (ZOO_SUITE / "rev.jsonl",)  # repo-root-relative path, found
    assert (rev.output_type, rev.target_delimiter, rev.until, rev.max_gen_toks) == (
        "generate_until", "", ("<eos>",), 12)
    docs = rev.docs()
    assert docs == zoo_docs("rev") and len(docs) == 200
    item = rev.render(docs[0])
    assert (item.context, item.target) == (docs[0]["prompt"], docs[0]["answer"])


def test_templates_fields_and_choices(write_task: WriteTask, tmp_path: Path) -> None:
    docs = [{"q": "rev ab=", "opts": ["ba", "ab"], "label": 0, "name": "x"},
            {"q": "rev cd=", "opts": ["cd", "dc"], "label": "1", "name": "y"}]
    write_task("mc", docs, output_type="multiple_choice", doc_to_text="Q: {{ q }}",
               doc_to_target="label", doc_to_choice="{{opts}}", description="{{name}}|")
    write_task("lit", docs, output_type="multiple_choice", doc_to_text="q",
               doc_to_target="{{ opts[label | int] }}", doc_to_choice=["ba", "dc", "zz"])
    suite = load_suite(tmp_path)
    mc = [suite["mc"].render(d) for d in docs]
    assert [(r.context, r.choices, r.gold) for r in mc] == [
        ("x|Q: rev ab=", ("ba", "ab"), 0), ("y|Q: rev cd=", ("cd", "dc"), 1)]
    lit = [suite["lit"].render(d) for d in docs]
    assert [(r.context, r.choices, r.gold) for r in lit] == [
        ("rev ab=", ("ba", "dc", "zz"), 0), ("rev cd=", ("ba", "dc", "zz"), 1)]
    assert suite["mc"].metrics == ("acc", "acc_norm")


def test_template_errors_name_the_task_and_item(write_task: WriteTask, tmp_path: Path) -> None:
    write_task("t", [{"prompt": "a", "answer": "b"}], doc_to_text="{{ question }}")
    spec = load_suite(tmp_path)["t"]
    with pytest.raises(EvaluationError, match=r"task 't'.*item 3.*question"):
        spec.render(spec.docs()[0], 3)


def test_filters_regex_last_number_and_pipelines(write_task: WriteTask, tmp_path: Path) -> None:
    write_task("f", [{"prompt": "a", "answer": "b"}], filter_list=[
        {"name": "strict", "filter": [{"function": "regex", "regex_pattern": r"#### (\d+)"},
                                      {"function": "take_first"}]},
        {"name": "loose", "filter": [{"function": "last_number"}]},
        {"name": "words", "filter": [{"function": "regex", "regex_pattern": "[a-z]+",
                                      "group_select": -1}, {"function": "uppercase"}]},
        {"name": "alt", "filter": [{"function": "regex", "regex_pattern": r"(\d+)|([a-z]+)"}]},
    ])
    spec = load_suite(tmp_path)["f"]
    assert spec.metrics[-4:] == ("exact_match,strict", "exact_match,loose",
                                 "exact_match,words", "exact_match,alt")
    assert spec.filtered("so #### 42 and 7.5 ok") == {
        "strict": "42", "loose": "7.5", "words": "OK", "alt": "so"}
    assert spec.filtered("nothing") == {
        "strict": "[invalid]", "loose": "[invalid]", "words": "NOTHING", "alt": "nothing"}
    assert spec.filtered("x -3 y")["loose"] == "-3"


def test_exact_match_options(write_task: WriteTask, tmp_path: Path) -> None:
    write_task("e", [{"prompt": "a", "answer": "b"}], metric_list=[
        {"metric": "exact_match", "ignore_case": True, "ignore_punctuation": True,
         "regexes_to_ignore": [r"\$"]}])
    write_task("plain", [{"prompt": "a", "answer": "b"}])
    suite = load_suite(tmp_path)
    assert suite["e"].matches(" $Yes! ", "yes")
    assert suite["plain"].matches(" yes\n", "yes") and not suite["plain"].matches("Yes", "yes")


def test_include_merges_a_template(write_task: WriteTask, tmp_path: Path) -> None:
    path = write_task("child", [{"prompt": "c", "answer": "d"}])
    raw = yaml.safe_load(path.read_text())
    del raw["target_delimiter"], raw["generation_kwargs"]
    path.write_text(yaml.safe_dump({"include": "_tmpl.yaml", **raw}))
    (tmp_path / "_tmpl.yaml").write_text(yaml.safe_dump(  # a template: no `task`, not a task
        {"target_delimiter": "~", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 3}}))
    suite = load_suite(tmp_path)
    assert list(suite) == ["child"]
    spec = suite["child"]
    assert (spec.target_delimiter, spec.until, spec.max_gen_toks) == ("~", ("\n",), 3)


def test_relative_data_path_resolves_against_parents(write_task: WriteTask,
                                                     tmp_path: Path) -> None:
    path = write_task("deep", [{"prompt": "a", "answer": "b"}], folder=tmp_path / "suite" / "x",
                      dataset_kwargs={"data_files": "suite/x/deep.jsonl"})
    assert load_suite(tmp_path / "suite")["deep"].data_files == (path.with_suffix(".jsonl"),)


def test_find_suite_prefers_base_dir_then_parents_then_cwd(tmp_path: Path) -> None:
    (tmp_path / "evals").mkdir()
    (tmp_path / "exp").mkdir()
    assert find_suite("evals", tmp_path / "exp") == tmp_path.resolve() / "evals"
    assert find_suite("evaluators/zoo", tmp_path / "exp") == Path.cwd() / "evaluators/zoo"
    assert find_suite(str(tmp_path / "evals")) == tmp_path / "evals"
    with pytest.raises(EvaluationError, match=r"suite nowhere is not a directory in .*exp"):
        find_suite("nowhere", tmp_path / "exp")


@pytest.mark.parametrize(("fields", "match"), [
    ({"output_type": "loglikelihood_rolling"}, r"output_type 'loglikelihood_rolling'.*"
                                               r"generate_until.*multiple_choice"),
    ({"filter_list": [{"name": "f", "filter": [{"function": "majority_vote"}]}]},
     r"filter function 'majority_vote'.*last_number"),
    ({"dataset_kwargs": {"data_files": {"test": "nowhere.jsonl"}}},
     r"task 'bad' \(.*bad\.yaml\).*'nowhere\.jsonl' not found"),
    ({"test_split": "validation"}, r"split 'validation'.*\['test'\]"),
    ({"dataset_path": "gsm8k"}, r"dataset_path 'gsm8k'.*dataset_path: json"),
    ({"process_docs": "x"}, r"process_docs"),
    ({"num_fewshot": 5}, r"few-shot"),
    ({"output_type": "multiple_choice"}, r"doc_to_choice"),
])
def test_bad_task_files_are_refused(write_task: WriteTask, tmp_path: Path, fields: dict,
                                    match: str) -> None:
    write_task("bad", [{"prompt": "a", "answer": "b"}], **fields)
    with pytest.raises(EvaluationError, match=match):
        load_suite(tmp_path)


def test_suite_level_errors(write_task: WriteTask, tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"nowhere is not a directory.*evaluator\.suite"):
        load_suite(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "group.yaml").write_text("group: g\ntask: [a, b]\n")
    with pytest.raises(EvaluationError, match="holds no task YAML"):
        load_suite(tmp_path / "empty")
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "t.yaml").write_text("task: t\ndoc_to_text: !function utils.f\n")
    with pytest.raises(EvaluationError, match=r"t\.yaml.*!function"):
        load_suite(tmp_path / "fn")
    write_task("same", [{"prompt": "a", "answer": "b"}], folder=tmp_path / "dup")
    write_task("other", [{"prompt": "a", "answer": "b"}], folder=tmp_path / "dup", task="same")
    with pytest.raises(EvaluationError, match="task 'same' is defined twice"):
        load_suite(tmp_path / "dup")
