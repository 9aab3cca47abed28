"""Sweeps: several searches on one Ray cluster, each into its own study.

A sweep is a list of experiment files, or a sweep file that expands one
experiment over a grid of overrides::

    name: zoo-baselines
    experiment: experiments/zoo/cmaes.yaml
    grid:                       # every combination becomes one search
      strategy: [{name: random}, {name: cmaes, options: {popsize: 8}}, {name: tpe}]
      seed: [0, 1, 2]
    execution: {address: local, workers: 2}   # the pool the searches share

The cluster's workers are shared fairly: at most ``workers`` searches run at
once, each with an equal share of the workers (at least one), and the next
search starts when one ends.  Each search is an ordinary resumable run (its
own study and run folder), so re-running a sweep resumes what was cut short.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from mergesearch.configs import format_validation_error, read_yaml_mapping
from mergesearch.experiment import Experiment, ExperimentError, Name

log = logging.getLogger(__name__)


class SweepPool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = "local"
    workers: StrictInt = Field(2, ge=1, description="worker actors shared by all searches")


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = Field(None,
                             description="prefix of the searches' names; default: the "
                             "experiment's name")
    experiment: str
    grid: dict[str, list[Any]] = Field(min_length=1)
    execution: SweepPool = SweepPool()
    output: str | None = Field(None, min_length=1,
                               description="folder of the run folders; default runs/<name>")


@dataclass
class Planned:
    """One search of a sweep: its experiment (overrides applied) and a short label."""

    label: str
    experiment: Experiment


def plan_sweep(paths: Sequence[str | Path], *, overrides: Sequence[str] = ()
               ) -> tuple[list[Planned], SweepPool]:
    """The searches a sweep runs: each experiment file as it is, or a sweep file's grid."""
    planned: list[Planned] = []
    pool = SweepPool()
    for path in paths:
        data = read_yaml_mapping(path, ExperimentError, "sweep or experiment file")
        if "grid" not in data:
            exp = Experiment.load(path, overrides)
            planned.append(Planned(exp.name, exp))
            continue
        try:
            sweep = SweepFile.model_validate(data)
        except ValidationError as err:
            raise ExperimentError(format_validation_error(err, str(path))) from None
        pool = sweep.execution
        base = Path(path).parent / sweep.experiment
        if not base.exists():
            base = Path(sweep.experiment)
        keys = list(sweep.grid)
        for values in itertools.product(*(sweep.grid[k] for k in keys)):
            sets = [f"{k}={json.dumps(v)}" for k, v in zip(keys, values, strict=True)]
            label = "-".join(_short(v) if isinstance(v, dict) else f"{k.split('.')[-1]}{v}"
                             for k, v in zip(keys, values, strict=True))
            exp = Experiment.load(base, [*sets, *overrides])
            prefix = sweep.name or exp.name
            root = Path(sweep.output) if sweep.output else Path("runs") / prefix
            exp = exp.model_copy(update={"name": f"{prefix}-{_safe(label)}",
                                         "output": str(root / _safe(label))})
            planned.append(Planned(label, exp))
    names = [p.experiment.name for p in planned]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExperimentError(f"the sweep runs {', '.join(dupes)} more than once: give each "
                              "search its own name")
    return planned, pool


def _short(value: dict[str, Any]) -> str:
    """A mapping grid value in a label: by its name (strategies), else as JSON."""
    return str(value.get("name", json.dumps(value, sort_keys=True)))


def _safe(label: str) -> str:
    """A label as a folder name: no separators, and not starting with a dot (so never
    ``.`` or ``..``, which would leave the sweep's folder)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return "_" + safe[1:] if safe.startswith(".") or not safe else safe


def run_sweep(planned: Sequence[Planned], *, address: str = "local", workers: int = 2,
              resume: bool | None = None) -> list[tuple[Planned, Any]]:
    """Run the searches on one Ray cluster, ``workers`` actors shared fairly; returns
    ``(search, RunSummary or the exception it raised)`` in sweep order."""
    from mergesearch.controller import run
    from mergesearch.execution.ray_executor import connect

    connect(address, num_cpus=workers if address == "local" else None)
    at_once = max(1, min(len(planned), workers))
    share = max(1, workers // at_once)

    def one(p: Planned):
        execution = p.experiment.execution.model_copy(
            update={"backend": "ray", "address": address, "workers": share})
        exp = p.experiment.model_copy(update={"execution": execution})
        try:
            return p, run(exp, resume=resume, progress=False)
        except Exception as err:  # one broken search must not stop the others
            log.error("search %s failed: %s", exp.name, err)
            return p, err

    with ThreadPoolExecutor(max_workers=at_once) as threads:
        return list(threads.map(one, planned))
