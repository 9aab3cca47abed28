"""Task names of the lm-eval backend checked before a worker starts, without lm-eval."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergesearch.evaluation import EvaluationError
from mergesearch.evaluation.lm_eval_config import (
    LMEvalOptions,
    check_task_names,
    include_path_names,
)

ROOT = Path(__file__).resolve().parents[2]
EVALUATORS = ROOT / "evaluators"


def test_names_of_an_include_path_are_tasks_groups_and_tags(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("task: alpha\ntag: [fast, small]\nclass: !function u.T\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.yaml").write_text(
        "group: both\ntask:\n  - alpha\n  - {task: beta, dataset_path: json}\n")
    (tmp_path / "template.yaml").write_text("dataset_path: json\n")  # defines no name
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    # as lm-eval 0.4.13's TaskManager: a task defined inline in a group is no name
    assert include_path_names(tmp_path) == {"alpha", "both", "fast", "small"}


def test_unknown_names_are_refused_known_ones_pass() -> None:
    zoo = EVALUATORS / "zoo"
    check_task_names(LMEvalOptions(tasks=["zoo", "zoo_rev", {"task": "inline"}]), zoo)
    with pytest.raises(EvaluationError, match=r"unknown tasks \['zoo_nope'\] in the include "
                                              r"path .*include_defaults.*'zoo_rev'"):
        check_task_names(LMEvalOptions(tasks=["zoo_rev", "zoo_nope"]), zoo)


def test_names_are_left_to_the_worker_where_lm_eval_indexes_its_own(tmp_path: Path) -> None:
    check_task_names(LMEvalOptions(tasks=["hellaswag"]), None)
    check_task_names(LMEvalOptions(tasks=["hellaswag"], include_defaults=True),
                     EVALUATORS / "zoo")
    task = tmp_path / "task.yaml"
    task.write_text("task: t\n")
    check_task_names(LMEvalOptions(tasks=[str(task)]), EVALUATORS / "zoo")  # a file


def test_the_names_are_lm_evals_own() -> None:
    """Every committed suite folder: the same names as lm-eval's index of it."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    for folder in sorted({p.parent for p in EVALUATORS.rglob("*.yaml")}):
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        assert include_path_names(folder) == set(manager.all_tasks), folder
