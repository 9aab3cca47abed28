"""The strategy league table: every strategy against random search and CMA-ES, at equal
budgets, over several seeds, on several testbeds.

Each run is one search through the real controller (``mergesearch.controller.run``), one
study per run, written to one SQLite file per testbed under the work folder.  The figures
are read back from those studies with :func:`mergesearch.report.compare.load_curves`, so
they count budgets exactly as ``mergesearch compare`` does.

Testbeds (``--testbeds``; experiment files whose strategy, seed, name, output, storage and
budget are overridden per run):

* ``zoo``: ``experiments/zoo/cmaes.yaml``, the tiny LM zoo, 8 dimensions, mean char
  accuracy on 100 search items per skill; report items: ``evaluators/zoo_report``, 200
  other items per skill the search never sees.
* ``hard``: ``experiments/hard/cmaes.yaml``, the hard zoo (28 dimensions); report items:
  ``evaluators/hard/report``.
* ``digits``: ``experiments/digits/pretrained.yaml``, an MLP on sklearn's digits, searched
  on the training images, reported on the test images.
* ``digits-mo``: the same with two objectives, accuracy (maximise) and the L2 norm of
  merged - base (``delta_l2``, minimise); only multi-objective strategies run it.
* ``zoo-mo``: ``experiments/zoo/mm_mo.yaml``, the zoo with DARE-TIES weight and density
  per expert (8 dimensions), two objectives: mean char accuracy and ``delta_l1``
  (minimise); multi-objective strategies only, run at small budgets
  (``--testbeds zoo-mo --evaluations 30 --budgets 10,20``).

Figures, per testbed and strategy (mean ± std over seeds, std with n - 1):

* best after each budget: the best search-item value among the first b trials (for
  the multi-objective testbeds: of the first objective);
* report items: the final best trial (the one with the best search value of the first
  objective over the whole budget, the earliest on ties) re-scored on the report items by
  the controller's own worker;
* hypervolume after each budget (``digits-mo``, ``zoo-mo``), on search values, against one
  reference point derived from all runs of the testbed (printed once under its table);
* the uniform merge (the space's init point) scored on search and report items, as a
  reference row.

Win/loss rule (the "vs random" and "vs cmaes" columns, "search / report"): at the final
budget, a strategy gets W against a baseline when its mean minus the baseline's mean (in the
objective's better direction) exceeds the sum of the two seed standard deviations, L when
it is below minus that sum, and = otherwise (within the seed spread); ? when either side
has fewer than two seeds.  The search part compares the best search value (the
hypervolume on a multi-objective testbed), the report part the report-item score.

Strategies: every registered one (``mergesearch strategies``), with the options in
``PRESETS``, plus any per testbed in ``TESTBED_OPTIONS`` (a strategy without a preset runs
with its defaults, said in a note); one that cannot run a testbed (single-objective only
on ``digits-mo``, variable kinds it does not search) is skipped there with a printed note.
A new strategy's row is one line in ``PRESETS``.

Resumable: every finished run (and its report score) is appended to ``--out`` (JSON); a
second invocation with the same file skips the runs already there and only runs what is
missing, seeds outermost, so a sweep cut short still has every strategy at the same
seeds.  A run that was killed mid-way starts again from scratch (its study replaced), so
the recorded wall time is one whole run's.  Each record carries a digest of its testbed
(models by content, space, evaluator, search and report items): runs made on another
version of a testbed (a rebuilt zoo) are run again, never mixed with the current ones.

Output: progress on stderr; on stdout one markdown section per testbed, ready to paste
into benchmarks/RESULTS.md; ``--json PATH`` writes the whole table.

    python benchmarks/strategies.py [--strategies random,cmaes,tpe,nsga2]
        [--testbeds zoo,hard,digits,digits-mo] [--seeds 5] [--evaluations 100]
        [--budgets 25,50,100] [--out /tmp/strategies.json] [--work DIR]
        [--json PATH] [--threads N] [--quick]

``--quick`` (for CI): 2 seeds, 12 evaluations, budgets 6,12, its own ``--out``
(``/tmp/strategies-quick.json``) so it never mixes with the full results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# strategy -> its options in every run of the league; a new strategy is one line here
PRESETS: dict[str, dict[str, Any]] = {
    "random": {},
    "cmaes": {"popsize": 8, "sigma0": 0.2},
    "tpe": {"n_startup_trials": 10, "multivariate": True},
    "nsga2": {"population_size": 16},
    "sakana_ps": {},  # the paper's settings: sigma0 1/6, popsize 4 + floor(3 ln n)
    "pymoo": {"algorithm": "ga", "options": {"pop_size": 12}},
    # weights only in these spaces: its beta stage alone, from 1/N (the paper's start)
    "evo_merging": {"evaluations": 100},
    "merge_moea": {"initial": 10, "batch": 4},
    "map": {"front_points": 8},
    "bayesian_map": {"front_points": 8},
    "nested_map": {"front_points": 3},
    # stops itself at 100 evaluations counting each gradient probe as 3 (forward + backward)
    "frank_wolfe": {"variant": "soft", "granularity": "layer", "iterations": 100,
                    "step_size": 1.0, "scaling": 0.5, "soft_trials": 4, "evaluations": 100,
                    "probe_cost": 3.0,
                    # the league's rows were measured with the paper's oracle (no base vertex)
                    "base_vertex": False},
    "bmm": {"n_startup_trials": 10},
    "m2n2": {"granularity": "rows"},
    "mm_mo": {},  # the paper's settings: 10 random, then batches of 5
}

# MAP's design is (N+1)(N+2) points: one weight per expert, not per layer group
_PER_EXPERT = {"zoo": ("space=search_spaces/task_arithmetic.yaml",),
               "hard": ("space={method: task_arithmetic, fixed: {normalize: false}, parameters: "
                        "{weight: {per: source, granularity: global, bounds: [-0.5, 1.5], "
                        "init: 0.5}}}",)}

#: Registered strategies the league leaves out unless named in --strategies, and why.
NOT_BY_DEFAULT: dict[str, str] = {
    "asha": "its budget is evaluation cost, not trials: benchmarks/estimators.py --league "
            "runs it at equal cost",
}

#: Testbeds a strategy cannot run, and why (a skip note in the table).
CANNOT: dict[str, dict[str, str]] = {
    "frank_wolfe": {"digits": "its gradient probe needs token rows; the digits evaluator is "
                              "a python function without them"},
}

#: Extra overrides a strategy runs a testbed with, by strategy then testbed: for one that
#: searches its own kind of space (a categorical component space, its own hyperparameters)
#: on the testbed's models and evaluator.  Its row then compares best scores on the same
#: objective at the same evaluation budget, over a different space: the table says so.
OVERRIDES: dict[str, dict[str, tuple[str, ...]]] = {
    "merge_moea": {"zoo": ("space=search_spaces/components.yaml",),
                   "hard": ("space=search_spaces/components.yaml",)},
    "map": _PER_EXPERT, "bayesian_map": _PER_EXPERT,
    # data-free Grams: a calibrating worker would calibrate on the report items when the
    # league re-scores the best trial there
    "bmm": {"zoo": ("space=search_spaces/bmm_data_free.yaml",),
            "hard": ("space=search_spaces/bmm_weights_data_free.yaml",),
            "digits": ("space=search_spaces/bmm_layers_data_free.yaml",)},
}
#: Options a strategy runs one testbed with on top of its preset, by strategy then testbed;
#: they are part of its label, so of its row and of the runs a rerun skips.
TESTBED_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    # the hard zoo's per-source space has 7 dimensions, one over its default max_dims of 6
    "bayesian_map": {"hard": {"max_dims": 7}},
}
BASELINES = ("random", "cmaes")


def options_for(strategy: str, testbed: str) -> dict[str, Any]:
    """The options ``strategy`` runs ``testbed`` with: its preset and
    :data:`TESTBED_OPTIONS`."""
    return PRESETS.get(strategy, {}) | TESTBED_OPTIONS.get(strategy, {}).get(testbed, {})

FULL = {"seeds": 5, "evaluations": 100, "budgets": "25,50,100", "out": "/tmp/strategies.json"}
QUICK = {"seeds": 2, "evaluations": 12, "budgets": "6,12", "out": "/tmp/strategies-quick.json"}

RULE = ("W/L at the final budget: W when the strategy's mean minus the baseline's mean (in "
        "the better direction) exceeds the sum of their seed stds, L when it is below minus "
        "that sum, = otherwise (within the seed spread), ? with fewer than 2 seeds; "
        "search / report")

MO_OBJECTIVES = ("[{name: accuracy, metric: accuracy}, "
                 "{name: l2, source: weights, metric: delta_l2, direction: minimize}]")


@dataclass(frozen=True)
class Testbed:
    name: str
    file: str  # experiment file, relative to the repository root
    about: str  # one line for the table's heading
    search: tuple[str, ...] = ()  # overrides for the search (and the uniform merge)
    report: tuple[str, ...] = ()  # further overrides that score on the report items


TESTBEDS = {t.name: t for t in (
    Testbed("zoo", "experiments/zoo/cmaes.yaml",
            "tiny LM zoo, task arithmetic per expert per 2 layers (8 dims), mean char "
            "accuracy; search: 100 items per skill; report: 200 other items per skill",
            report=("evaluator.suite=evaluators/zoo_report", "evaluator.limit=null")),
    Testbed("hard", "experiments/hard/cmaes.yaml",
            "hard zoo, task arithmetic per source per layer (28 dims), mean char accuracy; "
            "search: evaluators/hard/search; report: evaluators/hard/report",
            report=("evaluator.suite=evaluators/hard/report",)),
    Testbed("digits", "experiments/digits/pretrained.yaml",
            "digits MLP, task arithmetic per expert per layer (4 dims), accuracy; search: "
            "training images; report: test images",
            report=("evaluator.split=test",)),
    Testbed("digits-mo", "experiments/digits/pretrained.yaml",
            "digits MLP as above, two objectives: accuracy (maximize) and delta_l2 "
            "(minimize); search: training images; report: test images",
            search=(f"evaluator.objectives={MO_OBJECTIVES}",),
            report=("evaluator.split=test",)),
    Testbed("zoo-mo", "experiments/zoo/mm_mo.yaml",
            "tiny LM zoo, DARE-TIES weight and density per expert (8 dims), two objectives: "
            "mean char accuracy (maximize) and delta_l1 = sum |merged - base| (minimize); "
            "search: 100 items per skill; report: 200 other items per skill",
            report=("evaluator.suite=evaluators/zoo_report", "evaluator.limit=null")),
)}


# -- one testbed: its problem, the uniform merge, and scorers -----------------------------


class Bench:
    """A testbed made concrete: its search problem, and workers that score a recipe on the
    search items or on the report items (the controller's own worker, built on first use)."""

    def __init__(self, bed: Testbed, work: Path):
        from mergesearch import controller
        from mergesearch.experiment import Experiment

        self.bed = bed
        self.work = work
        self.url = f"sqlite:///{(work / f'{bed.name}.db').as_posix()}"
        self._load = lambda extra: Experiment.load(ROOT / bed.file, [*bed.search, *extra])
        base = self._load([f"output={work / bed.name / 'scorer'}"])
        self.search = controller.BoundExperiment(base, progress=False)
        self.problem = self.search.problem
        self.objectives = list(self.problem.objectives)
        self.uniform = self.search.space.decode(self.search.space.x0)
        self._workers: dict[str, Any] = {}
        self._scored = 0
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """A digest of what the testbed's scores depend on (models by content, space,
        evaluator, search and report items), not of the file's own strategy: runs made on
        another version of the testbed are not mixed with these."""
        from mergesearch.fingerprint import tree_digest

        fp = {k: v for k, v in self.search.fingerprint().items()
              if k not in ("strategy", "seed", "libraries")}
        report = self._load(list(self.bed.report))
        if report.evaluator.backend == "hf":
            fp["report.suite"] = tree_digest(report.find(report.evaluator.suite))
        fp["report.evaluator"] = report.evaluator.model_dump(mode="json")
        return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]

    def extra(self, strategy: str) -> tuple[str, ...]:
        """The overrides ``strategy`` runs this testbed with (:data:`OVERRIDES`)."""
        return OVERRIDES.get(strategy, {}).get(self.bed.name, ())

    def experiment(self, strategy: str, options: dict[str, Any], seed: int, evaluations: int):
        name = study_name(self.bed, strategy, seed, evaluations)
        return self._load([*self.extra(strategy), f"name={name}",
                           f"output={self.work / self.bed.name / name}",
                           f"storage={self.url}", f"seed={seed}",
                           f"budget.evaluations={evaluations}", f"strategy.name={strategy}",
                           f"strategy.options={json.dumps(options)}"])

    def score(self, recipe, items: str) -> dict[str, float] | None:
        """A recipe's values on the ``search`` or the ``report`` items (None: it failed)."""
        from mergesearch import controller
        from mergesearch.recipe import Recipe
        from mergesearch.trial import Candidate

        if items not in self._workers:
            bound = self.search if items == "search" else controller.BoundExperiment(
                self._load([f"output={self.work / self.bed.name / 'scorer'}",
                            *self.bed.report]), progress=False)
            self._workers[items] = bound.make_executor().worker
        if isinstance(recipe, dict):
            recipe = Recipe.from_dict(recipe)
        self._scored += 1
        result = self._workers[items].evaluate(Candidate(id=self._scored, genome=[],
                                                         recipe=recipe))
        if not result.ok:
            print(f"  {self.bed.name}: scoring on the {items} items failed: {result.reason}",
                  file=sys.stderr)
            return None
        return dict(result.values)

    def cannot_run(self, strategy: str, options: dict[str, Any]) -> str | None:
        """Why ``strategy`` cannot run this testbed, or None."""
        from mergesearch.strategies import StrategyError, get_strategy

        try:
            cls = get_strategy(strategy)
            cls.parse_options(options)
        except StrategyError as err:
            return str(err)
        if self.bed.name in CANNOT.get(strategy, {}):
            return CANNOT[strategy][self.bed.name]
        problem = self.problem
        if self.extra(strategy):  # its own space: bound with the strategy itself
            from mergesearch import controller
            from mergesearch.errors import MergesearchError

            try:
                problem = controller.BoundExperiment(self._load(
                    [*self.extra(strategy), f"output={self.work / self.bed.name / 'scorer'}",
                     f"strategy.name={strategy}", f"strategy.options={json.dumps(options)}"]),
                    progress=False).problem
            except MergesearchError as err:
                return str(err)
        kinds = {d.kind for d in problem.dims} - set(cls.kinds)
        if kinds:
            return (f"searches {', '.join(sorted(cls.kinds))} variables only; this space has "
                    f"{', '.join(sorted(kinds))}")
        try:  # the instance says (pymoo's is single-objective when its algorithm is)
            instance = cls(problem, options)
        except StrategyError as err:
            return str(err)
        if problem.multi_objective and not instance.multi_objective:
            return (f"single-objective only; this testbed has {len(self.objectives)} "
                    "objectives")
        return None


def study_name(bed: Testbed, strategy: str, seed: int, evaluations: int) -> str:
    return f"{bed.name}-{strategy.replace(':', '.')}-e{evaluations}-s{seed}"


def best_trial(records, objective) -> Any | None:
    """The full-fidelity ok trial with the best value of ``objective`` (the earliest on
    ties), or None."""
    best = None
    for r in sorted(records, key=lambda r: r.number):
        v = r.values.get(objective.name) if r.state == "ok" and r.fidelity >= 1 else None
        if v is None or not math.isfinite(v):
            continue
        if best is None or objective.sign * v < objective.sign * best.values[objective.name]:
            best = r
    return best


def one_run(bench: Bench, strategy: str, options: dict[str, Any], seed: int,
            evaluations: int) -> dict[str, Any]:
    """Run one search (replacing a study a killed run left), then re-score its best trial
    on the report items."""
    from mergesearch import controller
    from mergesearch.report.compare import strategy_label
    from mergesearch.storage import TrialStore

    exp = bench.experiment(strategy, options, seed, evaluations)
    start = time.perf_counter()
    summary = controller.run(exp, overwrite=True, progress=False)
    wall = time.perf_counter() - start
    first = bench.objectives[0]
    best = best_trial(TrialStore.open(exp.storage_url, exp.name).trials(), first)
    report = bench.score(best.recipe, "report") if best is not None else None
    return {"testbed": bench.bed.name, "fingerprint": bench.fingerprint,
            "strategy": strategy, "options": options,
            "label": strategy_label(strategy, options), "seed": seed,
            "evaluations": evaluations, "study": exp.name, "url": exp.storage_url,
            "wall": wall, "trials": summary.finished, "failed": summary.failed,
            "cached": summary.cached, "stopped": summary.stopped,
            "best_trial": None if best is None else best.number,
            "best_values": None if best is None else best.values,
            "best_recipe": None if best is None else best.recipe, "report": report}


# -- the JSON of finished runs ------------------------------------------------------------


def load_done(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"runs": [], "uniform": {}}
    data = json.loads(path.read_text())
    return {"runs": data.get("runs", []), "uniform": data.get("uniform", {})}


def save_done(path: Path, done: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(done, indent=1))
    tmp.replace(path)


def run_key(r: dict[str, Any]) -> tuple:
    return (r["testbed"], r["label"], r["seed"], r["evaluations"])


def study_exists(r: dict[str, Any]) -> bool:
    from mergesearch.storage import TrialStore

    try:
        return TrialStore.exists(r["url"], r["study"])
    except Exception:  # a work folder deleted or moved: run it again
        return False


# -- the table ----------------------------------------------------------------------------


def verdict(a, b, better: float) -> str:
    """W, L or = for the Stat ``a`` against the Stat ``b`` (see the rule); ``better`` is +1
    when larger is better, -1 when smaller is."""
    if a is None or b is None or a.n < 2 or b.n < 2 or a.mean is None or b.mean is None:
        return "?"
    gain, spread = better * (a.mean - b.mean), a.std + b.std
    return "W" if gain > spread else "L" if gain < -spread else "="


def testbed_table(bench: Bench, runs: list[dict[str, Any]], uniform: dict[str, Any],
                  strategies: list[str], budgets: list[int], evaluations: int,
                  skipped: dict[str, str]) -> dict[str, Any]:
    """One testbed's league table as plain JSON (the rows, the uniform merge, the
    comparison it came from)."""
    from mergesearch.report.compare import Stat, hypervolume, load_curves, strategy_label

    mo = bench.problem.multi_objective
    first = bench.objectives[0]
    better = -first.sign  # +1: larger is better
    final = budgets[-1]
    labels = {s: strategy_label(s, options_for(s, bench.bed.name)) for s in strategies}
    ordered = sorted(runs, key=lambda r: (strategies.index(r["strategy"]), r["seed"]))
    table: dict[str, Any] = {
        "testbed": bench.bed.name, "file": bench.bed.file, "about": bench.bed.about,
        "objectives": [{"name": o.name, "direction": o.direction} for o in bench.objectives],
        "multi_objective": mo, "budgets": budgets, "evaluations": evaluations,
        "skipped": skipped, "rows": [], "ref_point": None, "comparison": None,
        "uniform": None}
    if ordered:
        c = load_curves([f"{r['url']}#{r['study']}" for r in ordered], budgets=budgets)
        table["ref_point"] = c.ref_point if mo else None
        table["comparison"] = c.to_json()
        curves = {cv.name: cv for cv in c.curves}
        by_label = {g.strategy: g for g in c.groups.values()}
        for s in strategies:
            g = by_label.get(labels[s])
            if g is None:
                continue
            mine = [r for r in ordered if r["label"] == labels[s]]
            reports = [None if r["report"] is None else r["report"][first.name] for r in mine]
            table["rows"].append({
                "strategy": s, "label": labels[s], "options": options_for(s, bench.bed.name),
                "overrides": list(bench.extra(s)), "seeds": g.seeds,
                "best": {b: g.best[b][first.name] for b in budgets},
                "hypervolume": {b: g.hypervolume[b] for b in budgets} if mo else None,
                "short": g.short, "report": Stat.of(reports),
                "wall": Stat.of([r["wall"] for r in mine]),
                "studies": [{
                    "study": r["study"], "url": r["url"], "seed": r["seed"],
                    "wall": r["wall"], "trials": r["trials"], "failed": r["failed"],
                    "cached": r["cached"], "stopped": r["stopped"],
                    "best_trial": r["best_trial"],
                    "best": {b: curves[r["study"]].best[b][first.name] for b in budgets},
                    "hypervolume": ({b: curves[r["study"]].hypervolume[b] for b in budgets}
                                    if mo else None),
                    "report": rep} for r, rep in zip(mine, reports, strict=True)]})
        rows = {row["strategy"]: row for row in table["rows"]}
        for row in table["rows"]:
            row["vs"] = {}
            for base in BASELINES:
                if base not in rows or base == row["strategy"]:
                    continue
                other = rows[base]
                search = (verdict(row["hypervolume"][final], other["hypervolume"][final], 1.0)
                          if mo else verdict(row["best"][final], other["best"][final], better))
                row["vs"][base] = {"search": search,
                                   "report": verdict(row["report"], other["report"], better)}
    if uniform:
        u = {"search": uniform["search"], "report": uniform["report"]}
        if mo and table["ref_point"] is not None and uniform["search"] is not None:
            u["hypervolume"] = hypervolume([uniform["search"]], bench.objectives,
                                           table["ref_point"])
        table["uniform"] = u
    return table


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _pm(s) -> str:
    if s is None or s.mean is None:
        return "-"
    return _num(s.mean) if s.std is None else f"{s.mean:.4f} ± {s.std:.4f}"


def markdown(table: dict[str, Any]) -> str:
    mo, budgets, final = table["multi_objective"], table["budgets"], table["budgets"][-1]
    first = table["objectives"][0]["name"]
    out = [f"### {table['testbed']} (`{table['file']}`)", "", table["about"] + ".", ""]
    head = ["strategy", "seeds", *(f"best {first} after {b}" for b in budgets),
            f"report {first}" + (" (most accurate trial)" if mo else "")]
    if mo:
        head += [f"HV after {b}" for b in budgets]
    head += [f"vs {b} ({'HV' if mo else 'search'} / report)" for b in BASELINES]
    head += ["s/run"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    short = False
    for row in table["rows"]:
        cells = [row["strategy"], str(len(row["seeds"]))]
        for b in budgets:
            mark = "*" if row["short"][b] else ""
            short = short or bool(mark)
            cells.append(_pm(row["best"][b]) + mark)
        cells.append(_pm(row["report"]))
        if mo:
            cells += [_pm(row["hypervolume"][b]) for b in budgets]
        for base in BASELINES:
            v = row["vs"].get(base)
            cells.append("-" if v is None else f"{v['search']} / {v['report']}")
        cells.append(f"{row['wall'].mean:.1f}")
        out.append("| " + " | ".join(cells) + " |")
    u = table["uniform"]
    if u is not None:
        cells = ["uniform merge (init point)", "-",
                 _num(None if u["search"] is None else u["search"][first])]
        cells += [""] * (len(budgets) - 1)
        cells.append(_num(None if u["report"] is None else u["report"][first]))
        if mo:
            cells += [_num(u.get("hypervolume"))] + [""] * (len(budgets) - 1)
        cells += [""] * (len(BASELINES) + 1)
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    notes = [f"mean ± std over seeds (n - 1); {RULE}; report: the final best trial (best "
             f"search {first} over {final} evaluations) re-scored on the report items; "
             "s/run: mean wall time of one controller run (model loading included)"]
    if mo and table["ref_point"] is not None:
        ref = ", ".join(f"{k}={v:.6g}" for k, v in table["ref_point"].items())
        notes.append(f"hypervolume reference point (all runs of this testbed, worst value "
                     f"pushed out by 10% of the range): {ref}")
    if short:
        notes.append("*: some run stopped before this budget (the value at its last trial)")
    options = ", ".join(f"{row['strategy']} {json.dumps(row['options'])}"
                        for row in table["rows"])
    if options:
        notes.append(f"options: {options}")
    for row in table["rows"]:
        if row.get("overrides"):
            notes.append(f"{row['strategy']} searches its own space here: "
                         f"{' '.join(row['overrides'])}")
    for s, why in table["skipped"].items():
        notes.append(f"skipped {s}: {why}")
    out += [f"- {n}" for n in notes]
    return "\n".join(out)


def to_json(table: dict[str, Any]) -> dict[str, Any]:
    """The table with its Stat values as {mean, std, n} and budgets as strings."""
    def stat(s):
        return s.to_json()

    def per_budget(d, f=lambda v: v):
        return None if d is None else {str(b): f(v) for b, v in d.items()}

    rows = []
    for row in table["rows"]:
        rows.append(row | {
            "best": per_budget(row["best"], stat),
            "hypervolume": per_budget(row["hypervolume"], stat),
            "short": per_budget(row["short"]),
            "report": stat(row["report"]), "wall": stat(row["wall"]),
            "studies": [st | {"best": per_budget(st["best"]),
                              "hypervolume": per_budget(st["hypervolume"])}
                        for st in row["studies"]]})
    return table | {"rows": rows}


# -- the sweep ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=None,
                        help="comma-separated (default: every registered strategy)")
    parser.add_argument("--testbeds", default=",".join(TESTBEDS))
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--evaluations", type=int, default=None, help="budget (default 100)")
    parser.add_argument("--budgets", default=None, help="reported budgets (default 25,50,100)")
    parser.add_argument("--out", default=None, help="JSON of finished runs (default "
                        f"{FULL['out']}; with --quick {QUICK['out']})")
    parser.add_argument("--work", default=None,
                        help="folder of the studies (default: next to --out, *.studies)")
    parser.add_argument("--json", default=None, help="write the whole table as JSON here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); scores do not depend on it")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 12 evaluations, "
                        "budgets 6,12, its own --out (for CI)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mergesearch.errors import MergesearchError
    from mergesearch.report.compare import parse_budgets, strategy_label
    from mergesearch.strategies import strategies as registered

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    known = list(registered())
    strategies = args.strategies.split(",") if args.strategies else \
        [*[s for s in PRESETS if s in known],
         *[s for s in known if s not in PRESETS and s not in NOT_BY_DEFAULT]]
    if not args.strategies:
        for s, why in NOT_BY_DEFAULT.items():
            print(f"note: leaving out {s} ({why}); name it in --strategies to run it",
                  file=sys.stderr)
    testbeds = args.testbeds.split(",")
    bad = [t for t in testbeds if t not in TESTBEDS]
    if bad:
        print(f"unknown testbed(s) {', '.join(bad)}; known: {', '.join(TESTBEDS)}",
              file=sys.stderr)
        return 2
    if args.seeds < 1 or args.evaluations < 1:
        print("--seeds and --evaluations must be >= 1", file=sys.stderr)
        return 2
    try:
        asked = parse_budgets(args.budgets)
    except MergesearchError as err:
        print(err, file=sys.stderr)
        return 2
    budgets = sorted({b for b in asked if b < args.evaluations} | {args.evaluations})
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.stem + ".studies")
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in strategies if s not in known and ":" not in s]
    if unknown:
        print(f"unknown strategy(ies) {', '.join(unknown)}; registered: {', '.join(known)}",
              file=sys.stderr)
        return 2
    for s in strategies:
        if s not in PRESETS:
            print(f"note: {s} has no preset in PRESETS; it runs with its default options",
                  file=sys.stderr)

    benches: dict[str, Bench] = {}
    broken: dict[str, str] = {}
    skipped: dict[str, dict[str, str]] = {t: {} for t in testbeds}
    if not args.strategies:  # left out, and said so in every table: never silently absent
        for t in testbeds:
            skipped[t].update({s: f"left out by default: {why}" for s, why in NOT_BY_DEFAULT.items()
                               if s in known})

    def bench(t: str) -> Bench | None:
        if t not in benches and t not in broken:
            try:
                benches[t] = Bench(TESTBEDS[t], work)
            except MergesearchError as err:
                broken[t] = str(err)
                print(f"testbed {t} cannot run: {err}", file=sys.stderr)
                return None
            for s in strategies:
                why = benches[t].cannot_run(s, options_for(s, t))
                if why:
                    skipped[t][s] = why
                    print(f"note: {t}: skipping {s}: {why}", file=sys.stderr)
        return benches.get(t)

    for t in testbeds:
        bench(t)
    done = load_done(out)
    # runs of another version of a testbed, or whose study is gone, run again
    stale = [r for r in done["runs"] if r["testbed"] in benches
             and r.get("fingerprint") != benches[r["testbed"]].fingerprint]
    for t in sorted({r["testbed"] for r in stale}):
        print(f"note: {sum(r['testbed'] == t for r in stale)} runs of {t} in {out} were made "
              "on another version of the testbed: they run again", file=sys.stderr)
    done["runs"] = [r for r in done["runs"] if r not in stale and study_exists(r)]
    done["uniform"] = {t: u for t, u in done["uniform"].items()
                       if t not in benches or u.get("fingerprint") == benches[t].fingerprint}
    finished = {run_key(r) for r in done["runs"]}
    todo = [(seed, t, s) for seed in range(args.seeds) for t in testbeds for s in strategies
            if (t, strategy_label(s, options_for(s, t)), seed, args.evaluations)
            not in finished]
    started = time.perf_counter()
    ran = 0
    # seeds outermost: a sweep cut short has every strategy at the same seeds
    for seed, t, s in todo:
        b = bench(t)
        if b is None or s in skipped[t]:
            continue
        options = options_for(s, t)
        record = one_run(b, s, options, seed, args.evaluations)
        done["runs"] = [r for r in done["runs"] if r["study"] != record["study"]
                        or r["url"] != record["url"]] + [record]
        save_done(out, done)
        ran += 1
        best = record["best_values"] or {}
        first = b.objectives[0].name
        rep = (record["report"] or {}).get(first)
        print(f"{t} {s} seed {seed}: best {_num(best.get(first))} (trial "
              f"{record['best_trial']}), report {_num(rep)}; {record['wall']:.1f} s, "
              f"{record['trials']} trials; {time.perf_counter() - started:.0f} s so far",
              flush=True, file=sys.stderr)

    tables = []
    for t in testbeds:
        b = bench(t)
        if b is None:
            tables.append({"testbed": t, "error": broken[t]})
            continue
        if t not in done["uniform"]:
            done["uniform"][t] = {"fingerprint": b.fingerprint,
                                  "search": b.score(b.uniform, "search"),
                                  "report": b.score(b.uniform, "report")}
            save_done(out, done)
        labels = {strategy_label(s, options_for(s, t)) for s in strategies}
        runs = [r for r in done["runs"] if r["testbed"] == t and r["label"] in labels
                and r["strategy"] in strategies and r["seed"] < args.seeds
                and r["evaluations"] == args.evaluations]
        tables.append(testbed_table(b, runs, done["uniform"][t], strategies, budgets,
                                    args.evaluations, skipped[t]))

    runs = [r for r in done["runs"] if r["testbed"] in testbeds]
    total = sum(r["wall"] for r in runs)
    print(f"## Strategy league ({args.seeds} seeds, {args.evaluations} evaluations per run)\n")
    print(f"{ran} runs now, {len(runs)} in {out}; controller wall time of all runs "
          f"{total:.0f} s; this invocation {time.perf_counter() - started:.0f} s\n")
    for table in tables:
        if "error" in table:
            print(f"### {table['testbed']}\n\ncannot run: {table['error']}\n")
        else:
            print(markdown(table) + "\n")
    if args.json:
        data = {"quick": args.quick, "seeds": list(range(args.seeds)),
                "evaluations": args.evaluations, "budgets": budgets, "rule": RULE,
                "strategies": {s: PRESETS.get(s, {}) for s in strategies}, "out": str(out),
                "work": str(work),
                "testbeds": {t["testbed"]: t if "error" in t else to_json(t) for t in tables}}
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
