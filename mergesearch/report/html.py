"""The static report: one self-contained HTML file per run (``mergesearch report``).

Per study (or stage): the Pareto front, best so far / hypervolume per evaluation, the
front's recipes as a table with their scores and tracked metrics (and the report items'
scores when the run scored them), per-layer heatmaps of the front's recipes (the chosen
one first), data-flow paths as diagrams, and the settings the study was run with.  With
several studies, the ``compare`` table and curves come first.

plotly.js is written once into the page (no network needed to open it); the figures are
those of :mod:`mergesearch.report.plots`, so the page and the dashboard agree.  Reading
only: studies are opened without their lease, nothing is written to storage.
"""

from __future__ import annotations

import datetime
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mergesearch.errors import MergesearchError
from mergesearch.report import compare as cmp
from mergesearch.storage import StorageError, TrialRecord, TrialStore
from mergesearch.strategies.base import Objective

MAX_PATHS = 6  # layer-path diagrams drawn per study (the chosen recipe first)
MAX_HEATMAP_TRIALS = 50  # front recipes in the heatmap menu

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 1em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em;
  margin-top: 2em; }
.meta { color: #666; } .note { color: #666; font-style: italic; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right;
         vertical-align: top; }
th { background: #f3f3f3; } td.left, th.left { text-align: left; }
tr.chosen td { background: #eef4ff; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
details summary { cursor: pointer; color: #1f5fbf; }
.figure { margin: 1em 0; }
"""


class ReportError(MergesearchError, ValueError):
    """A report that cannot be made as asked (no such study or stage); says the fix."""


# -- which studies -----------------------------------------------------------------------


def report_studies(exp: Any, studies: Sequence[str] | None = None,
                   stage: str | None = None) -> list[TrialStore]:
    """The studies a report covers: each named study (default: the experiment's own); for
    an experiment with stages, the given ``stage`` of each, else every stage that has run."""
    from mergesearch.controller import stage_study

    url = exp.storage_url
    names = list(dict.fromkeys(studies or [None]))
    if not exp.stages:
        if stage is not None:
            raise ReportError("--stage: this experiment has no stages")
        return [TrialStore.open(url, s or exp.name) for s in names]
    stages = [st.name for st in exp.stages]
    if stage is not None and stage not in stages:
        raise ReportError(f"--stage {stage!r}: the stages are {', '.join(stages)}")
    stores = []
    for s in names:
        if stage is not None:
            stores.append(TrialStore.open(url, stage_study(exp, stage, s)))
            continue
        ran = [stage_study(exp, st, s) for st in stages
               if TrialStore.exists(url, stage_study(exp, st, s))]
        if not ran:
            try:  # its error names the studies there
                TrialStore.open(url, stage_study(exp, stages[0], s))
            except StorageError as err:
                raise ReportError(f"no stage of study {s or exp.name!r} has run yet: "
                                  f"{err}") from None
        stores += [TrialStore.open(url, n) for n in ran]
    return stores


def default_path(exp: Any, studies: Sequence[str] | None = None) -> Path:
    """``<run folder>/report.html``; ``<run folder>/<study>/report.html`` for one study
    named with --study (beside that study's front)."""
    names = [s for s in dict.fromkeys(studies or []) if s != exp.name]
    if len(names) == 1 and len(list(dict.fromkeys(studies or []))) == 1:
        return exp.run_dir / names[0] / "report.html"
    return exp.run_dir / "report.html"


# -- the page ----------------------------------------------------------------------------


class _Page:
    """HTML parts in order; the first figure carries plotly.js, the others reuse it."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.figures = 0

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, fig, div_id: str) -> None:
        self.add('<div class="figure">' + fig.to_html(
            full_html=False, include_plotlyjs=self.figures == 0, div_id=div_id,
            config={"displaylogo": False, "responsive": True}) + "</div>")
        self.figures += 1


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else _e(v)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def build_report(stores: Sequence[TrialStore], *, title: str | None = None) -> str:
    """The report's HTML for studies already opened (see :func:`report_studies`)."""
    from mergesearch import __version__

    if not stores:
        raise ReportError("no study to report on")
    page = _Page()
    title = title or stores[0].study.study_name
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page.add(f"<h1>mergesearch report: {_e(title)}</h1>")
    page.add(f'<p class="meta">written {_e(now)} by mergesearch {_e(__version__)}; '
             f"{len(stores)} stud{'y' if len(stores) == 1 else 'ies'}: "
             + ", ".join(f"<a href='#{_slug(s.study.study_name)}'>{_e(s.study.study_name)}</a>"
                         for s in stores) + "</p>")
    read = [(s, s.trials()) for s in stores]
    if len(stores) > 1:
        _comparison(page, read)
    for store, trials in read:
        _study(page, store, trials)
    body = "\n".join(page.parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(title)}: mergesearch report</title><style>{STYLE}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


def _comparison(page: _Page, read: Sequence[tuple[TrialStore, list[TrialRecord]]]) -> None:
    from mergesearch.report.plots import compare_figure, history_budgets

    page.add("<h2 id='compare'>Comparison</h2>")
    first = [Objective(o.name, o.direction) for o in read[0][0].objectives]
    differ = [s.study.study_name for s, _ in read[1:]
              if [Objective(o.name, o.direction) for o in s.objectives] != first]
    if differ:
        page.add(f"<p class='note'>not compared: {_e(', '.join(differ))} "
                 f"{'has' if len(differ) == 1 else 'have'} other objectives than "
                 f"{_e(read[0][0].study.study_name)}</p>")
        return
    runs = [cmp.run_of(s) for s, _ in read]
    table = cmp.compare(runs, first)
    page.add(f"<pre>{_e(cmp.format_comparison(table))}</pre>")
    most = max(len([t for t in trials if t.state != "running"]) for _, trials in read)
    if most:
        curves = cmp.compare(runs, first, budgets=history_budgets(most))
        page.figure(compare_figure(curves, "Per evaluation, each study"), "compare-curves")


def _study(page: _Page, store: TrialStore, trials: list[TrialRecord]) -> None:
    from mergesearch.report import choose
    from mergesearch.report.plots import (
        front_figure,
        history_figure,
        layer_heatmap_figure,
        layer_path_figure,
    )
    from mergesearch.storage.trials import REPORT

    name = store.study.study_name
    slug = _slug(name)
    objectives = store.objectives
    front = store.pareto_front()
    ok = sum(t.state == "ok" for t in trials)
    page.add(f"<h2 id='{slug}'>Study {_e(name)}</h2>")
    page.add(f"<p class='meta'>{_e(store.url)}: {len(trials)} trials ({ok} ok, "
             f"{len(trials) - ok} failed or unfinished); objectives "
             + _e(", ".join(f"{o.name} ({o.direction}, weight {o.weight:g})"
                            for o in objectives)) + "</p>")
    if not front:
        page.add("<p class='note'>no completed trial yet</p>")
    chosen = choose(front, objectives) if front else None
    ordered = ([chosen] + [t for t in front if t.number != chosen.number]) if chosen else []
    page.figure(front_figure(trials, objectives, front), f"{slug}-front")
    page.figure(history_figure(trials, objectives), f"{slug}-history")
    report = store.study.user_attrs.get(REPORT)
    _front_table(page, ordered, objectives, chosen, report, store.tracked_names(ordered))
    heat = layer_heatmap_figure(ordered[:MAX_HEATMAP_TRIALS])
    if heat is not None:
        page.add("<h3>Per-layer values of the front's recipes</h3>")
        if len(ordered) > 1:
            page.add("<p class='note'>the chosen trial first; the menu at the top right "
                     "shows the others</p>")
        page.figure(heat, f"{slug}-layers")
    paths = [t for t in ordered if t.recipe and t.recipe.get("layer_path")]
    if paths:
        page.add("<h3>Layer paths</h3>")
        for t in paths[:MAX_PATHS]:
            values = ", ".join(f"{k}={v:.4f}" for k, v in t.values.items())
            fig = layer_path_figure(t.recipe, title=f"trial {t.number} ({values}): "
                                    f"{len(t.recipe['layer_path'])} hops")
            page.figure(fig, f"{slug}-path-{t.number}")
        if len(paths) > MAX_PATHS:
            page.add(f"<p class='note'>... and {len(paths) - MAX_PATHS} more front recipes "
                     "with a layer path (see the table)</p>")
    try:
        settings = store.experiment
    except KeyError:
        settings = {}
    page.add("<h3>Settings</h3><details><summary>the experiment this study was run with"
             f"</summary><pre>{_e(yaml.safe_dump(settings, sort_keys=False))}</pre></details>")


def _front_table(page: _Page, ordered: Sequence[TrialRecord], objectives: Sequence[Objective],
                 chosen: TrialRecord | None, report: dict | None,
                 tracked: Sequence[str] = ()) -> None:
    if not ordered:
        return
    page.add(f"<h3>Front recipes ({len(ordered)})</h3>")
    if tracked:
        page.add("<p class='note'>tracked (recorded, not optimised): "
                 f"{_e(', '.join(tracked))}</p>")
    if chosen is not None:
        page.add(f"<p class='note'>chosen (first row): trial {chosen.number}, the best "
                 "weighted sum of objectives rescaled over the front (mergesearch export's "
                 "default)</p>")
    if report:
        values = ", ".join(f"{k} {v:.4f}" for k, v in report.get("values", {}).items())
        search = ", ".join(f"{k} {v:.4f}" for k, v in report.get("search", {}).items())
        page.add(f"<p>trial {_e(report.get('trial'))} on the report items: {_e(values)} "
                 f"(search items: {_e(search)})</p>")
    tasks = list(dict.fromkeys(k for t in ordered for k in t.scores))
    has_report = bool(report) and any(t.number == report.get("trial") for t in ordered)
    head = ["trial", *(o.name for o in objectives), *(f"{n} (tracked)" for n in tracked)]
    if has_report:
        head.append("report items")
    head += [f"task {k}" for k in tasks]
    rows = ["<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head)
            + "<th class='left'>recipe</th></tr>"]
    for t in ordered:
        cells = [str(t.number), *(_num(t.values.get(o.name)) for o in objectives),
                 *(_num(t.tracked.get(n)) for n in tracked)]
        if has_report:
            cells.append(", ".join(f"{k} {v:.4f}" for k, v in report["values"].items())
                         if t.number == report["trial"] else "")
        cells += [", ".join(f"{m}={v:.4f}" for m, v in t.scores.get(k, {}).items())
                  for k in tasks]
        recipe = json.dumps(t.recipe, indent=2) if t.recipe else "(none)"
        method = (t.recipe or {}).get("method", "")
        rows.append(f"<tr{' class=chosen' if t is chosen else ''}>"
                    + "".join(f"<td>{_e(c)}</td>" for c in cells)
                    + f"<td class='left'><details><summary>{_e(method)}</summary>"
                    f"<pre>{_e(recipe)}</pre></details></td></tr>")
    page.add("<table>" + "".join(rows) + "</table>")


# -- writing -----------------------------------------------------------------------------


def write_report(exp: Any, out: str | Path | None = None, *,
                 studies: Sequence[str] | None = None, stage: str | None = None) -> Path:
    """Write the report of an experiment's studies (see :func:`report_studies`) to
    ``out`` (default :func:`default_path`), atomically; returns where it went."""
    from mergesearch.atomic import atomic_write_text, check_target

    path = Path(out).expanduser() if out is not None else default_path(exp, studies)
    check_target(path, directory=False)
    stores = report_studies(exp, studies, stage)
    return atomic_write_text(path, build_report(stores, title=exp.name))
