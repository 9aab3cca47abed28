"""What travels between strategy, worker and controller: candidates and results.

A :class:`Candidate` is what a strategy asks a worker for: a point of its
search space (the controller attaches the recipe it decodes to) or a recipe
it built, to be scored as a trial or answered by a named probe.  A
:class:`Result` is what came back: objective values, per-task scores,
per-item correctness with item ids, a probe's payload, cost, timings, and
whether it worked.  Both are plain data
with a JSON form, so they can cross process boundaries and live in storage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mergesearch.recipe import Recipe

Status = Literal["ok", "failed"]


SCORE = "score"  # the request kind of a trial; any other kind names a probe


@dataclass
class Candidate:
    """One request to a worker.

    ``id`` is unique within a search (strategies number their candidates 0, 1, ...);
    ``genome`` is a point of the search space (the controller attaches the recipe it
    decodes to), or ``None`` when the strategy built the ``recipe`` itself (children of
    archive members, Frank-Wolfe iterates); ``fidelity`` in (0, 1] is the share of the
    evaluation set to use; ``kind`` is ``"score"`` for a trial, or the name of a probe
    whose JSON payload goes back to the strategy; ``meta`` is the strategy's JSON notes
    (parents, generation, predicted values), stored with the trial.
    """

    id: int
    genome: list[float] | None
    fidelity: float = 1.0
    kind: str = SCORE
    recipe: Recipe | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_probe(self) -> bool:
        return self.kind != SCORE

    def to_dict(self) -> dict[str, Any]:
        data = {"id": self.id, "genome": None if self.genome is None else list(self.genome),
                "fidelity": self.fidelity, "kind": self.kind}
        if self.recipe is not None:
            data["recipe"] = self.recipe.to_dict()
        if self.meta:
            data["meta"] = self.meta
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        recipe, genome = data.get("recipe"), data.get("genome")
        return cls(id=int(data["id"]),
                   genome=None if genome is None else [float(g) for g in genome],
                   fidelity=float(data.get("fidelity", 1.0)), kind=data.get("kind", SCORE),
                   recipe=Recipe.from_dict(recipe) if recipe is not None else None,
                   meta=dict(data.get("meta") or {}))


@dataclass
class Result:
    """The outcome of evaluating one candidate.

    ``values`` maps objective names to numbers (empty when the evaluation failed);
    ``scores`` maps task -> metric -> value; ``correct`` maps task -> per-item
    correctness, and ``items`` task -> the ids (positions in the task's data) of those
    items, in the same order; ``payload`` is a probe's JSON answer; ``cost`` counts the
    items scored; ``timings`` are seconds by phase (``merge``, ``evaluate``, ...).
    """

    candidate_id: int
    values: dict[str, float] = field(default_factory=dict)
    status: Status = "ok"
    reason: str | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    correct: dict[str, list[bool]] = field(default_factory=dict)
    items: dict[str, list[int]] = field(default_factory=dict)
    payload: dict[str, Any] | None = None
    cost: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    attempts: int = 1  # > 1 when workers died running it and it was retried

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(cls, candidate_id: int, reason: str, **timings: float) -> Result:
        return cls(candidate_id=candidate_id, status="failed", reason=reason, timings=timings)

    def check_finite(self) -> Result:
        """This result, or a failed one naming the objectives that came back NaN/inf."""
        bad = sorted(k for k, v in self.values.items() if not math.isfinite(v))
        if self.ok and bad:
            return Result(candidate_id=self.candidate_id, status="failed",
                          reason=f"non-finite objective values: {', '.join(bad)}",
                          scores=self.scores, cost=self.cost, timings=self.timings)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        return cls(**data)


def pack_bits(values: list[bool]) -> str:
    """Per-item correctness as a string of 0s and 1s (how storage and logs keep it)."""
    return "".join("1" if v else "0" for v in values)


def unpack_bits(text: str) -> list[bool]:
    return [c == "1" for c in text]


def pack_ids(ids: list[int]) -> str:
    """Item ids as runs, ``"0-15,18,20-31"``: a seeded subset of a task stays short."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def unpack_ids(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out += range(int(a), int(b or a) + 1)
    return out


# -- tracked metrics (``evaluator.track``) ---------------------------------------------------

def split_tracked(name: str) -> tuple[str | None, str]:
    """A tracked metric's name as ``(task, metric)``: ``zoo_rev/exact_match`` is task
    ``zoo_rev``'s ``exact_match``; a bare ``exact_match`` is ``(None, "exact_match")``,
    the mean over every task that produces it."""
    task, sep, metric = name.rpartition("/")
    return (task if sep else None), metric


def tracked_metric_names(track: list[str] | tuple[str, ...]) -> list[str]:
    """The metric names a list of tracked metrics needs computed (each once, in order)."""
    return list(dict.fromkeys(split_tracked(n)[1] for n in track))


def tracked_values(scores: dict[str, dict[str, float]],
                   track: dict[str, list[str] | None]) -> dict[str, float]:
    """The tracked metrics of one result, from its per-task ``scores``.

    ``track`` maps each tracked name to the tasks its mean is over (as the controller
    resolved them against the suite), or to None: every task whose scores hold the
    metric.  A name whose tasks do not all hold the metric (not computed this time, e.g.
    a backend that does not produce it) is left out rather than averaged over fewer."""
    out: dict[str, float] = {}
    for name, tasks in track.items():
        metric = split_tracked(name)[1]
        over = tasks if tasks is not None else [t for t, s in scores.items() if metric in s]
        values = [scores[t][metric] for t in over if metric in scores.get(t, {})]
        if over and len(values) == len(over):
            out[name] = float(sum(values) / len(values))
    return out
