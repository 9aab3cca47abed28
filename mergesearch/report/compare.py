"""Comparing searches: best values, hypervolume and trials-to-target at fixed budgets.

What a budget counts.  The controller writes each finished candidate as one trial the
moment its result arrives, so a study's trial numbers are the order its search
finished them.  Budget ``b`` is the first ``b`` trials in that order, the same count
``budget.evaluations`` stops a search at:

* a failed trial counts (it cost an evaluation) and gives no value;
* a trial served from the result cache (``cached_from``: the strategy asked again for a
  recipe already scored) counts, as the controller's budget counts it, and carries the
  values it was served: that recipe's real score;
* a trial scored at a fidelity below 1 (a multi-fidelity strategy's cheap look) counts and
  gives no value: its score comes from part of the items, not comparable with full ones;
* the trials of every search epoch count (``run --new-epoch`` keeps them in the budget);
* probes are never trials: they live in the sibling study ``<name>.probes``, which is not
  read, and such studies are skipped when a whole storage is listed;
* trials left "running" (only by other tools: mergesearch writes finished trials only)
  are not finished, and are left out.

A budget above a study's trial count reports the value at its last trial and marks it
(``short`` in JSON and CSV, ``*`` in the table).  Without ``budgets``: those of 25, 50
and 100 below the largest trial count among the studies, then that count itself.

Hypervolume is pymoo's, on losses (``sign * value``: maximised objectives negated) of the
ok trials within the budget, against one reference point for the whole comparison: for
each objective the worst value over the ok trials of all studies compared, pushed out
by 10% of that objective's range (by ``1e-6 * max(1, |worst|)`` when the range is 0), so
every point adds volume.  Numbers compare across the studies of one comparison only
(other studies give another point); pass ``ref_point`` to fix it.

Targets: the trials a study needed to reach a value at least as good as the target (the
1-based position of the first such trial, over all its trials), None when never.

Groups: studies with the same strategy label (its name and options, as recorded in the
study's experiment) are the seeds of one group: mean and standard deviation
(``statistics.stdev``, n - 1) over the studies that have a value; no deviation for one.
For targets, the group's figures are over the studies that reached it.

Reading only: studies are opened without their lease (a running search may be compared
while it writes), no study or probe study is created, and a SQLite file or database
without Optuna's tables is refused before Optuna could create them.

:func:`compare` does it all on trials already read (``(number, state, values)``);
:func:`load_curves` reads the studies first.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergesearch.errors import MergesearchError
from mergesearch.strategies.base import Objective

DEFAULT_BUDGETS = (25, 50, 100)
REF_MARGIN = 0.1  # the reference point lies this share of each objective's range beyond
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")

Trial = tuple[int, str, Mapping[str, float]]  # number, state ("ok", "failed", ...), values


class CompareError(MergesearchError, ValueError):
    """Studies that cannot be compared as asked; the message says why."""


@dataclass
class Run:
    """One search's trials, already read: all that :func:`compare` needs."""

    name: str
    trials: Sequence[Trial]
    strategy: str = "?"
    seed: int | None = None
    url: str = ""


@dataclass
class StudyCurve:
    """One study's figures at each budget."""

    name: str
    url: str
    strategy: str  # label: "cmaes", or "cmaes{popsize: 8}" with options
    seed: int | None
    trials: int  # finished trials (ok and failed)
    failed: int
    objectives: list[Objective]
    best: dict[int, dict[str, float | None]]  # budget -> objective -> best so far
    hypervolume: dict[int, float | None]  # None: no ok trial within the budget
    reached: dict[str, int | None]  # objective -> trials needed to reach its target
    short: dict[int, bool]  # the study has fewer trials than the budget


@dataclass
class Stat:
    """Mean and sample standard deviation over the ``n`` studies that have a value."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        got = [v for v in values if v is not None]
        return cls(statistics.mean(got) if got else None,
                   statistics.stdev(got) if len(got) > 1 else None, len(got))

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass
class Group:
    """The studies of one strategy label (its seeds), summarised."""

    strategy: str
    studies: list[str]
    seeds: list[int | None]
    best: dict[int, dict[str, Stat]]
    hypervolume: dict[int, Stat]
    reached: dict[str, Stat]  # n: how many studies reached the target
    short: dict[int, bool]  # some study of the group is short of the budget


@dataclass
class Comparison:
    """Every study's curve and every strategy's group, at the same budgets, with the one
    reference point their hypervolumes share."""

    objectives: list[Objective]
    budgets: list[int]
    targets: dict[str, float]
    ref_point: dict[str, float] | None  # in the objectives' own units; None: no ok trial
    ref_given: bool  # passed in, not derived from the studies
    curves: list[StudyCurve]
    groups: dict[str, Group]  # strategy label -> group, in order of first appearance

    def to_json(self) -> dict[str, Any]:
        def per_budget(d: Mapping[int, Any], f=lambda v: v) -> dict[str, Any]:
            return {str(b): f(v) for b, v in d.items()}

        return {
            "objectives": [{"name": o.name, "direction": o.direction} for o in self.objectives],
            "budgets": self.budgets,
            "targets": self.targets,
            "ref_point": self.ref_point,
            "ref_point_rule": _ref_rule(self),
            "studies": [{
                "name": c.name, "url": c.url, "strategy": c.strategy, "seed": c.seed,
                "trials": c.trials, "failed": c.failed, "best": per_budget(c.best),
                "hypervolume": per_budget(c.hypervolume), "reached": c.reached,
                "short": per_budget(c.short)} for c in self.curves],
            "groups": [{
                "strategy": g.strategy, "studies": g.studies, "seeds": g.seeds,
                "best": per_budget(g.best, lambda d: {k: s.to_json() for k, s in d.items()}),
                "hypervolume": per_budget(g.hypervolume, Stat.to_json),
                "reached": {k: s.to_json() for k, s in g.reached.items()},
                "short": per_budget(g.short)} for g in self.groups.values()],
        }

    def csv_text(self) -> str:
        """One row per study and budget, then one per group and budget (mean in the value
        columns, the deviation in ``*_std``)."""
        names = [o.name for o in self.objectives]
        header = ["kind", "study", "url", "strategy", "seed", "trials", "budget", "short", "n"]
        for n in names:
            header += [n, f"{n}_std"]
        header += ["hypervolume", "hypervolume_std", *(f"reach_{t}" for t in self.targets)]
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(header)
        for c in self.curves:
            for b in self.budgets:
                row = ["study", c.name, c.url, c.strategy, c.seed, c.trials, b, c.short[b], 1]
                for n in names:
                    row += [c.best[b][n], None]
                row += [c.hypervolume[b], None, *(c.reached[t] for t in self.targets)]
                w.writerow(["" if v is None else v for v in row])
        for g in self.groups.values():
            for b in self.budgets:
                row = ["group", ";".join(g.studies), "", g.strategy,
                       ";".join(str(s) for s in g.seeds), "", b, g.short[b], len(g.studies)]
                for n in names:
                    row += [g.best[b][n].mean, g.best[b][n].std]
                hv = g.hypervolume[b]
                row += [hv.mean, hv.std, *(g.reached[t].mean for t in self.targets)]
                w.writerow(["" if v is None else v for v in row])
        return out.getvalue()

    def to_csv(self, path: str | Path) -> Path:
        from mergesearch.atomic import atomic_write_text

        return atomic_write_text(path, self.csv_text())


# -- the computation ----------------------------------------------------------------------


def compare(runs: Sequence[Run], objectives: Sequence[Objective],
            budgets: Sequence[int] | None = None,
            targets: Mapping[str, float] | float | None = None,
            ref_point: Mapping[str, float] | None = None) -> Comparison:
    """Compare searches whose trials are already read (see the module docstring for what
    a budget, the reference point and a target mean).  ``targets``: objective -> value, or
    one number for the first objective; ``ref_point``: objective -> value."""
    objectives = list(objectives)
    if not objectives:
        raise CompareError("no objectives to compare")
    targets = _check_targets(targets, objectives)
    finished = [_finished(r.trials) for r in runs]
    if budgets:
        budgets = check_budgets(budgets)
    else:
        budgets = default_budgets(max((len(t) for t in finished), default=0))
    given = ref_point is not None
    if given:
        missing = [o.name for o in objectives if o.name not in ref_point]
        if missing:
            raise CompareError(f"ref_point: no value for {', '.join(missing)}")
        ref = {o.name: float(ref_point[o.name]) for o in objectives}
    else:
        ref = reference_point(finished, objectives)
    curves = [_curve(r, t, objectives, budgets, targets, ref)
              for r, t in zip(runs, finished, strict=True)]
    return Comparison(objectives, budgets, targets, ref, given, curves,
                      group_curves(curves, budgets, targets))


def default_budgets(most: int) -> list[int]:
    """25, 50 and 100 below the largest trial count, then that count (25, 50, 100 when
    no study has a trial)."""
    if most <= 0:
        return list(DEFAULT_BUDGETS)
    return [b for b in DEFAULT_BUDGETS if b < most] + [most]


def check_budgets(budgets: Sequence[int]) -> list[int]:
    out = sorted({int(b) for b in budgets})
    if not out or out[0] < 1 or any(int(b) != b for b in budgets):
        raise CompareError(f"budgets {list(budgets)}: expected whole numbers >= 1")
    return out


def reference_point(studies: Sequence[Sequence[Trial]], objectives: Sequence[Objective]
                    ) -> dict[str, float] | None:
    """The worst value of each objective over the ok trials of all ``studies``, pushed
    outward by 10% of its range (a tiny step when the range is 0); None without values."""
    ref = {}
    for o in objectives:
        losses = [o.sign * v for trials in studies for t in trials
                  if (v := _value(t, o)) is not None]
        if not losses:
            return None
        worst, spread = max(losses), max(losses) - min(losses)
        step = REF_MARGIN * spread if spread > 0 else 1e-6 * max(1.0, abs(worst))
        ref[o.name] = o.sign * (worst + step)
    return ref


def hypervolume(points: Sequence[Mapping[str, float]], objectives: Sequence[Objective],
                ref_point: Mapping[str, float]) -> float | None:
    """pymoo's hypervolume of ``points`` (objective -> value) against ``ref_point``,
    maximised objectives negated; None for no point (points not better than the
    reference point in every objective add nothing)."""
    import numpy as np
    from pymoo.indicators.hv import HV

    if not points:
        return None
    losses = np.array([[o.sign * p[o.name] for o in objectives] for p in points], dtype=float)
    ref = np.array([o.sign * ref_point[o.name] for o in objectives], dtype=float)
    return float(HV(ref_point=ref)(losses))


def group_curves(curves: Sequence[StudyCurve], budgets: Sequence[int],
                 targets: Mapping[str, float]) -> dict[str, Group]:
    """The curves grouped by strategy label, with mean and deviation per budget."""
    members: dict[str, list[StudyCurve]] = {}
    for c in curves:
        members.setdefault(c.strategy, []).append(c)
    groups = {}
    for label, cs in members.items():
        names = [o.name for o in cs[0].objectives]
        groups[label] = Group(
            strategy=label, studies=[c.name for c in cs], seeds=[c.seed for c in cs],
            best={b: {n: Stat.of([c.best[b][n] for c in cs]) for n in names} for b in budgets},
            hypervolume={b: Stat.of([c.hypervolume[b] for c in cs]) for b in budgets},
            reached={t: Stat.of([c.reached[t] for c in cs]) for t in targets},
            short={b: any(c.short[b] for c in cs) for b in budgets})
    return groups


def _finished(trials: Sequence[Trial]) -> list[Trial]:
    return sorted((t for t in trials if t[1] != "running"), key=lambda t: t[0])


def _value(trial: Trial, o: Objective) -> float | None:
    """A trial's value of ``o``, if it gives one (an ok trial with a finite value)."""
    _, state, values = trial
    v = values.get(o.name) if state == "ok" else None
    return None if v is None or not math.isfinite(v) else float(v)


def _curve(run: Run, trials: Sequence[Trial], objectives: list[Objective],
           budgets: Sequence[int], targets: Mapping[str, float],
           ref: Mapping[str, float] | None) -> StudyCurve:
    best, hv, short = {}, {}, {}
    for b in budgets:
        first = trials[:b]
        best[b] = {}
        for o in objectives:
            values = [v for t in first if (v := _value(t, o)) is not None]
            best[b][o.name] = min(values, key=lambda v: o.sign * v) if values else None
        points = [{o.name: _value(t, o) for o in objectives} for t in first]
        points = [p for p in points if None not in p.values()]
        hv[b] = None if ref is None else hypervolume(points, objectives, ref)
        short[b] = len(trials) < b
    by_name = {o.name: o for o in objectives}
    reached = {}
    for name, goal in targets.items():
        o = by_name[name]
        reached[name] = next((i for i, t in enumerate(trials, 1)
                              if (v := _value(t, o)) is not None and o.sign * (v - goal) <= 0),
                             None)
    return StudyCurve(name=run.name, url=run.url, strategy=run.strategy, seed=run.seed,
                      trials=len(trials), failed=sum(t[1] == "failed" for t in trials),
                      objectives=list(objectives), best=best, hypervolume=hv,
                      reached=reached, short=short)


def _check_targets(targets: Mapping[str, float] | float | None,
                   objectives: Sequence[Objective]) -> dict[str, float]:
    if targets is None:
        return {}
    if not isinstance(targets, Mapping):
        return {objectives[0].name: float(targets)}
    known = [o.name for o in objectives]
    unknown = [k for k in targets if k not in known]
    if unknown:
        raise CompareError(f"target for unknown objective(s) {', '.join(unknown)}; the "
                           f"objectives are {', '.join(known)}")
    return {k: float(v) for k, v in targets.items()}


# -- reading studies ----------------------------------------------------------------------


def parse_budgets(text: str) -> list[int]:
    """``"25,50,100"`` as a list of budgets."""
    try:
        return check_budgets([int(p) for p in text.split(",") if p.strip()])
    except ValueError:
        raise CompareError(f"--budgets {text!r}: expected whole numbers >= 1, e.g. "
                           "25,50,100") from None


def parse_targets(text: str) -> dict[str, float] | float:
    """``"0.9"`` (the first objective) or ``"acc=0.9,size=2"``."""
    usage = f"--target {text!r}: expected a number (for the first objective) or name=number,..."
    try:
        if "=" not in text:
            value = float(text)
        else:
            value = {}
            for part in text.split(","):
                name, sep, v = part.partition("=")
                if not sep or not name.strip():
                    raise ValueError
                value[name.strip()] = float(v)
    except ValueError:
        raise CompareError(usage) from None
    if not all(math.isfinite(v) for v in (value.values() if isinstance(value, dict)
                                          else [value])):
        raise CompareError(usage)
    return value


def resolve(spec: str) -> list[tuple[str, str | None]]:
    """``(storage URL, study name)`` of a STUDY argument: an experiment file (its study;
    for stages the last that has run, as `status`), a storage URL (None: every study in
    it, by name), ``URL#study`` or ``FILE#study``, or a SQLite file (``.db``, ``.sqlite``)."""
    base, sep, name = spec.rpartition("#")
    if not sep or not name or not base:
        base, name = spec, None
    if "://" in base:
        return [(base, name)]
    path = Path(base).expanduser()
    if path.suffix.lower() in SQLITE_SUFFIXES:
        if not path.is_file():
            raise CompareError(f"{base}: no such SQLite file")
        return [(f"sqlite:///{path.resolve().as_posix()}", name)]
    from mergesearch.experiment import Experiment

    exp = Experiment.load(path)
    url = exp.storage_url
    if name is None and exp.stages:
        from mergesearch.controller import stage_study
        from mergesearch.storage import TrialStore

        names = [stage_study(exp, st.name) for st in exp.stages]
        ran = [n for n in names if TrialStore.exists(url, n)]
        name = ran[-1] if ran else names[-1]
    return [(url, name or exp.name)]


def _check_storage(url: str) -> None:
    """Refuse a storage that does not exist or holds no Optuna tables, before Optuna
    would create them (comparing must write nothing)."""
    import sqlalchemy

    from mergesearch.storage.rdb import StorageError, sqlite_missing

    if sqlite_missing(url):
        raise StorageError(f"storage {url!r}: the file does not exist")
    try:
        engine = sqlalchemy.create_engine(url)
        try:
            has = sqlalchemy.inspect(engine).has_table("studies")
        finally:
            engine.dispose()
    except Exception as err:
        raise StorageError(f"cannot open storage {url!r}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if not has:
        raise StorageError(f"storage {url!r} holds no Optuna studies")


def open_studies(specs: Sequence[str]):
    """The :class:`TrialStore` of every study the STUDY arguments name, each once, read
    only (no lease taken, nothing created)."""
    from mergesearch.storage import StorageError, TrialStore
    from mergesearch.storage.rdb import open_rdb, quiet_optuna
    from mergesearch.storage.trials import EXPERIMENT, PROBES

    stores, seen, checked = [], set(), set()
    for spec in specs:
        for url, name in resolve(spec):
            if url not in checked:
                _check_storage(url)
                checked.add(url)
            if name is not None:
                names = [name]
            else:
                with quiet_optuna():
                    names = sorted(s.study_name for s in open_rdb(url).get_all_studies()
                                   if not s.study_name.endswith(PROBES)
                                   and EXPERIMENT in s.user_attrs)
                if not names:
                    raise StorageError(f"storage {url!r} holds no mergesearch study")
            for n in names:
                if (url, n) not in seen:
                    seen.add((url, n))
                    stores.append(TrialStore.open(url, n))
    if not stores:
        raise CompareError("no study to compare")
    return stores


def strategy_label(name: str, options: Mapping[str, Any] | None = None) -> str:
    """``"cmaes"``, or ``"cmaes{popsize: 8, sigma0: 0.3}"`` with options (sorted)."""
    if not options:
        return name
    return name + "{" + ", ".join(f"{k}: {json.dumps(v, sort_keys=True)}"
                                  for k, v in sorted(options.items())) + "}"


def run_of(store) -> Run:
    """A study's trials as :func:`compare` reads them (see the module docstring)."""
    exp = store.experiment
    strategy = exp.get("strategy") or {}
    trials = [(t.number, "partial" if t.state == "ok" and t.fidelity < 1 else t.state,
               t.values) for t in store.trials()]
    return Run(name=store.study.study_name, trials=trials, url=store.url, seed=exp.get("seed"),
               strategy=strategy_label(strategy.get("name", "?"), strategy.get("options")))


def load_curves(specs: Sequence[str], budgets: Sequence[int] | None = None,
                targets: Mapping[str, float] | float | None = None,
                ref_point: Mapping[str, float] | None = None) -> Comparison:
    """Read the studies the STUDY arguments name (see :func:`resolve`) and compare them;
    they must have the same objectives."""
    stores = open_studies(specs)
    objectives = [Objective(o.name, o.direction) for o in stores[0].objectives]
    for s in stores[1:]:
        theirs = [Objective(o.name, o.direction) for o in s.objectives]
        if theirs != objectives:
            raise CompareError(
                f"{s.where} has objectives {_describe(theirs)}, but {stores[0].where} has "
                f"{_describe(objectives)}: compare studies of the same objectives")
    return compare([run_of(s) for s in stores], objectives, budgets, targets, ref_point)


def _describe(objectives: Sequence[Objective]) -> str:
    return ", ".join(f"{o.name} ({o.direction})" for o in objectives) or "none"


# -- the table ----------------------------------------------------------------------------


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e6 else f"{v:.3e}"


def _count(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _pm(s: Stat, fmt=_num) -> str:
    return fmt(s.mean) if s.std is None else f"{fmt(s.mean)} ± {fmt(s.std)}"


def _ref_rule(c: Comparison) -> str:
    if c.ref_given:
        return "given"
    return (f"the worst value of each objective over the ok trials of the {len(c.curves)} "
            f"studies, pushed out by {REF_MARGIN:.0%} of its range")


def _table(header: list[str], rows: list[list[str]], left: int) -> list[str]:
    """Columns aligned: the first ``left`` to the left, the others to the right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in [header, *rows]]


def _target_heading(c: Comparison, name: str) -> str:
    o = next(o for o in c.objectives if o.name == name)
    return f"to {name}{'>=' if o.direction == 'maximize' else '<='}{c.targets[name]:g}"


def format_comparison(c: Comparison) -> str:
    """The comparison as text: objectives and reference point, one row per study and
    budget, then (when some strategy has several studies) mean ± std per strategy."""
    names = [o.name for o in c.objectives]
    lines = ["objectives: " + _describe(c.objectives)]
    if c.ref_point is None:
        lines.append("hypervolume: no ok trial in any study")
    else:
        lines.append("hypervolume reference point: " + ", ".join(
            f"{n}={c.ref_point[n]:.6g}" for n in names) + f" ({_ref_rule(c)})")
    reach = [_target_heading(c, t) for t in c.targets]
    if reach:
        lines.append("to X: trials needed to reach the target (- never)")
    if any(any(cv.short.values()) for cv in c.curves):
        lines.append("*: budget above the study's trial count; the value at its last trial")
    lines.append("")
    counts: dict[str, int] = {}
    for cv in c.curves:
        counts[cv.name] = counts.get(cv.name, 0) + 1
    header = ["study", "strategy", "seed", "trials", "failed", "budget", *names,
              "hypervolume", *reach]
    rows = []
    for cv in c.curves:
        label = cv.name if counts[cv.name] == 1 else f"{cv.name} [{cv.url}]"
        for i, b in enumerate(c.budgets):
            head = [label, cv.strategy, str(cv.seed), str(cv.trials), str(cv.failed)] \
                if i == 0 else [""] * 5
            tail = [("-" if cv.reached[t] is None else str(cv.reached[t])) if i == 0 else ""
                    for t in c.targets]
            rows.append([*head, f"{b}{'*' if cv.short[b] else ''}",
                         *(_num(cv.best[b][n]) for n in names), _num(cv.hypervolume[b]),
                         *tail])
    lines += _table(header, rows, left=2)
    if any(len(g.studies) > 1 for g in c.groups.values()):
        lines += ["", "mean ± std over the studies of each strategy (std: n-1; to X: over "
                  "those that reached it, k/n reached)"]
        header = ["strategy", "studies", "seeds", "budget", *names, "hypervolume", *reach]
        rows = []
        for g in c.groups.values():
            for i, b in enumerate(c.budgets):
                head = [g.strategy, str(len(g.studies)),
                        ",".join(str(s) for s in g.seeds)] if i == 0 else [""] * 3
                tail = [f"{_pm(g.reached[t], _count)} ({g.reached[t].n}/{len(g.studies)})"
                        if i == 0 else "" for t in c.targets]
                rows.append([*head, f"{b}{'*' if g.short[b] else ''}",
                             *(_pm(g.best[b][n]) for n in names), _pm(g.hypervolume[b]),
                             *tail])
        lines += _table(header, rows, left=1)
    return "\n".join(lines)
