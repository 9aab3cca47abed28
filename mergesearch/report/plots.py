"""Plotly figures of a study, built from trials already read: the static report
(:mod:`mergesearch.report.html`) and the live dashboard draw the same ones.

Every builder is a pure function of stored trials (:class:`TrialRecord`) or a recipe
(a dict as stored, or a :class:`Recipe`); none reads storage or imports torch.

* :func:`front_figure`: the Pareto front over the objectives (2-D, 3-D, parallel
  coordinates beyond 3; the best so far for one objective);
* :func:`history_figure`: best so far (one objective) or hypervolume (several) per
  evaluation, with the budget counting of :mod:`mergesearch.report.compare`;
* :func:`layer_heatmap_figure`: per-layer parameter values, source x layer, of a few
  recipes (one at a time, a menu to switch);
* :func:`layer_path_figure`: a data-flow (``layer_path``) recipe as a diagram;
* :func:`compare_figure`: several studies' best values and hypervolume per evaluation.

Values go into the figures as plain lists (not numpy arrays), so the JSON a page embeds
reads back as numbers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mergesearch.report import compare as cmp
from mergesearch.storage import TrialRecord
from mergesearch.storage.trials import distinct_recipes
from mergesearch.strategies.base import Objective

TEMPLATE = "plotly_white"
FRONT = "front"  # the name of the trace holding the front's points (tests and pages read it)
OTHERS = "dominated"
FRONT_COLOUR = "#1f5fbf"
FAINT = "rgba(120, 120, 120, 0.35)"
MAX_HISTORY_POINTS = 400  # history curves are evaluated at most at this many budgets
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
# a tensor-name filter that names a layer: "layers.3.", "model.layers.3.self_attn", "h.0."
_LAYER_FILTER = re.compile(r"(?:^|\.)(?P<key>[A-Za-z_]\w*)\.(?P<layer>\d+)\.(?P<module>[^.]*)")


# -- which trials ------------------------------------------------------------------------


def scored(trials: Sequence[TrialRecord], objectives: Sequence[Objective]
           ) -> list[TrialRecord]:
    """The completed trials with a finite value for every objective, by trial number."""
    return sorted((t for t in trials if t.state == "ok" and all(
        o.name in t.values and math.isfinite(t.values[o.name]) for o in objectives)),
        key=lambda t: t.number)


def front_of(trials: Sequence[TrialRecord], objectives: Sequence[Objective]
             ) -> list[TrialRecord]:
    """The trials no completed trial dominates, each recipe once (the first trial that
    scored it; trials served from the cache left out): the rule of
    :meth:`TrialStore.pareto_front`, on trials already read."""
    done = scored(trials, objectives)
    losses = [[o.sign * t.values[o.name] for o in objectives] for t in done]

    def dominated(a: list[float]) -> bool:
        return any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for b in losses)

    return distinct_recipes(t for t, loss in zip(done, losses, strict=True)
                            if not dominated(loss))


def _axis_title(o: Objective) -> str:
    return f"{o.name} ({'higher' if o.direction == 'maximize' else 'lower'} is better)"


def _hover(t: TrialRecord, objectives: Sequence[Objective]) -> str:
    return f"trial {t.number}<br>" + "<br>".join(
        f"{o.name} = {t.values[o.name]:.4g}" for o in objectives)


def _empty(title: str, why: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(template=TEMPLATE, title=title, xaxis={"visible": False},
                      yaxis={"visible": False},
                      annotations=[{"text": why, "showarrow": False, "font": {"size": 16}}])
    return fig


# -- the front ---------------------------------------------------------------------------


def front_figure(trials: Sequence[TrialRecord], objectives: Sequence[Objective],
                 front: Sequence[TrialRecord] | None = None) -> go.Figure:
    """The Pareto front: a scatter (2 objectives) or 3-D scatter (3) with the front
    highlighted and dominated trials faint, parallel coordinates beyond 3 (front lines
    coloured), and for one objective every trial's value with the best so far.  ``front``
    defaults to :func:`front_of` ``trials``; the trace named ``"front"`` holds its points."""
    objectives = list(objectives)
    done = scored(trials, objectives)
    front = front_of(trials, objectives) if front is None else list(front)
    if not objectives:
        return _empty("Pareto front", "the study has no objectives")
    if not done:
        return _empty("Pareto front", "no completed trial yet")
    on_front = {t.number for t in front}
    rest = [t for t in done if t.number not in on_front]
    if len(objectives) == 1:
        return _best_figure(done, front, objectives[0])
    if len(objectives) > 3:
        return _parallel_figure(done, on_front, objectives)

    def trace(points: Sequence[TrialRecord], name: str, marker: dict, **kw) -> go.BaseTraceType:
        coords = {axis: [t.values[o.name] for t in points]
                  for axis, o in zip("xyz", objectives, strict=False)}
        common = dict(name=name, mode="markers", marker=marker,
                      customdata=[t.number for t in points],
                      text=[_hover(t, objectives) for t in points], hoverinfo="text", **kw)
        if len(objectives) == 3:
            return go.Scatter3d(**coords, **common)
        return go.Scatter(**coords, **common)

    fig = go.Figure()
    fig.add_trace(trace(rest, OTHERS, {"color": FAINT, "size": 6}))
    fig.add_trace(trace(front, FRONT, {"color": FRONT_COLOUR, "size": 10,
                                       "line": {"width": 1, "color": "white"}}))
    title = f"Pareto front: {len(front)} of {len(done)} completed trials"
    if len(objectives) == 2:
        x, y = objectives
        line = sorted(front, key=lambda t: (x.sign * t.values[x.name], y.sign * t.values[y.name]))
        fig.add_trace(go.Scatter(x=[t.values[x.name] for t in line],
                                 y=[t.values[y.name] for t in line], mode="lines",
                                 line={"color": FRONT_COLOUR, "width": 1, "shape": "hv"},
                                 hoverinfo="skip", showlegend=False, name="front line"))
        fig.update_layout(xaxis_title=_axis_title(x), yaxis_title=_axis_title(y))
    else:
        fig.update_layout(scene={f"{a}axis_title": o.name
                                 for a, o in zip("xyz", objectives, strict=True)})
    fig.update_layout(template=TEMPLATE, title=title, legend={"orientation": "h"})
    return fig


def _best_figure(done: list[TrialRecord], front: Sequence[TrialRecord], o: Objective
                 ) -> go.Figure:
    best, line = None, []
    for t in done:
        v = t.values[o.name]
        best = v if best is None or o.sign * v < o.sign * best else best
        line.append(best)
    on_front = {t.number for t in front}
    rest = [t for t in done if t.number not in on_front]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[t.number for t in rest], y=[t.values[o.name] for t in rest],
                             mode="markers", name="trials", marker={"color": FAINT},
                             text=[_hover(t, [o]) for t in rest], hoverinfo="text"))
    fig.add_trace(go.Scatter(x=[t.number for t in done], y=line, mode="lines",
                             name="best so far", line={"color": FRONT_COLOUR, "shape": "hv"}))
    fig.add_trace(go.Scatter(x=[t.number for t in front], y=[t.values[o.name] for t in front],
                             mode="markers", name=FRONT, customdata=[t.number for t in front],
                             marker={"color": FRONT_COLOUR, "size": 11, "symbol": "star"},
                             text=[_hover(t, [o]) for t in front], hoverinfo="text"))
    fig.update_layout(template=TEMPLATE, title=f"Best trial: {o.name}", xaxis_title="trial",
                      yaxis_title=_axis_title(o), legend={"orientation": "h"})
    return fig


def _parallel_figure(done: list[TrialRecord], on_front: set[int],
                     objectives: Sequence[Objective]) -> go.Figure:
    # front lines drawn last (on top): parcoords draws in data order
    order = sorted(done, key=lambda t: t.number in on_front)
    dims = [{"label": f"{o.name} {'↑' if o.direction == 'maximize' else '↓'}",
             "values": [t.values[o.name] for t in order]} for o in objectives]
    dims.insert(0, {"label": "trial", "values": [t.number for t in order]})
    fig = go.Figure(go.Parcoords(
        name=FRONT, dimensions=dims,
        line={"color": [1 if t.number in on_front else 0 for t in order],
              "colorscale": [[0, "rgb(200, 200, 200)"], [1, FRONT_COLOUR]],
              "cmin": 0, "cmax": 1}))
    fig.update_layout(template=TEMPLATE, title=f"Pareto front: {len(on_front)} of {len(done)} "
                      "completed trials (blue; the others grey)")
    return fig


# -- history -----------------------------------------------------------------------------


def _run(trials: Sequence[TrialRecord], name: str = "study") -> cmp.Run:
    """Trials as :mod:`~mergesearch.report.compare` counts them (as its ``run_of``)."""
    return cmp.Run(name=name, trials=[
        (t.number, "partial" if t.state == "ok" and t.fidelity < 1 else t.state, t.values)
        for t in trials])


def history_budgets(count: int) -> list[int]:
    """Every evaluation 1..count, or at most :data:`MAX_HISTORY_POINTS` evenly spread
    ones (always the last)."""
    if count <= MAX_HISTORY_POINTS:
        return list(range(1, count + 1))
    step = count / MAX_HISTORY_POINTS
    return sorted({max(1, round(step * (i + 1))) for i in range(MAX_HISTORY_POINTS)} | {count})


def history_figure(trials: Sequence[TrialRecord], objectives: Sequence[Objective]
                   ) -> go.Figure:
    """Best so far (one objective) or hypervolume (several) after each evaluation, counted
    and computed as ``mergesearch compare`` does (failed trials count, lower fidelities
    give no value; the reference point: the worst values pushed out by 10%)."""
    objectives = [Objective(o.name, o.direction) for o in objectives]
    finished = [t for t in trials if t.state != "running"]
    if not objectives or not finished:
        return _empty("History", "no finished trial yet")
    c = cmp.compare([_run(finished)], objectives, budgets=history_budgets(len(finished)))
    what = "Hypervolume" if len(objectives) > 1 else f"Best {objectives[0].name} so far"
    return _history_traces(c, f"{what} per evaluation")


def _history_traces(c: cmp.Comparison, title: str) -> go.Figure:
    """Per study: best so far of each objective (one objective) or the hypervolume."""
    multi = len(c.objectives) > 1
    fig = go.Figure()
    for i, curve in enumerate(c.curves):
        colour = PALETTE[i % len(PALETTE)]
        if multi:
            series = {"hypervolume": [curve.hypervolume[b] for b in c.budgets]}
        else:
            o = c.objectives[0]
            series = {f"best {o.name}": [curve.best[b][o.name] for b in c.budgets]}
        for label, ys in series.items():
            name = label if len(c.curves) == 1 else f"{curve.name}"
            fig.add_trace(go.Scatter(x=list(c.budgets), y=ys, mode="lines", name=name,
                                     line={"color": colour, "shape": "hv"}))
    if multi and c.ref_point:
        ref = ", ".join(f"{k}={v:.4g}" for k, v in c.ref_point.items())
        ylabel, sub = "hypervolume", f"reference point {ref}"
    else:
        o = c.objectives[0]
        ylabel, sub = f"best {_axis_title(o)}", ""
    fig.update_layout(template=TEMPLATE, xaxis_title="evaluations (trials finished)",
                      yaxis_title=ylabel, legend={"orientation": "h"},
                      title=title + (f"<br><sub>{sub}</sub>" if sub else ""))
    return fig


def compare_figure(comparison: cmp.Comparison, title: str = "Comparison") -> go.Figure:
    """Several studies' curves (a :class:`~mergesearch.report.compare.Comparison` at the
    budgets to draw): hypervolume (several objectives) or best so far (one)."""
    return _history_traces(comparison, title)


# -- per-layer values --------------------------------------------------------------------


def _short(name: str) -> str:
    """A model's label: the last part of its path; a recipe-defined model, its method."""
    if name.startswith("recipe:"):
        try:
            return f"recipe ({json.loads(name[len('recipe:'):]).get('method', '?')})"
        except (ValueError, AttributeError):
            return "recipe model"
    return PurePath(name).name or name


def _labels(names: Sequence[str]) -> dict[str, str]:
    """Short labels for models, the full name where two short ones would collide."""
    short = {n: _short(n) for n in names}
    counts: dict[str, int] = {}
    for s in short.values():
        counts[s] = counts.get(s, 0) + 1
    return {n: s if counts[s] == 1 else n for n, s in short.items()}


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        return float(sum(value) / len(value))  # a gradient inside a layer's entry: its mean
    return None


def layer_values(setting: Any) -> dict[tuple[int, str], float]:
    """``(layer, module) -> value`` of a setting's layer-filtered ``{filter, value}`` entries
    (module ``""``: the whole layer, or the rest of it after module entries); the first
    entry for a filter wins, as when merging.  Empty for scalars and gradients."""
    out: dict[tuple[int, str], float] = {}
    if not isinstance(setting, list):
        return out
    for entry in setting:
        if not isinstance(entry, Mapping):
            continue
        m = _LAYER_FILTER.search(entry.get("filter") or "")
        value = _scalar(entry.get("value"))
        if m is None or value is None:
            continue
        out.setdefault((int(m["layer"]), m["module"]), value)
    return out


def recipe_layer_table(recipe: Mapping[str, Any] | Any
                       ) -> dict[str, dict[str, dict[tuple[int, str], float]]]:
    """``parameter -> row -> (layer, module) -> value`` of a recipe's per-layer values;
    rows are its source models (short labels) and ``"(all)"`` for recipe-wide values."""
    data = _recipe_dict(recipe)
    models = [m for m in data.get("models") or [] if isinstance(m, Mapping)]
    labels = _labels([str(m.get("model", "?")) for m in models])
    table: dict[str, dict[str, dict[tuple[int, str], float]]] = {}
    for m in models:
        for name, setting in (m.get("parameters") or {}).items():
            if values := layer_values(setting):
                table.setdefault(name, {})[labels[str(m.get("model", "?"))]] = values
    for name, setting in (data.get("parameters") or {}).items():
        if values := layer_values(setting):
            table.setdefault(name, {})["(all)"] = values
    return table


def _recipe_dict(recipe: Any) -> dict[str, Any]:
    if recipe is None:
        return {}
    if hasattr(recipe, "to_dict"):
        return recipe.to_dict()
    return dict(recipe)


def _column_label(layer: int, module: str, modules: bool) -> str:
    if not modules:
        return f"L{layer}"
    return f"L{layer} {module}" if module else f"L{layer} (rest)"


def layer_heatmap_figure(trials: Sequence[TrialRecord]) -> go.Figure | None:
    """Heatmaps of the trials' per-layer recipe values (one per parameter: rows the
    sources, columns the layers, or layer x module), one trial at a time with a menu to
    switch between them; colours share one scale per parameter across the trials.  None
    when no trial's recipe has per-layer values."""
    tables = [(t, recipe_layer_table(t.recipe)) for t in trials if t.recipe]
    tables = [(t, tab) for t, tab in tables if tab]
    if not tables:
        return None
    params = list(dict.fromkeys(p for _, tab in tables for p in tab))
    fig = make_subplots(rows=len(params), cols=1, subplot_titles=params,
                        vertical_spacing=min(0.12, 0.3 / len(params)))
    ranges = {}
    for p in params:
        vals = [v for _, tab in tables for row in tab.get(p, {}).values() for v in row.values()]
        ranges[p] = (min(vals), max(vals)) if vals else (0.0, 1.0)
    visible: list[int] = []  # the trial index of each trace
    for k, (t, tab) in enumerate(tables):
        for i, p in enumerate(params):
            rows = tab.get(p, {})
            cells = sorted({c for row in rows.values() for c in row})
            modules = any(mod for _, mod in cells)
            names = list(rows)
            lo, hi = ranges[p]
            fig.add_trace(go.Heatmap(
                z=[[rows[r].get(c) for c in cells] for r in names],
                x=[_column_label(layer, mod, modules) for layer, mod in cells], y=names,
                zmin=lo, zmax=hi if hi > lo else lo + 1e-9, colorscale="Viridis",
                name=f"trial {t.number}: {p}", visible=k == 0,
                colorbar={"len": 1 / len(params), "y": 1 - (i + 0.5) / len(params),
                          "title": {"text": p}},
                hovertemplate=f"trial {t.number}<br>{p}[%{{y}}] at %{{x}}: %{{z:.4g}}"
                              "<extra></extra>"), row=i + 1, col=1)
            visible.append(k)
    title = "Per-layer values: trial {}"
    if len(tables) > 1:
        fig.update_layout(updatemenus=[{
            "type": "dropdown", "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "top",
            "buttons": [{"label": f"trial {t.number}", "method": "update",
                         "args": [{"visible": [v == k for v in visible]},
                                  {"title.text": title.format(t.number)}]}
                        for k, (t, _) in enumerate(tables)]}])
    fig.update_layout(template=TEMPLATE, title=title.format(tables[0][0].number),
                      height=max(320, 230 * len(params)))
    fig.update_yaxes(autorange="reversed")  # the recipe's source order, top to bottom
    return fig


# -- data-flow paths ---------------------------------------------------------------------


def layer_path_figure(recipe: Mapping[str, Any] | Any, *, per_row: int = 8,
                      title: str | None = None) -> go.Figure | None:
    """A data-flow recipe's ``layer_path`` as a diagram: the input, each hop as a box
    (model, layer) coloured by model, then the output; the arrow into a hop carries that
    hop's input scale.  Rows of ``per_row`` hops, read as a snake.  None for a recipe
    without a layer path."""
    data = _recipe_dict(recipe)
    path = [h for h in data.get("layer_path") or [] if isinstance(h, Mapping)]
    if not path:
        return None
    labels = _labels(list(dict.fromkeys(str(h.get("model", "?")) for h in path)))
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(labels)}
    nodes = ["input", *path, "output"]

    def where(i: int) -> tuple[float, float]:
        row, col = divmod(i, per_row)
        return (col if row % 2 == 0 else per_row - 1 - col), -row

    fig = go.Figure()
    xs = [where(i) for i in range(len(nodes))]
    for model, label in labels.items():
        idx = [i for i, h in enumerate(nodes) if isinstance(h, Mapping) and h.get("model") == model]
        fig.add_trace(go.Scatter(
            x=[xs[i][0] for i in idx], y=[xs[i][1] for i in idx], mode="markers+text",
            name=label, text=[f"L{nodes[i].get('layer')}" for i in idx],
            textfont={"color": "white", "size": 13},
            marker={"symbol": "square", "size": 46, "color": colours[model]},
            customdata=[i for i in idx],
            hovertemplate=f"hop %{{customdata}}: {label} layer %{{text}}<extra></extra>"))
    ends = [0, len(nodes) - 1]
    fig.add_trace(go.Scatter(x=[xs[i][0] for i in ends], y=[xs[i][1] for i in ends],
                             mode="markers+text", text=["in", "out"], showlegend=False,
                             name="ends", hoverinfo="skip",
                             marker={"symbol": "circle", "size": 34, "color": "#bbbbbb"}))
    for i in range(1, len(nodes)):
        (x0, y0), (x1, y1) = xs[i - 1], xs[i]
        fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y",
                           showarrow=True, arrowhead=2, arrowsize=1.2, arrowwidth=1.5,
                           arrowcolor="#555555", standoff=24, startstandoff=24, text="")
        if i < len(nodes) - 1:
            scale = float(nodes[i].get("scale", 1.0))
            fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2, yshift=12 if y0 == y1 else 0,
                               xshift=0 if y0 == y1 else 22, text=f"×{scale:.3g}",
                               showarrow=False, font={"size": 11, "color": "#333333"})
    rows = (len(nodes) - 1) // per_row + 1
    fig.update_layout(
        template=TEMPLATE, height=140 + 110 * rows, legend={"orientation": "h"},
        title=title or f"Layer path: {len(path)} hops (× the scale of each hop's input)",
        xaxis={"visible": False, "range": [-0.7, per_row - 0.3]},
        yaxis={"visible": False, "range": [-rows + 0.4, 0.6]})
    return fig
