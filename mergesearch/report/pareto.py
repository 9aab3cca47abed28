"""Pareto fronts of a study: tables, preference-weighted choice, export of a point."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergesearch.atomic import atomic_dir, check_target
from mergesearch.recipe import Recipe
from mergesearch.storage import TrialRecord
from mergesearch.strategies.base import Objective


def best_values(trials: Sequence[TrialRecord], objectives: Sequence[Objective]
                ) -> dict[str, float]:
    """The best value of each objective over the completed trials (objectives no trial
    has a value for are left out)."""
    best: dict[str, float] = {}
    for o in objectives:
        values = [t.values[o.name] for t in trials if t.state == "ok" and o.name in t.values]
        if values:
            best[o.name] = min(values, key=lambda v: o.sign * v)
    return best


def parse_weights(text: str, objectives: Sequence[Objective]) -> dict[str, float]:
    """A preference over the objectives from the command line: ``name=w,name=w`` (objectives
    left out weigh 0) or a plain vector ``w,w`` with one weight per objective, in order.
    Weights are finite, non-negative and not all zero."""
    import math

    names = [o.name for o in objectives]
    parts = [p.strip() for p in text.split(",")]
    named = ["=" in p for p in parts]
    usage = (f"give name=weight,... (objectives: {', '.join(names)}) or {len(names)} "
             "number(s) in that order")
    if any(named) and not all(named):
        raise ValueError(f"weights {text!r}: mix of name=weight and plain numbers; {usage}")
    if not any(named) and len(parts) != len(names):
        raise ValueError(f"weights {text!r}: {len(parts)} weight(s) for {len(names)} "
                         f"objective(s) ({', '.join(names)}); {usage}")
    pairs = [p.partition("=")[::2] for p in parts] if any(named) else \
        list(zip(names, parts, strict=True))
    out: dict[str, float] = {}
    for name, value in pairs:
        name = name.strip()
        if name not in names:
            raise ValueError(f"weights {text!r}: unknown objective {name!r}; {usage}")
        if name in out:
            raise ValueError(f"weights {text!r}: {name!r} is given twice")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"weights {text!r}: {value.strip()!r} is not a number; "
                             f"{usage}") from None
        if not math.isfinite(out[name]) or out[name] < 0:
            raise ValueError(f"weights {text!r}: {name} {value.strip()} must be a finite "
                             "number >= 0")
    if not any(out.values()):
        raise ValueError(f"weights {text!r}: every weight is 0; give at least one a weight")
    return out


def choose(front: Sequence[TrialRecord], objectives: Sequence[Objective],
           weights: Mapping[str, float] | None = None) -> TrialRecord:
    """The front point with the best weighted sum of objectives rescaled to [0, 1] over the
    front (1 = the best value on the front); weights default to the objectives' own."""
    if not front:
        raise ValueError("the study has no completed trial yet")
    weights = dict(weights) if weights else {o.name: o.weight for o in objectives}
    unknown = set(weights) - {o.name for o in objectives}
    if unknown:
        raise ValueError(f"unknown objective(s) in weights: {', '.join(sorted(unknown))}; "
                         f"objectives are {', '.join(o.name for o in objectives)}")

    ranges = {}
    for o in objectives:
        vals = [-o.sign * p.values[o.name] for p in front]  # larger is better
        ranges[o.name] = (min(vals), max(vals))

    def utility(t: TrialRecord) -> float:
        total = 0.0
        for o in objectives:
            lo, hi = ranges[o.name]
            scaled = 1.0 if hi == lo else (-o.sign * t.values[o.name] - lo) / (hi - lo)
            total += weights.get(o.name, 0.0) * scaled
        return total

    return max(front, key=lambda t: (utility(t), -t.number))


def format_front(front: Sequence[TrialRecord], objectives: Sequence[Objective],
                 *, limit: int | None = None, params: int | None = None,
                 tracked: Sequence[str] = ()) -> str:
    """A text table of the front, best first by the objectives' weighted sum; at most
    ``limit`` rows, and the genome (the searched values) of the first ``params`` rows
    (all shown rows when None); the ``tracked`` metrics (``evaluator.track``) as columns
    after the objectives ("-" where a trial has no value)."""
    import pandas as pd  # here only: reading a study should not pay for pandas

    if not front:
        return "(no completed trials)"
    order = sorted(front, key=lambda t: -sum(-o.sign * o.weight * t.values[o.name]
                                             for o in objectives))
    shown = order[:limit] if limit else order
    frame = pd.DataFrame([{"trial": t.number} | {o.name: t.values[o.name] for o in objectives}
                          | {n: t.tracked.get(n, math.nan) for n in tracked}
                          for t in shown]).set_index("trial")
    lines = [frame.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")]
    if tracked:
        lines.append(f"(tracked, not optimised: {', '.join(tracked)})")
    if len(shown) < len(order):
        lines.append(f"... and {len(order) - len(shown)} more")
    with_params = shown if params is None else shown[:params]
    if with_params:
        lines.append("")
    for t in with_params:
        lines.append(f"trial {t.number}: " + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, int | float) else f"{k}={v}"
            for k, v in t.params.items()))
    return "\n".join(lines)


def format_tracked(trial: TrialRecord, tracked: Sequence[str]) -> str:
    """``exact_match 0.5000, zoo_rev/exact_match -`` (the trial's tracked values)."""
    return ", ".join(f"{n} {_value(trial.tracked.get(n))}" for n in tracked)


def _value(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def export_trial(trial: TrialRecord, out: str | Path, *, checkpoint: bool = False,
                 overwrite: bool = False, device: str = "cpu", progress: bool = True) -> Path:
    """Write a trial's recipe (``recipe.json``, ``mergekit.yml`` when mergekit can express
    it, ``scores.json``) into ``out``, and the merged model into ``out/model`` if asked.

    ``out`` appears whole or not at all (see :func:`mergesearch.atomic.atomic_dir`); a
    non-empty ``out`` is only replaced with ``overwrite``.
    """
    from mergesearch.export import check_not_an_input, save_merged

    if trial.recipe is None:
        raise ValueError(f"trial {trial.number} has no recipe")
    recipe = Recipe.from_dict(trial.recipe)
    check_target(Path(out), directory=True)
    check_not_an_input(recipe, Path(out))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_trial(trial, tmp, recipe)
        if checkpoint:
            save_merged(recipe, tmp / "model", device=device, progress=progress)
    return Path(out)


def write_trial(trial: TrialRecord, out: Path, recipe: Recipe | None = None) -> None:
    """The recipe files of one trial, into an existing directory ``out``."""
    from mergesearch.mergekit_config import NotExpressible, to_mergekit_yaml

    recipe = recipe or Recipe.from_dict(trial.recipe)
    (out / "recipe.json").write_text(recipe.to_json() + "\n")
    try:
        (out / "mergekit.yml").write_text(to_mergekit_yaml(recipe))
    except NotExpressible as err:
        (out / "mergekit.txt").write_text(f"not expressible in mergekit: {err}\n")
    tracked = {"tracked": trial.tracked} if trial.tracked else {}
    (out / "scores.json").write_text(json.dumps(
        {"trial": trial.number, "values": trial.values} | tracked | {"scores": trial.scores},
        indent=2) + "\n")
