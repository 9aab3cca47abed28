"""The lm-eval backend (``evaluator.backend: lm_eval``): lm-eval's own task code, run on
the resident merged model in memory.

Built once: lm-eval's task index (only the include path, ``evaluator.suite``, unless
``lm_eval.include_defaults``), the tasks (documents loaded, settings applied), the items
each (fidelity, seed) scores. Per candidate: one ``lm_eval.evaluator.evaluate`` call with
``samples=`` (the chosen document ids) and ``log_samples=True`` (per-item results) on an
``HFLM`` wrapped once around the resident module, whose weights the worker changes in
place: nothing is written to disk.

Metric names are lm-eval's ``<metric>,<filter>`` keys; ``<metric>`` alone is the task's
first filter pipeline (``none`` when it has no ``filter_list``), as on the hf backend,
so an objective ``metric: exact_match`` means ``exact_match,none`` on the zoo and
``exact_match,strict-match`` on gsm8k. Every score is kept under both names.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Evaluation, EvaluationError
from .config import EvaluatorConfig
from .tasks import find_suite

log = logging.getLogger(__name__)
_NAN = float("nan")
_GENERATE = ("exact_match",)  # metrics that need a generation request
#: lm_eval_task.TOKEN_METRICS (that module imports lm-eval): a dict task asking for one
#: of these is a TokenScoredTask
TOKEN_METRICS = ("char_accuracy", "answer_logprob", "greedy_match")


@dataclass
class _Task:
    """One lm-eval task, loaded: its documents, the items ``limit`` keeps, its metrics."""

    name: str
    task: Any  # lm_eval.api.task.Task
    n_docs: int
    doc_ids: list[int]  # the documents kept by limit (all, in order, without one)
    metrics: list[str]  # lm-eval metric names (without the filter)
    filters: list[str]  # filter pipeline names; the first is the default

    @property
    def keys(self) -> list[str]:
        """Every metric name an objective may use on this task."""
        return [*self.metrics, *(f"{m},{f}" for m in self.metrics for f in self.filters)]


class LMEvalEvaluator:
    """Scores a resident ``transformers`` causal LM with lm-eval (see the module).

    ``metrics`` names metrics that must be produced (``evaluator.track``): lm-eval
    computes every metric of a task anyway, so they are only checked.
    """

    def __init__(self, config: EvaluatorConfig, tokenizer: Any, *,
                 base_dir: str | Path | None = None, metrics: Collection[str] = ()) -> None:
        if config.lm_eval is None:
            raise EvaluationError("backend lm_eval needs evaluator.lm_eval: {tasks: [...]}")
        if config.estimator is not None and config.estimator.kind != "full":
            raise EvaluationError(f"evaluator.estimator {config.estimator.kind}: only for "
                                  "backend hf; use limit (or the fidelity) to score fewer items")
        if config.tasks is not None:
            raise EvaluationError("evaluator.tasks: with backend lm_eval the tasks are "
                                  "evaluator.lm_eval.tasks (and objectives[].tasks)")
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as err:  # pragma: no cover - lm-eval is a dev extra
            raise EvaluationError("backend lm_eval needs lm-eval: pip install "
                                  "'mergesearch[lm_eval]'") from err
        self.config, self.tokenizer, self.options = config, tokenizer, config.lm_eval
        self.include = find_suite(config.suite, base_dir).resolve() if config.suite else None
        self._base = Path(base_dir).resolve() if base_dir else self.include
        defaults = self.options.include_defaults
        if defaults is None:  # lm-eval's own tasks only for names no include path has
            defaults = self.include is None and any(isinstance(t, str)
                                                    for t in self.options.tasks)
        self._defaults = defaults
        self._manager = TaskManager(include_path=str(self.include) if self.include else None,
                                    include_defaults=self._defaults)
        self._data = self._load_tasks()
        # recipe and weight objectives are computed on the worker (mergesearch.objectives)
        self._objectives = [o for o in config.objectives if o.source == "evaluator"]
        self.objective_names = [o.name for o in self._objectives]
        self.directions = {o.name: o.direction for o in self._objectives}
        self._objective_tasks = {o.name: self._check_objective(o.name, o.metric, o.tasks)
                                 for o in self._objectives}
        known = {k for t in self._data.values() for k in t.keys}
        if bad := sorted(set(metrics) - known):
            raise EvaluationError(f"evaluator.track: metrics {bad} are not produced by any "
                                  f"task; choose from {sorted(known)}")
        self._lm: Any = None
        self._lm_model: Any = None
        self._samples: dict[tuple[float, int], dict[str, list[int]]] = {}

    # -- setup ---------------------------------------------------------------------------

    def _load_tasks(self) -> dict[str, _Task]:
        opts = self.options
        known = set(self._manager.all_tasks)
        unknown = [t for t in opts.tasks if isinstance(t, str) and t not in known
                   and not Path(t).expanduser().is_file()]
        if unknown:
            where = f"the include path {self.include}" if self.include else "lm-eval's tasks"
            if self.include and not self._defaults:
                where += " (lm-eval's own tasks are not indexed: set lm_eval.include_defaults)"
            near = sorted(known)[:20] + (["..."] if len(known) > 20 else [])
            raise EvaluationError(f"evaluator.lm_eval.tasks: unknown tasks {unknown} in "
                                  f"{where}; known: {near}")
        specs = [t if isinstance(t, str) else self._dict_task(t, i)
                 for i, t in enumerate(opts.tasks)]
        try:
            loaded = self._manager.load(specs)
        except FileNotFoundError as err:
            raise EvaluationError(f"evaluator.lm_eval.tasks: a data file is missing: {err}; "
                                  "fix dataset_kwargs.data_files") from err
        except (KeyError, ValueError, TypeError) as err:
            raise EvaluationError(f"evaluator.lm_eval.tasks: lm-eval cannot load the tasks: "
                                  f"{err}") from err
        self._groups = {g: list(v) for g, v in loaded.get("group_map", {}).items()}
        return {name: self._prepare(name, task) for name, task in loaded["tasks"].items()}

    def _dict_task(self, spec: dict[str, Any], index: int) -> dict[str, Any]:
        """A task config with its relative data files made absolute (against the
        experiment's folder, its parents, then the current directory); one that asks for
        our metrics (char_accuracy...) is a ``TokenScoredTask``."""
        spec = dict(spec)
        kwargs = dict(spec.get("dataset_kwargs") or {})
        if "data_files" in kwargs:
            files = kwargs["data_files"]
            where = f"evaluator.lm_eval.tasks[{index}] ({spec['task']})"
            if isinstance(files, dict):
                files = {k: self._data_file(v, where) for k, v in files.items()}
            else:
                files = self._data_file(files, where)
            spec["dataset_kwargs"] = {**kwargs, "data_files": files}
        names = [m.get("metric") for m in spec.get("metric_list") or [] if isinstance(m, dict)]
        if "class" not in spec and any(m in TOKEN_METRICS for m in names):
            from .lm_eval_task import TokenScoredTask

            spec["class"] = TokenScoredTask
        return spec

    def _data_file(self, files: str | list[str], where: str) -> str | list[str]:
        if isinstance(files, list):
            return [self._data_file(f, where) for f in files]  # type: ignore[misc]
        path = Path(files).expanduser()
        bases = [self._base, *self._base.parents] if self._base else []
        candidates = [path] if path.is_absolute() else [b / path for b in [*bases, Path.cwd()]]
        for candidate in candidates:
            if candidate.is_file():
                return str(candidate)
        raise EvaluationError(f"{where}: data file {files!r} not found (looked in "
                              f"{', '.join(str(c.parent) for c in candidates)}); fix "
                              "dataset_kwargs.data_files")

    def _prepare(self, name: str, task: Any) -> _Task:
        opts = self.options
        if task.get_config("output_type") == "generate_until" and opts.gen_kwargs:
            task.set_config(key="generation_kwargs", value=dict(opts.gen_kwargs), update=True)
        if opts.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=opts.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=opts.fewshot_seed)
        if getattr(task.config, "process_results", None) is None:
            lost = [m for m, fn in getattr(task, "_metric_fn_list", {}).items() if fn is None]
            if lost:
                raise EvaluationError(
                    f"evaluator.lm_eval.tasks: task {name!r} lists metrics {lost} that lm-eval "
                    "does not know; for ours (char_accuracy, answer_logprob, greedy_match) "
                    "set `class: !function utils.TokenScoredTask` with a copy of "
                    "mergesearch/evaluation/lm_eval_task.py as utils.py next to the YAML")
        n = len(task.eval_docs)
        keep = list(range(n))
        if self.config.limit is not None and self.config.limit < n:  # as the hf backend
            random.Random(f"{self.config.subset_seed}:{name}").shuffle(keep)
            keep = sorted(keep[: self.config.limit])
        metrics = list(task.aggregation())
        filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
        return _Task(name, task, n, keep, metrics, filters)

    def _check_objective(self, name: str, metric: str, tasks: list[str] | None) -> list[str]:
        if tasks is None:
            tasks = list(self._data)
        else:
            tasks = [t for task in tasks for t in self._groups.get(task, [task])]
            tasks = [t for t in tasks if t not in self._groups]  # nested groups: leaves only
        unknown = [t for t in tasks if t not in self._data]
        if unknown:
            raise EvaluationError(f"objective {name!r} names tasks {unknown} that "
                                  f"evaluator.lm_eval.tasks does not load; choose from "
                                  f"{list(self._data)} (or a group: {list(self._groups)})")
        for task in tasks:
            if metric not in self._data[task].keys:
                raise EvaluationError(f"objective {name!r}: metric {metric!r} is not produced "
                                      f"by lm-eval task {task!r}; it produces "
                                      f"{self._data[task].keys}")
        return tasks

    @property
    def n_items(self) -> dict[str, int]:
        """Items per task after ``limit``."""
        return {n: len(t.doc_ids) for n, t in self._data.items()}

    # -- scoring -------------------------------------------------------------------------

    def items(self, fidelity: float = 1.0, seed: int = 0) -> dict[str, list[int]]:
        """The document ids each task scores at ``(fidelity, seed)``: the hf backend's."""
        from .hf import _subset

        key = (fidelity, seed)
        if key not in self._samples:
            self._samples[key] = {
                name: [t.doc_ids[i] for i in _subset(len(t.doc_ids), fidelity, f"{seed}:{name}")]
                for name, t in self._data.items()}
        return self._samples[key]

    def lm(self, model: Any) -> Any:
        """The ``HFLM`` around ``model``, built on first use (and for a new module)."""
        if self._lm is None or self._lm_model is not model:
            device = next(model.parameters()).device
            hf_log = logging.getLogger("lm_eval.models.huggingface")
            level = hf_log.level
            hf_log.setLevel(logging.ERROR)  # its warnings about a model object are expected
            try:
                self._lm = _quiet_hflm()(
                    pretrained=model, tokenizer=self.tokenizer, device=str(device),
                    batch_size=self.options.batch_size or self.config.batch_size)
            finally:
                hf_log.setLevel(level)
            self._lm_model = model
        return self._lm

    def evaluate(self, model: Any, *, fidelity: float = 1.0, seed: int = 0) -> Evaluation:
        """Score ``model`` on every task; ``fidelity < 1`` uses the hf backend's seeded
        subset (the first ``ceil(fidelity * n)`` of a seeded shuffle of the ``limit``
        items)."""
        if not 0 < fidelity <= 1:
            raise EvaluationError(f"fidelity must be in (0, 1], got {fidelity}")
        from lm_eval.evaluator import evaluate as lm_evaluate

        items = self.items(fidelity, seed)
        samples = {n: ids for n, ids in items.items()
                   if len(ids) < self._data[n].n_docs}
        opts = self.options
        lm = self.lm(model)
        was_training = model.training
        model.eval()
        import lm_eval.api.task as task_module

        bar = task_module.tqdm
        task_module.tqdm = functools.partial(bar, disable=True)  # one bar per task per call
        try:
            result = lm_evaluate(
                lm, {"tasks": {n: t.task for n, t in self._data.items()}, "groups": {},
                     "group_map": {}},
                samples=samples or None, bootstrap_iters=0, log_samples=True,
                system_instruction=opts.system_instruction,
                apply_chat_template=opts.apply_chat_template,
                fewshot_as_multiturn=opts.fewshot_as_multiturn)
        finally:
            task_module.tqdm = bar
            model.train(was_training)
        out = Evaluation(values={}, scores={}, correct={}, n_items={})
        for name, task in self._data.items():
            self._read(name, task, result["results"][name], result["samples"][name],
                       items[name], out)
        for obj in self._objectives:
            out.values[obj.name] = _mean([out.scores[t][obj.metric]
                                          for t in self._objective_tasks[obj.name]])
        return out

    def _read(self, name: str, task: _Task, results: Mapping[str, Any],
              logged: list[dict[str, Any]], ids: list[int], out: Evaluation) -> None:
        """One task's means, per-item values, correctness and generations."""
        scores: dict[str, float] = {}
        for metric in task.metrics:
            for i, filt in enumerate(task.filters):
                value = _float(results.get(f"{metric},{filt}", _NAN))
                scores[f"{metric},{filt}"] = value
                if i == 0:
                    scores[metric] = value
        first = task.filters[0]
        rows = sorted((s for s in logged if s.get("filter", first) == first),
                      key=lambda s: s["doc_id"])
        got = [int(s["doc_id"]) for s in rows]
        if got != ids:
            raise EvaluationError(f"lm-eval scored documents {got[:10]}... of task {name!r}, "
                                  f"not the {len(ids)} asked for")
        per = {m: [_float(s.get(m, _NAN)) for s in rows] for m in task.metrics}
        for metric in task.metrics:  # means of the first filter recomputed from the items
            if per[metric] and all(math.isfinite(v) for v in per[metric]):
                scores[metric] = scores[f"{metric},{first}"] = math.fsum(per[metric]) / len(rows)
        if not all(_finite_answers(s) for s in rows):  # NaN/inf logits: as the hf backend
            scores = dict.fromkeys(scores, _NAN)
            per = {m: [_NAN] * len(rows) for m in per}
        verdict = next((m for m in ("exact_match", "acc", "greedy_match") if m in per),
                       task.metrics[0] if task.metrics else None)
        out.correct[name] = [v >= 1 - 1e-9 for v in per.get(verdict, [])] if verdict \
            else [False] * len(rows)
        out.n_items[name] = len(rows)
        out.indices[name] = got
        out.scores[name] = scores
        out.item_scores[name] = per
        if task.task.get_config("output_type") == "generate_until" and \
                any(m in per for m in _GENERATE):
            out.outputs[name] = [str(s["resps"][0][0]) if s.get("resps") else ""
                                 for s in rows]


def _quiet_hflm() -> type:
    """``HFLM`` without its per-call progress bars (a search makes thousands of calls)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def _finite_answers(sample: Mapping[str, Any]) -> bool:
    """Whether every loglikelihood answer of a logged sample is finite."""
    for resp in sample.get("resps") or []:
        for answer in resp:
            if isinstance(answer, tuple | list) and len(answer) == 2 and \
                    isinstance(answer[0], float) and not math.isfinite(answer[0]):
                return False
    return True


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return _NAN


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else _NAN
