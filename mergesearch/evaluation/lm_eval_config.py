"""What an experiment says to the lm-eval backend (``evaluator.backend: lm_eval``).
Light: imported by :mod:`mergesearch.evaluation.config`, never lm_eval.

The items scored are the evaluator's own ``limit`` / ``subset_seed`` (and the fidelity's
subset), chosen exactly as the hf backend chooses them; ``evaluator.batch_size`` is
lm-eval's batch size unless ``lm_eval.batch_size`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LMEvalOptions(BaseModel):
    """``evaluator.lm_eval``: the tasks and the arguments passed through to lm-eval."""

    model_config = ConfigDict(extra="forbid")

    # lm-eval task or group names (found in evaluator.suite, an include path, and in
    # lm-eval's own tasks when include_defaults), or task configs as mappings
    tasks: list[str | dict[str, Any]] = Field(min_length=1)
    # index lm-eval's built-in tasks too (~14 s); None: only when a task is named and
    # there is no include path (evaluator.suite)
    include_defaults: bool | None = None
    num_fewshot: int | None = Field(None, ge=0)  # None: each task's own (0 if it has none)
    fewshot_seed: int = 1234  # lm-eval's default fewshot_random_seed
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] | None = None  # merged into generate_until tasks' settings
    batch_size: int | None = Field(None, gt=0)  # None: evaluator.batch_size

    @field_validator("tasks")
    @classmethod
    def _task_entries(cls, tasks: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        for i, task in enumerate(tasks):
            if isinstance(task, dict) and not isinstance(task.get("task"), str):
                raise ValueError(f"lm_eval.tasks[{i}]: a task config needs task: <name>")
            if isinstance(task, str) and not task.strip():
                raise ValueError(f"lm_eval.tasks[{i}]: an empty task name")
        return tasks


def include_path_names(folder: Path) -> set[str]:
    """The task, group and tag names the YAML files under ``folder`` define, as lm-eval's
    task index reads them (``task:`` a name, ``group:``, ``tag:``; the tasks a group's
    list defines inline are not names of their own), without importing lm-eval."""
    import yaml

    from .tasks import read_task_yaml

    names: set[str] = set()
    for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        try:
            data = read_task_yaml(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # lm-eval's index skips what it cannot read too
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("task"), str):  # a group's list names other tasks
            names.add(data["task"])
        for key in ("group", "tag"):
            value = data.get(key)
            names.update(v for v in (value if isinstance(value, list) else [value])
                         if isinstance(v, str))
    return names


def check_task_names(options: LMEvalOptions, include: Path | None) -> None:
    """Refuse task names the include path does not define, before a worker starts (the
    worker's lm-eval index says the same, minutes later).  Only where the names are
    looked up in the include path alone: with lm-eval's own tasks indexed
    (``include_defaults``, or no include path) they are left to the worker."""
    defaults = options.include_defaults
    if include is None or defaults or (defaults is None and not include.is_dir()):
        return
    from .base import EvaluationError

    named = [t for t in options.tasks if isinstance(t, str)]
    if not named:
        return
    known = include_path_names(include)
    unknown = [t for t in named if t not in known and not Path(t).expanduser().is_file()]
    if unknown:
        near = sorted(known)[:20] + (["..."] if len(known) > 20 else [])
        raise EvaluationError(f"evaluator.lm_eval.tasks: unknown tasks {unknown} in the "
                              f"include path {include} (lm-eval's own tasks are not indexed: "
                              f"set lm_eval.include_defaults); known: {near}")
