"""What an experiment says to the lm-eval backend (``evaluator.backend: lm_eval``).
Light: imported by :mod:`mergesearch.evaluation.config`, never lm_eval.

The items scored are the evaluator's own ``limit`` / ``subset_seed`` (and the fidelity's
subset), chosen exactly as the hf backend chooses them; ``evaluator.batch_size`` is
lm-eval's batch size unless ``lm_eval.batch_size`` says otherwise.
"""

from __future__ import annotations

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
