"""``mergesearch`` command line: parse, call the library, print.

Every command is also a Python call; errors a user can cause print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence

from mergesearch.errors import MergesearchError

EXIT_USAGE = 2
EXIT_FAILED = 1  # the command ran but produced nothing usable (every trial failed)


class UsageError(MergesearchError, ValueError):
    """A command-line mistake (bad option value, unknown trial)."""


def _cmd_merge(args: argparse.Namespace) -> int:
    from mergesearch.export import save_merged
    from mergesearch.mergekit_config import load_config

    recipe = load_config(args.config)
    out = save_merged(
        recipe, args.out_dir, device=args.device, overwrite=args.overwrite,
        allow_pickle=args.allow_pickle, progress=sys.stderr.isatty(),
    )
    print(f"merged {recipe.method} of {len(recipe.model_names)} model(s) -> {out}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from mergesearch.mergekit_config import load_config, to_mergekit_yaml

    recipe = load_config(args.config)
    text = to_mergekit_yaml(recipe) if args.to == "mergekit" else recipe.to_yaml()
    if args.output is not None:
        from mergesearch.atomic import atomic_write_text

        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from mergesearch.merging import methods

    for name, method in methods().items():
        params = ", ".join(
            p.name + ("*" if p.per_model else "") + ("" if p.default is not None else "!")
            for p in method.params
        )
        print(f"{name:18} {method.doc}")
        if params:
            print(f"{'':18} parameters: {params}")
    print("\n* per model (may also be set once in 'parameters' for all)   ! required")
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    if args.hard:
        from mergesearch.zoo.hard import build_hard_zoo as build
    else:
        from mergesearch.zoo import build_zoo as build

    zoo = build(args.out, seed=args.seed, force=args.force)
    prefix = "zoo:hard/" if args.hard else "zoo:"
    print(f"{'hard zoo' if args.hard else 'zoo'} ready at {zoo.root}")
    for name, path in {"base": zoo.base, **zoo.experts}.items():
        print(f"  {prefix + name:16} {path}")
    return 0


def _experiment(args: argparse.Namespace):
    from mergesearch.experiment import Experiment, check_name

    if args.study is not None:  # it names folders too (Ray Tune's trials, under the run's)
        try:
            check_name(args.study)
        except ValueError as err:
            raise UsageError(f"--study {err}") from None
    return Experiment.load(args.experiment, args.set or ())


def _store(args: argparse.Namespace):
    from mergesearch.storage import TrialStore

    exp = _experiment(args)
    study = args.study or exp.name
    if exp.stages:  # a staged experiment: one study per stage, the last by default
        from mergesearch.controller import stage_study

        names = [st.name for st in exp.stages]
        if args.stage is not None and args.stage not in names:
            raise UsageError(f"--stage {args.stage!r}: the stages are {', '.join(names)}")
        if args.stage is None:
            ran = [n for n in names if TrialStore.exists(exp.storage_url,
                                                         stage_study(exp, n, args.study))]
            args.stage = ran[-1] if ran else names[0]
        study = stage_study(exp, args.stage, args.study)
    elif getattr(args, "stage", None) is not None:
        raise UsageError("--stage: this experiment has no stages")
    return exp, TrialStore.open(exp.storage_url, study)


def _cmd_run(args: argparse.Namespace) -> int:
    same = _same_study_args(args)  # for the commands it suggests at the end
    if args.ray_address:
        args.set = [*(args.set or ()), "execution.backend=ray",
                    f"execution.address={args.ray_address}"]
    exp = _experiment(args)
    with _study_log(exp.run_dir / f"{args.study or exp.name}.log") as log:
        logging.getLogger("mergesearch.run").info(
            "mergesearch run %s%s: study %r in %s", args.experiment, same,
            args.study or exp.name, exp.storage_url)
        return _run(args, exp, same, log.start)


class _StudyLog(logging.Handler):
    """A run's log beside its study: appended to, one line per event.  Events wait in
    memory until the search has a result (or ends, or is interrupted): a run refused
    before it starts leaves no file."""

    def __init__(self, path) -> None:
        super().__init__(logging.INFO)
        self.path = path
        self.file = None
        self.waiting: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def start(self, *_) -> None:
        """Open the file (and the run folder) and write the events so far."""
        if self.file is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")  # closed in close()
            self._write(self.waiting)
        except OSError as err:
            self._failed(err)
        self.waiting = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record).replace("\n", " | ")
        if self.file is None:
            self.waiting.append(line)
        else:
            self._write([line])

    def _write(self, lines: list[str]) -> None:
        if self.file is None or not lines:
            return
        try:
            self.file.write("".join(line + "\n" for line in lines))
            self.file.flush()
        except OSError as err:
            self._failed(err)

    def _failed(self, err: OSError) -> None:  # a full disk: say it once, the run goes on
        if self.file is not None:
            self.file.close()
        self.file = False  # never again
        print(f"warning: cannot write the log {self.path} ({err.strerror or err}); "
              "the run goes on", file=sys.stderr)

    def close(self) -> None:
        if self.file:
            self.file.close()
        super().close()


@contextlib.contextmanager
def _study_log(path):
    """While a run runs: INFO and above of the ``mergesearch`` logger also to ``path``
    (the terminal still shows WARNING and above, INFO with -v)."""
    handler = _StudyLog(path)
    pkg = logging.getLogger("mergesearch")
    level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield handler
    except KeyboardInterrupt:
        handler.start()
        pkg.warning("interrupted; finished trials are saved")
        raise
    except Exception as err:
        if handler.file is not None or not isinstance(err, MergesearchError):
            handler.start()  # the search had started (or crashed): keep why it ended
            pkg.error("the run stopped: %s: %s", type(err).__name__, err)
        raise
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(level)
        handler.close()


def _run(args: argparse.Namespace, exp, same: str, started) -> int:
    from mergesearch.atomic import atomic_dir
    from mergesearch.controller import run
    from mergesearch.report import format_front, write_trial

    if exp.stages:
        from mergesearch.controller import run_stages

        summaries = run_stages(exp, study=args.study, resume=True if args.resume else None,
                               overwrite=args.overwrite, progress=not args.quiet,
                               on_result=started)
        for st in summaries[:-1]:
            print(f"\n{st.study}: {st.finished} trials ({st.ok} ok); {st.evaluated_now} "
                  f"evaluated in this run; stopped: {st.stopped}")
        summary = summaries[-1]
    else:
        summary = run(exp, study=args.study, resume=True if args.resume else None,
                      overwrite=args.overwrite, progress=not args.quiet,
                      new_epoch=args.new_epoch, on_result=started)
    line = (f"{summary.study}: {summary.finished} trials ({summary.ok} ok, {summary.failed} "
            f"failed, {summary.cached} from cache); {summary.evaluated_now} evaluated in this "
            f"run in {summary.elapsed:.0f} s; stopped: {summary.stopped}")
    started()
    logging.getLogger("mergesearch.run").info(line)
    print(f"\n{line}")
    if not summary.front and summary.failed:
        print(f"error: every trial failed ({summary.failed}); the last: {_last_failure(summary)}"
              " (see `mergesearch status`; fix the cause and run again)", file=sys.stderr)
        return EXIT_FAILED
    kind = "Pareto front" if len(summary.objectives) > 1 else "best trial"
    print(f"\n{kind} ({len(summary.front)} point(s)):")
    print(format_front(summary.front, summary.objectives, limit=10, params=3,
                       tracked=_tracked_names(exp, summary.front)))
    if len(summary.front) > 10:
        print(f"(all of it: mergesearch pareto {args.experiment}{same})")
    front_dir = front_path(summary.run_dir, args.study, exp.name)
    with atomic_dir(front_dir, overwrite=True) as tmp:  # this run's front replaces the last
        for trial in summary.front:
            (tmp / f"trial-{trial.number}").mkdir()
            write_trial(trial, tmp / f"trial-{trial.number}")
    if summary.report:
        print(f"\n{_report_line(summary.report)}")
    print(f"\nrecipes of the front: {front_dir}/trial-N/ (recipe.json, mergekit.yml)")
    print(f"study: {summary.storage} (study {summary.study!r})")
    print(f"merged checkpoint: mergesearch export {args.experiment}{same} --out DIR "
          "--checkpoint [--trial N]")
    return 0


def front_path(run_dir, study: str | None, name: str):
    """Where `run` writes a study's front: ``<run>/front`` for the experiment's own study,
    ``<run>/<study>/front`` for one named with --study (so studies of one experiment keep
    their fronts apart)."""
    return run_dir / "front" if study in (None, name) else run_dir / study / "front"


def _same_study_args(args: argparse.Namespace) -> str:
    """The options that point another command at the study this one used (its --study and
    --set overrides, shell-quoted), each with a leading space; empty if none."""
    import shlex

    parts = [] if args.study is None else ["--study", args.study]
    for item in args.set or ():
        parts += ["--set", item]
    return "".join(" " + shlex.quote(p) for p in parts)


def _last_failure(summary) -> str:
    """The reason the last failed trial of a run's study gives."""
    from mergesearch.storage import TrialStore

    failed = [t for t in TrialStore.open(summary.storage, summary.study).trials()
              if t.state == "failed"]
    reason = max(failed, key=lambda t: t.number).reason if failed else None
    return (reason or "no reason recorded").splitlines()[0]


def _cmd_sweep(args: argparse.Namespace) -> int:
    from mergesearch.report import best_values
    from mergesearch.sweep import plan_sweep, run_sweep

    planned, pool = plan_sweep(args.files, overrides=args.set or ())
    address = args.ray_address or pool.address
    workers = args.workers or pool.workers
    print(f"sweep: {len(planned)} search(es) on Ray ({address}), {workers} worker(s) shared")
    failures = 0
    for p, outcome in run_sweep(planned, address=address, workers=workers,
                                resume=True if args.resume else None):
        if isinstance(outcome, Exception):
            failures += 1
            print(f"  {p.label:32} error: {outcome}")
            continue
        best = best_values(outcome.front, outcome.objectives)
        values = " ".join(f"{k}={v:.4f}" for k, v in best.items())
        print(f"  {p.label:32} {outcome.ok} ok / {outcome.failed} failed  best {values}  "
              f"[{outcome.storage} : {outcome.study}]")
    return 1 if failures else 0


def _cmd_status(args: argparse.Namespace) -> int:
    from mergesearch.report import best_values, choose
    from mergesearch.report.pareto import format_tracked
    from mergesearch.storage.trials import REPORT

    exp, store = _store(args)
    trials = store.trials()
    count = {s: sum(t.state == s for t in trials) for s in ("ok", "failed")}
    count["running"] = len(store.in_flight(trials))  # as of the last checkpoint
    budget = (_ran_with(store).get("budget") or {}).get("evaluations", exp.budget.evaluations)
    best = best_values(trials, store.objectives)
    failed = [t for t in trials if t.state == "failed"]
    tracked = store.tracked_names(trials)
    front = store.pareto_front() if tracked else []
    # the tracked values of the trial export chooses: the best, or the front's best by weights
    chosen = choose(front, store.objectives) if front else None
    if args.format == "json":
        import json

        print(json.dumps({
            "study": store.study.study_name, "storage": exp.storage_url, "trials": count,
            "budget": {"evaluations": budget},
            "best": {o.name: best[o.name] for o in store.objectives if o.name in best},
            **({"tracked": {"names": tracked, "trial": chosen and chosen.number,
                            "values": chosen.tracked if chosen else {}}} if tracked else {}),
            "failed": [{"trial": t.number, "reason": t.reason} for t in failed],
            "report": store.study.user_attrs.get(REPORT),
        }, indent=2))
        return 0
    if args.format == "csv":
        import csv

        names = [o.name for o in store.objectives]
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["study", "storage", "ok", "failed", "running", "budget",
                         *(f"best_{n}" for n in names),
                         *(["tracked_trial"] if tracked else []),
                         *(f"tracked_{n}" for n in tracked)])
        writer.writerow([store.study.study_name, exp.storage_url, count["ok"], count["failed"],
                         count["running"], "" if budget is None else budget,
                         *(best.get(n, "") for n in names),
                         *([chosen.number if chosen else ""] if tracked else []),
                         *((chosen.tracked.get(n, "") if chosen else "") for n in tracked)])
        return 0
    print(f"study {store.study.study_name!r} in {exp.storage_url}")
    print(f"  trials: {count['ok']} ok, {count['failed']} failed, {count['running']} in flight"
          + (f" (budget {budget})" if budget else ""))
    for o in store.objectives:
        if o.name in best:
            print(f"  best {o.name} ({o.direction}): {best[o.name]:.4f}")
    if chosen is not None:
        which = "the best trial" if len(store.objectives) == 1 else \
            "the front point export chooses"
        values = ", ".join(f"{k} {v:.4f}" for k, v in chosen.values.items())
        print(f"  tracked at trial {chosen.number} ({which}; {values}): "
              f"{format_tracked(chosen, tracked)}")
    for t in failed[-3:]:
        print(f"  trial {t.number} failed: {t.reason}")
    report = store.study.user_attrs.get(REPORT)
    if report:
        print(f"  {_report_line(report)}")
    return 0


def _report_line(report: dict) -> str:
    """``trial N on the report items: mean 0.853 (search items: 0.876)``."""
    values = ", ".join(f"{k} {v:.4f}" for k, v in report["values"].items()
                       if k in report["search"])
    search = ", ".join(f"{v:.4f}" for v in report["search"].values())
    return f"trial {report['trial']} on the report items: {values} (search items: {search})"


def _tracked_names(exp, trials) -> list[str]:
    """The tracked metrics to show: the experiment's ``evaluator.track``, then any other a
    trial holds."""
    names = list(exp.evaluator.track)
    for t in trials:
        names += [n for n in t.tracked if n not in names]
    return names


def _ran_with(store) -> dict:
    """The experiment (with its overrides) the study was last run with; {} if unrecorded."""
    try:
        return store.experiment or {}
    except KeyError:  # a study another tool made
        return {}


def _cmd_pareto(args: argparse.Namespace) -> int:
    _, store = _store(args)
    front = store.pareto_front()
    tracked = store.tracked_names(front)
    if args.recipes and args.format != "table":
        raise UsageError("--recipes is for --format table (json includes each recipe)")
    if args.format == "json":
        import json

        print(json.dumps({
            "study": store.study.study_name,
            "objectives": [vars(o) for o in store.objectives],
            **({"tracked": tracked} if tracked else {}),
            "front": [{"trial": t.number, "values": t.values}
                      | ({"tracked": t.tracked} if tracked else {})
                      | {"params": t.params, "recipe": t.recipe} for t in front],
        }, indent=2))
    elif args.format == "csv":
        import csv

        names = [o.name for o in store.objectives]
        params = list(dict.fromkeys(k for t in front for k in t.params))
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["trial", *names, *tracked, *params])
        for t in front:
            writer.writerow([t.number, *(t.values.get(n, "") for n in names),
                             *(t.tracked.get(n, "") for n in tracked),
                             *(t.params.get(k, "") for k in params)])
    elif args.recipes:
        from mergesearch.recipe import Recipe
        from mergesearch.report.pareto import format_tracked

        for t in front:
            print(f"# trial {t.number}: " + ", ".join(f"{k}={v:.4f}" for k, v in t.values.items())
                  + (f"; tracked {format_tracked(t, tracked)}" if tracked else ""))
            print(Recipe.from_dict(t.recipe).to_yaml())
    else:
        from mergesearch.report import format_front

        print(format_front(front, store.objectives, tracked=tracked))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import json

    from mergesearch.atomic import atomic_write_text
    from mergesearch.report.compare import (
        format_comparison,
        load_curves,
        parse_budgets,
        parse_targets,
    )

    budgets = parse_budgets(args.budgets) if args.budgets is not None else None
    targets = parse_targets(args.target) if args.target is not None else None
    comparison = load_curves(args.studies, budgets, targets)
    if args.format == "json":
        print(json.dumps(comparison.to_json(), indent=2))
    elif args.format == "csv":
        sys.stdout.write(comparison.csv_text())
    else:
        print(format_comparison(comparison))
    if args.json:
        atomic_write_text(args.json, json.dumps(comparison.to_json(), indent=2) + "\n")
    if args.csv:
        comparison.to_csv(args.csv)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mergesearch.errors import require_extra

    require_extra(("plotly",), "dashboard", "mergesearch report")
    from mergesearch.experiment import check_name
    from mergesearch.report.html import write_report

    for name in args.studies or ():
        try:
            check_name(name)
        except ValueError as err:
            raise UsageError(f"--study {err}") from None
    out = write_report(_experiment(args), args.out, studies=args.studies, stage=args.stage)
    print(f"report written to {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mergesearch.report import choose, export_trial

    _, store = _store(args)
    if args.trial is not None:
        matches = [t for t in store.trials() if t.number == args.trial]
        if not matches or matches[0].state != "ok":
            raise UsageError(f"trial {args.trial} does not exist or did not complete")
        trial = matches[0]
        why = "as asked (--trial)"
    elif args.best is not None:
        objective = next((o for o in store.objectives if o.name == args.best), None)
        if objective is None:
            raise UsageError(f"--best {args.best!r}: the objectives are "
                             + ", ".join(o.name for o in store.objectives))
        done = [t for t in store.trials() if t.state == "ok"]
        if not done:
            raise UsageError("the study has no completed trial yet")
        top = max(t.fidelity for t in done)  # as the front: the highest fidelity scored
        done = [t for t in done if t.fidelity >= top]
        trial = min(done, key=lambda t: (objective.sign * t.values[objective.name], t.number))
        why = f"the best {objective.name} ({objective.direction}) of {len(done)} trial(s)"
    else:
        weights = _weights(args.weights, store.objectives) if args.weights else None
        front = store.pareto_front()
        try:
            trial = choose(front, store.objectives, weights)
        except ValueError as err:
            raise UsageError(str(err)) from None
        used = weights or {o.name: o.weight for o in store.objectives}
        why = (f"the best of the {len(front)} front point(s) by the weighted sum of "
               "objectives rescaled over the front, weights "
               + ",".join(f"{k}={v:g}" for k, v in used.items())
               + ("" if args.weights else " (the experiment's; choose with --weights or "
                  "--trial N)"))
    print(f"chose trial {trial.number}: {why}")
    out = export_trial(trial, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite,
                       device=args.device, progress=sys.stderr.isatty())
    values = ", ".join(f"{k}={v:.4f}" for k, v in trial.values.items())
    print(f"trial {trial.number} ({values}) -> {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mergesearch.evaluation.rescore import rescore

    args.study = None
    done = rescore(args.input, _experiment(args))
    if args.format == "json":
        import json

        print(json.dumps({"input": args.input, "kind": done.kind, "values": done.values,
                          "scores": done.scores, "unavailable": done.unavailable,
                          "recipe": done.recipe}, indent=2))
        return 0
    print(f"{done.kind} {args.input}")
    for name, value in done.values.items():
        print(f"  {name:24} {value:.4f}")
    for name, why in done.unavailable.items():
        print(f"  {name:24} not available ({why})")
    for task, metrics in done.scores.items():
        print(f"  task {task:19} " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def _weights(text: str, objectives) -> dict[str, float]:
    from mergesearch.report.pareto import parse_weights

    try:
        return parse_weights(text, objectives)
    except ValueError as err:
        raise UsageError(f"--{err}") from None


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from mergesearch.errors import require_extra

    require_extra(("optuna_dashboard", "plotly"), "dashboard", "mergesearch dashboard")
    from mergesearch.dashboard import Dashboard, is_loopback, resolve

    if args.study is not None:
        from mergesearch.experiment import check_name

        try:
            check_name(args.study)
        except ValueError as err:
            raise UsageError(f"--study {err}") from None
    if args.refresh < 0:
        raise UsageError(f"--refresh {args.refresh:g}: give seconds >= 0 (0: only at start)")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: give a port number from 1 to 65535")
    target = resolve(args.target, args.study, args.set or (), args.artifacts)
    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}: anyone who can reach this machine can read "
              "and change these studies (the dashboard has no login)", file=sys.stderr)
    board = Dashboard(target, host=args.host, port=args.port, interval=args.refresh)
    print("attaching recipe files, scores and plots to "
          f"{', '.join(target.studies or ['every study'])} ...", file=sys.stderr)
    first = board.start()
    print(f"{first.trials} trial(s) given their recipe files and scores, {first.plots} plot(s); "
          f"artifacts in {target.artifacts}", file=sys.stderr)
    every = f", refreshed every {args.refresh:g} s" if args.refresh else ""
    print(f"dashboard: {board.url}  (storage {target.url}{every}; Ctrl-C to stop)", flush=True)
    try:
        board.serve_forever()
    except KeyboardInterrupt:
        print("dashboard stopped", file=sys.stderr)
    return 0


#: What each metric of the hf backend measures (``mergesearch metrics``).
METRIC_DOCS = {
    "char_accuracy": "share of the target's tokens the model predicts (teacher-forced argmax)",
    "answer_logprob": "mean log-probability per target token",
    "greedy_match": "1 when every target token is the argmax (teacher-forced)",
    "exact_match": "greedy generation (cut at the stop strings, filtered) equals the target, "
                   "as lm-eval's exact_match*",
    "acc": "the choice with the highest log-likelihood is the right one",
    "acc_norm": "the same with log-likelihoods divided by the choices' lengths in characters",
}


def _cmd_metrics(args: argparse.Namespace) -> int:
    from mergesearch.evaluation.tasks import find_suite, load_suite
    from mergesearch.objectives import known_metrics

    if (args.experiment is None) == (args.suite is None):
        raise UsageError("metrics: give an experiment file or --suite DIR (one of them)")
    exp = None
    if args.experiment is not None:
        exp = _experiment(argparse.Namespace(experiment=args.experiment, set=args.set,
                                             study=None))
        config = exp.evaluator
        if config.backend in ("python", "lm_eval"):
            where = config.function if config.backend == "python" else "lm-eval's tasks"
            print(f"backend {config.backend}: the metrics are those {where} returns per "
                  "task; mergesearch cannot list them before it scores")
            suite = None
        else:
            suite = exp.find(config.suite)
            if suite is None:
                raise UsageError(f"evaluator.suite: {config.suite!r} not found")
    else:
        suite = find_suite(args.suite)
    specs = {}
    if suite is not None:
        specs = load_suite(suite)
        if exp is not None and exp.evaluator.tasks:
            from mergesearch.controller import check_evaluator

            check_evaluator(exp.evaluator, suite)  # names unknown tasks, with the choices
            specs = {n: specs[n] for n in exp.evaluator.tasks}
    every = [m for m in dict.fromkeys(m for spec in specs.values() for m in spec.metrics)
             if all(m in spec.metrics for spec in specs.values())]
    sources = {src: known_metrics(src) for src in ("recipe", "weights")}
    used = {} if exp is None else \
        _metrics_used(exp, suite, list(specs) or list(exp.evaluator.tasks or ()))
    if args.format == "json":
        import json

        print(json.dumps({
            "suite": None if suite is None else str(suite),
            "tasks": {n: {"output_type": spec.output_type, "metrics": list(spec.metrics)}
                      for n, spec in specs.items()},
            "every_task": every, **sources, **used}, indent=2))
        return 0
    if specs:
        width = max(len(n) for n in specs) + 2
        print(f"metrics of the {len(specs)} task(s) of {suite}:")
        for name, spec in specs.items():
            print(f"  {name:{width}} {spec.output_type:16} {', '.join(spec.metrics)}")
        if every and len(specs) > 1:
            print(f"every task: {', '.join(every)}")
        print("\nwhat they measure:")
        names = list(dict.fromkeys(m for spec in specs.values() for m in spec.metrics))
        width = max(len(m) for m in names) + 2
        for metric in names:
            base, _, pipeline = metric.partition(",")
            doc = f"exact_match after the filter pipeline {pipeline!r}" if pipeline and \
                base == "exact_match" else METRIC_DOCS.get(metric, "")
            if not doc and any(metric in spec.scorers for spec in specs.values()
                               if hasattr(spec, "scorers")):
                doc = "the task's own scorer of each generation (metric_list: scorer)"
            print(f"  {metric:{width}} {doc}")
        print("  * greedy generation runs only for the tasks an objective or evaluator.track "
              "asks it of;\n    the other metrics come from one teacher-forced pass")
        print("\nobjectives: {metric: M} is the mean of M over the evaluator's tasks, "
              "{metric: M, tasks: [T]} over those")
        print("evaluator.track: [M] is the mean of M over the tasks that produce it, [T/M] "
              "task T's M")
    print("\nrecipe metrics (objectives with source: recipe): "
          + (", ".join(sources["recipe"]) or "none"))
    print("weights metrics (objectives with source: weights): "
          + (", ".join(sources["weights"]) or "none"))
    if used:
        print(f"\nin {args.experiment}:")
        width = max(len(n) for n in [*used["objectives"], *used["tracked"]]) + 2
        for name, what in used["objectives"].items():
            print(f"  objective {name:{width}} {what}")
        for name, what in used["tracked"].items():
            print(f"  tracked   {name:{width}} {what}")
    return 0


def _metrics_used(exp, suite, tasks: list[str]) -> dict:
    """What an experiment's objectives and tracked metrics read: ``name -> "metric over
    tasks"`` (each checked against the suite, as a run checks it)."""
    from mergesearch.controller import check_evaluator

    tracked = check_evaluator(exp.evaluator, suite)

    def over(metric: str, tasks, unknown: str = "the tasks whose scores hold it") -> str:
        if not tasks:
            return f"{metric}, mean over {unknown}"
        return f"{metric} of {tasks[0]}" if len(tasks) == 1 else \
            f"{metric}, mean over {', '.join(tasks)}"

    objectives = {}
    for o in exp.evaluator.objectives:
        if o.source != "evaluator":
            objectives[o.name] = f"{o.metric} ({o.source} metric), {o.direction}"
            continue
        objectives[o.name] = over(o.metric, o.tasks or tasks,
                                  "every task the evaluator returns") + f", {o.direction}"
    return {"objectives": objectives,
            "tracked": {n: over(n.rpartition("/")[2], t) for n, t in tracked.items()}}


def _cmd_strategies(args: argparse.Namespace) -> int:
    from mergesearch.strategies import strategies

    for name, cls in strategies().items():
        kind = "multi-objective " if cls.multi_objective else "single-objective"
        print(f"{name:10} {kind}  {cls.description}")
    return 0


def _set_arg(p: argparse.ArgumentParser,
             help: str = "override an experiment field, e.g. --set budget.evaluations=20 "
                         "(repeatable; values are read as YAML)") -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=help)


def _study_args(p: argparse.ArgumentParser, *, stage: bool = True) -> None:
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("--study", help="study name (default: the experiment's name)")
    _set_arg(p)
    if stage:
        p.add_argument("--stage", help="for an experiment with stages: which stage's study "
                       "(default: the last one that has run)")


FORMATS = ("table", "json", "csv")


def _format_arg(p: argparse.ArgumentParser, help: str) -> None:
    """``--format table|json|csv`` (``text``, the old name of ``table``, still works)."""
    p.add_argument("--format", choices=FORMATS, default="table", help=help,
                   type=lambda v: "table" if v == "text" else v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergesearch", description="Search for model-merge recipes automatically."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge models from a recipe or a mergekit YAML",
                       description="Merge the models of CONFIG (a mergesearch recipe, .yaml or "
                       ".json, or a mergekit YAML) and write a Hugging Face checkpoint.")
    p.add_argument("config", help="recipe file or mergekit YAML")
    p.add_argument("out_dir", help="directory for the merged checkpoint (written atomically)")
    p.add_argument("--device", default="cpu", help="where to merge: cpu, cuda, cuda:1 ...")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle checkpoints (.bin/.pt); only for files you trust")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("convert", help="convert between recipe and mergekit YAML")
    p.add_argument("config", help="recipe file or mergekit YAML")
    p.add_argument("--to", choices=["mergekit", "recipe"], default="mergekit")
    p.add_argument("-o", "--output", help="write here instead of standard output")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("run", help="run or resume a search",
                       description="Run the search an experiment file describes, recording "
                       "every trial in its study. If the study already exists with the same "
                       "experiment, the run resumes it: finished trials are kept, the "
                       "strategy continues from its saved state, trials that were in flight "
                       "are evaluated again, and the budget counts every finished trial.")
    _study_args(p, stage=False)
    p.add_argument("--resume", action="store_true",
                   help="resume the study, and fail if it does not exist (resuming is also "
                   "the default when it exists)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the study if it exists and start again")
    p.add_argument("--new-epoch", action="store_true",
                   help="if the study was run with a different experiment (space, models, "
                   "scoring settings, library versions), continue it anyway as a new search "
                   "epoch: its trials are kept and counted, the strategy starts afresh")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="run the workers on Ray: auto (the cluster `ray start` runs here), "
                   "ray://host:port, or local (a private cluster); same as --set "
                   "execution.backend=ray --set execution.address=ADDRESS")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("sweep", help="run several searches on one Ray cluster",
                       description="Run several searches on one Ray cluster, each into its "
                       "own study, sharing the workers fairly. FILES are experiment files, "
                       "or sweep files (an experiment plus a grid of overrides: every "
                       "combination is one search).")
    p.add_argument("files", nargs="+", metavar="FILE", help="experiment or sweep files")
    _set_arg(p, "override a field of every experiment (repeatable)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="local (default), auto, or ray://host:port")
    p.add_argument("--workers", type=int, help="worker actors shared by the searches")
    p.add_argument("--resume", action="store_true", help="every study must exist already")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("status", help="trials done, failed and in flight; best so far")
    _study_args(p)
    _format_arg(p, "table (default); json: counts, budget, best values, the tracked metrics "
                "of the chosen trial, failures and the report items' scores; csv: one row of "
                "counts, best values and tracked values")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("pareto", help="the Pareto front (or best trial) of a study")
    _study_args(p)
    p.add_argument("--recipes", action="store_true", help="print each point's full recipe")
    _format_arg(p, "table (default); json: each point's trial number, objective values, "
                "tracked metrics, params and recipe; csv: a row per point, trial, "
                "objectives, tracked metrics and params")
    p.set_defaults(func=_cmd_pareto)

    p = sub.add_parser("compare", help="compare searches (strategies x seeds) at fixed budgets",
                       description="Best value of each objective, hypervolume (one reference "
                       "point for all the studies) and trials to reach a target, after the "
                       "first B trials of each study; mean ± std over the studies of each "
                       "strategy. Reads only: a study being written can be compared.")
    p.add_argument("studies", nargs="+", metavar="STUDY",
                   help="an experiment file (its study), a storage URL (every study in it), "
                   "URL#study or FILE#study, or a SQLite .db file")
    p.add_argument("--budgets", metavar="B,B,...",
                   help="trial counts to compare at (default: 25,50,100 below the largest "
                   "trial count, and that count)")
    p.add_argument("--target", metavar="X|NAME=X,...",
                   help="report the trials needed to reach X (the first objective) or each "
                   "NAME=X")
    _format_arg(p, "table (default); json: every study's and strategy's figures per "
                "budget; csv: a row per study and budget, then per strategy and budget")
    p.add_argument("--json", metavar="PATH", help="also write the comparison as JSON to PATH")
    p.add_argument("--csv", metavar="PATH", help="also write it as CSV to PATH")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("report", help="write a self-contained HTML report of a run",
                       description="One HTML file (plotly, opens with no network): the "
                       "Pareto front, best so far / hypervolume per evaluation, per-layer "
                       "heatmaps and layer-path diagrams of the front's recipes, a table of "
                       "them with their scores, the run's settings; with several studies "
                       "(--study repeated, or an experiment's stages) the compare charts.")
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("--study", action="append", dest="studies", metavar="STUDY",
                   help="study name (default: the experiment's name); repeat to compare")
    p.add_argument("--stage", help="for an experiment with stages: only this stage's study "
                   "(default: every stage that has run)")
    _set_arg(p, "override an experiment field (as given to `run`; repeatable)")
    p.add_argument("--out", help="the HTML file (default: <run folder>/report.html, or "
                   "<run folder>/<study>/report.html for one --study)")
    p.set_defaults(func=_cmd_report, study=None)

    p = sub.add_parser("export", help="write a trial's recipe, mergekit YAML and checkpoint",
                       description="Export one trial: by number (--trial), or the Pareto point "
                       "with the best weighted sum of objectives rescaled over the front "
                       "(--weights, default: the experiment's objective weights).")
    _study_args(p)
    p.add_argument("--out", required=True, help="output directory")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--trial", type=int, help="trial number (see `mergesearch pareto`)")
    pick.add_argument("--best", metavar="OBJECTIVE", help="the trial with the best value of "
                      "this objective (the earliest on ties)")
    pick.add_argument("--weights", help="preference weights, e.g. rev=1,srt=2, or one number "
                      "per objective in order, e.g. 1,2")
    p.add_argument("--checkpoint", action="store_true", help="also write the merged model")
    p.add_argument("--device", default="cpu", help="where to merge for --checkpoint")
    p.add_argument("--overwrite", "--force", action="store_true",
                   help="replace an existing output")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="score a merged checkpoint or a recipe with an "
                       "experiment's evaluator",
                       description="Score a Hugging Face model folder (e.g. from `mergesearch "
                       "export --checkpoint`) or a recipe file (recipe.json/.yaml or a "
                       "mergekit YAML) as a trial of EXPERIMENT would be scored.")
    p.add_argument("input", help="model folder or recipe file")
    p.add_argument("experiment", help="experiment YAML file")
    _set_arg(p, "override an experiment field, e.g. --set evaluator.limit=null "
                   "(repeatable; values are read as YAML)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard over a search's studies",
                       description="Serve optuna-dashboard over the storage of an experiment (or a "
                       "storage URL), with "
                       "each trial's recipe.json and mergekit.yml as downloadable artifacts, "
                       "per-task scores as user attrs (score.<task>.<metric>) and "
                       "mergesearch's plots (hypervolume history, per-layer heatmaps of the "
                       "front, layer paths); refreshed while a search runs.")
    p.add_argument("target", metavar="EXPERIMENT|URL",
                   help="experiment YAML file, storage URL or SQLite study.db")
    p.add_argument("--study", help="study name (default: the experiment's, or with a URL "
                   "every study in it)")
    _set_arg(p, "override an experiment field, as for run (repeatable)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; another host serves the "
                   "studies to the network, with no login)")
    p.add_argument("--refresh", type=float, default=10.0, metavar="SECONDS",
                   help="attach new trials' files and redraw the plots this often (default "
                   "10; 0: only at start)")
    p.add_argument("--artifacts", metavar="DIR", help="artifact folder (default: "
                   "artifacts/ beside study.db; required for non-SQLite storage URLs)")
    p.set_defaults(func=_cmd_dashboard)

    p = sub.add_parser("metrics", help="list the metrics an experiment's evaluator can "
                       "compute (for objectives and evaluator.track)",
                       description="Every metric the evaluator computes for each task of a "
                       "suite (an experiment's, or --suite DIR), the recipe and weights "
                       "metrics objectives may use, and what the experiment's objectives and "
                       "tracked metrics read (checked as a run checks them).")
    p.add_argument("experiment", nargs="?", help="experiment YAML file")
    p.add_argument("--suite", metavar="DIR", help="a folder of lm-eval task YAMLs instead")
    _set_arg(p)
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default); json: per task its output type and metrics, the "
                   "metrics of every task, recipe and weights metrics, and the experiment's "
                   "use of them")
    p.set_defaults(func=_cmd_metrics)

    p = sub.add_parser("strategies", help="list the search strategies")
    p.set_defaults(func=_cmd_strategies)

    p = sub.add_parser("methods", help="list the merge methods and their parameters")
    p.set_defaults(func=_cmd_methods)

    zoo = sub.add_parser("zoo", help="the built-in tiny model zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    p = zsub.add_parser("build", help="build (or reuse) the tiny model zoo")
    p.add_argument("--hard", action="store_true",
                   help="the hard zoo (zoo:hard/...): experts in different layers, a "
                        "hand-over pair, harmful sources")
    p.add_argument("--out", help="where to build it (default: $MERGESEARCH_ZOO or the cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    p.set_defaults(func=_cmd_zoo_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    terminal = logging.StreamHandler()
    terminal.setLevel(level)  # a run's log file may take more (see _study_log)
    logging.basicConfig(level=level, handlers=[terminal],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (MergesearchError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: finished trials are saved; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
