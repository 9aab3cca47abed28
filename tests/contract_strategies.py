"""Strategies for tests, named by import path (``contract_strategies:ArchiveCrossover``),
so they never join the registry.  Two use the second-round contracts (recipe proposals,
probes); ``Repeat`` proposes repeats, for the result cache.

The contract strategies keep ``seen``: everything they were told, by candidate id.  Rebuilt
from a saved state, ``seen`` is what the strategy saw before the kill, so comparing it with
what storage recorded shows that nothing a strategy consumes is lost or changed by a resume.
"""

from __future__ import annotations

import numpy as np

from mergesearch.recipe import Recipe
from mergesearch.strategies import Proposal, Strategy
from mergesearch.trial import pack_bits, pack_ids


def _told(result) -> dict:
    return {"status": result.status, "values": dict(result.values),
            "correct": {t: pack_bits(v) for t, v in result.correct.items()},
            "items": {t: pack_ids(v) for t, v in result.items.items()},
            "payload": result.payload}


class ArchiveCrossover(Strategy):
    """Seeds an archive with genomes, then proposes recipes it builds itself: each child
    averages the per-model weights of the two best members (their recipes decoded with
    the problem's space), with its parents in the metadata."""

    name = "archive-crossover-for-test"
    description = "test only: genome seeds, then recipe children of the two best"
    multi_objective = False
    uses_items = True

    def _setup(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self.seen: dict[int, dict] = {}
        self._archive: dict[int, tuple[float, dict]] = {}  # id -> (loss, recipe dict)
        self._recipes: dict[int, dict] = {}  # recipes of pending candidates

    def _ask(self, n: int):
        out = []
        for k in range(n):
            cid = self._next_id + k
            if len(self._archive) < 3:
                genome = self._rng.uniform(self.problem.low, self.problem.high)
                self._recipes[cid] = self.problem.decode(genome).to_dict()
                out.append(Proposal(genome=genome, meta={"role": "seed"}))
                continue
            (a, ra), (b, rb) = sorted(self._archive.items(), key=lambda kv: kv[1][0])[:2]
            child = _average(ra[1], rb[1], float(self._rng.uniform(0.3, 0.7)))
            self._recipes[cid] = child
            out.append(Proposal(recipe=Recipe.from_dict(child), meta={"parents": [a, b]}))
        return out

    def _tell(self, told) -> None:
        for cand, result in told:
            self.seen[cand.id] = _told(result)
            recipe = self._recipes.pop(cand.id)
            if result.ok:
                self._archive[cand.id] = (self.problem.scalar_loss(result.values), recipe)


def _average(a: dict, b: dict, t: float) -> dict:
    child = {**a, "models": []}
    for ma, mb in zip(a["models"], b["models"], strict=True):
        wa, wb = ma["parameters"]["weight"], mb["parameters"]["weight"]
        child["models"].append({**ma, "parameters": {**ma["parameters"],
                                                     "weight": t * wa + (1 - t) * wb}})
    return child


class Prober(Strategy):
    """Scores random genomes and probes each one (``delta_stats``) right after asking for
    its score: probes between score requests, their payloads kept."""

    name = "prober-for-test"
    description = "test only: score, then probe, each genome"
    multi_objective = True

    def _setup(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self.seen: dict[int, dict] = {}
        self._to_probe: list[list[float]] = []

    def _ask(self, n: int):
        out = []
        for k in range(n):
            if self._to_probe:
                out.append(Proposal(genome=self._to_probe.pop(0), kind="delta_stats",
                                    meta={"probe_of": self._next_id + k - 1}))
            else:
                genome = self.problem.clip(self._rng.uniform(self.problem.low,
                                                             self.problem.high))
                self._to_probe.append(genome)
                out.append(Proposal(genome=genome))
        return out

    def _tell(self, told) -> None:
        for cand, result in told:
            self.seen[cand.id] = _told(result)


class Repeat(Strategy):
    """Proposes the start point, then alternates two points: everything repeats."""

    name = "repeat-for-test"
    description = "test only"
    multi_objective = True

    def _setup(self):
        self._i = 0

    def _ask(self, n):
        out = []
        for _ in range(n):
            out.append((self.problem.x0 * (0.5 if self._i % 2 else 1.0), 1.0))
            self._i += 1
        return out

    def _tell(self, told):
        pass
