"""Which calibration items each source runs on: its own tasks (CalibratingWorker) or every
task (EveryTaskCalibratingWorker), unscored documents first, prompt + answer."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mergesearch.execution.calibration import (
    CalibratingWorker,
    EveryTaskCalibratingWorker,
    calibration_texts,
)


class _Task:
    """A task of ``n`` documents ``<task>-<i>`` whose answer is ``a<i>``."""

    target_delimiter = " "

    def __init__(self, name: str, n: int):
        self.name, self.n = name, n

    def docs(self) -> list[int]:
        return list(range(self.n))

    def render(self, doc: int, index: int) -> SimpleNamespace:
        return SimpleNamespace(context=f"{self.name}-{doc}", target=f"a{doc}", choices=None)


class _Tokenizer:
    """One token per character (its code), pad 0."""

    pad_token_id, eos_token_id = 0, None

    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _worker(cls: type[CalibratingWorker], per_task: int = 2) -> SimpleNamespace:
    tasks = {"zoo_rev": _Task("zoo_rev", 5), "zoo_srt": _Task("zoo_srt", 5)}
    searched = SimpleNamespace(doc_ids=[0, 1, 2])  # the search scores docs 0-2
    evaluator = SimpleNamespace(tasks=tasks, _data={n: searched for n in tasks})
    return SimpleNamespace(evaluator=evaluator, tokenizer=_Tokenizer(), own_tasks=cls.own_tasks,
                           items_per_task=per_task, batch_size=8,
                           merger=SimpleNamespace(device=torch.device("cpu")))


def _texts(batches) -> list[str]:
    return ["".join(chr(int(t)) for t, m in zip(row, mask, strict=True) if m)
            for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"],
                                                  strict=True)]


def test_unscored_documents_first_then_search_documents_with_their_answers():
    ev = _worker(CalibratingWorker, per_task=3).evaluator
    assert calibration_texts(ev, 3, tasks=["zoo_rev"]) == [
        "zoo_rev-3 a3", "zoo_rev-4 a4", "zoo_rev-0 a0"]
    assert calibration_texts(ev, 1, answers=False) == ["zoo_rev-3", "zoo_srt-3"]


def test_own_tasks_or_every_task():
    own = _worker(CalibratingWorker)
    batches, items = CalibratingWorker.calibration_batches(own, "/zoo/rev")
    assert items == 2 and _texts(batches) == ["zoo_rev-3 a3", "zoo_rev-4 a4"]
    # a source no task is named after runs on every task
    _, items = CalibratingWorker.calibration_batches(own, "/zoo/dup")
    assert items == 4
    every = _worker(EveryTaskCalibratingWorker)
    batches, items = CalibratingWorker.calibration_batches(every, "/zoo/rev")
    assert items == 4 and _texts(batches) == ["zoo_rev-3 a3", "zoo_rev-4 a4",
                                             "zoo_srt-3 a3", "zoo_srt-4 a4"]
