"""What travels between strategy, worker and controller: candidates and results.

A :class:`Candidate` is a point a strategy wants scored (its genome; the
controller attaches the recipe the search space decodes it to).  A
:class:`Result` is what came back: objective values, per-task scores,
per-item correctness, timings, and whether it worked.  Both are plain data
with a JSON form, so they can cross process boundaries and live in storage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mergesearch.recipe import Recipe

Status = Literal["ok", "failed"]


@dataclass
class Candidate:
    """One point to evaluate.

    ``id`` is unique within a search (strategies number their candidates 0, 1, ...);
    ``fidelity`` in (0, 1] is the share of the evaluation set to use; ``kind`` says
    what the strategy asks for ("score" for now; probes such as gradients come later).
    """

    id: int
    genome: list[float]
    fidelity: float = 1.0
    kind: str = "score"
    recipe: Recipe | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"id": self.id, "genome": list(self.genome), "fidelity": self.fidelity,
                "kind": self.kind}
        if self.recipe is not None:
            data["recipe"] = self.recipe.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        recipe = data.get("recipe")
        return cls(id=int(data["id"]), genome=[float(g) for g in data["genome"]],
                   fidelity=float(data.get("fidelity", 1.0)), kind=data.get("kind", "score"),
                   recipe=Recipe.from_dict(recipe) if recipe is not None else None)


@dataclass
class Result:
    """The outcome of evaluating one candidate.

    ``values`` maps objective names to numbers (empty when the evaluation failed);
    ``scores`` maps task -> metric -> value; ``correct`` maps task -> per-item
    correctness; ``timings`` are seconds by phase (``merge``, ``evaluate``, ...).
    """

    candidate_id: int
    values: dict[str, float] = field(default_factory=dict)
    status: Status = "ok"
    reason: str | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    correct: dict[str, list[bool]] = field(default_factory=dict)
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
                          scores=self.scores, timings=self.timings)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        return cls(**data)
