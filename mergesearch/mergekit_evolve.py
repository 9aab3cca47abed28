"""mergekit-evolve configs run unchanged: a ``genome:`` + ``tasks:`` file becomes an experiment.

``mergesearch run evol_merge_config.yml`` takes the file mergekit-evolve takes (its
``EvolMergeConfiguration``: a genome definition and lm-eval tasks) and maps it:

* **models**: ``genome.models`` are the sources (named after their last path part),
  ``genome.base_model`` the base;
* **space**: mergekit-evolve's genome, one value per model per layer group (per filter) for
  each parameter of its ``merge_method`` (linear and task_arithmetic: ``weight``; ties and
  dare_ties: ``weight`` and ``density``; slerp: ``t``).  ``layer_granularity: G`` is
  ``granularity: {groups: G}`` (0: one value for all layers); ``filters`` are module
  filters; ``normalize`` is fixed as mergekit-evolve sets it (its default: true for linear,
  ties and dare_ties).  The start point is mergekit-evolve's (weight 1/N, density 1) and
  the bounds give every dimension the same width, so that its absolute ``sigma0`` is one
  fraction of every range: weight in [-1, 1] (through ``abs`` unless
  ``allow_negative_weights``), density in [0, 2] clamped to [0, 1] (mergekit-evolve takes
  |x| clamped to [0, 1] of an unbounded gene);
* **evaluator**: each task names an lm-eval task (or group) whose YAML must be on disk, in
  ``task_search_path`` (mergekit-evolve's ``--task-search-path``: ``--set
  task_search_path=DIR``, or a ``task_search_path:`` key in the file, which mergekit-evolve
  ignores) or else under the config's folder.  The score is mergekit-evolve's weighted sum
  of ``metric`` over the tasks: one objective ``score`` when every task has the same metric
  and weight, else one objective per task with the task's weight (the strategy ranks by
  the weighted sum, as mergekit-evolve does);
* **strategy**: ``sakana_ps`` (pycma CMA-ES, as mergekit-evolve runs it: pycma's default
  population ``4 + 3 ln n``, ``sigma0`` 1/6 of a unit of every gene, the start point not
  scored on its own); **budget**: ``max_fevals`` (default 100) and ``timeout``.

mergekit-evolve's command-line options are ``--set`` keys: ``max_fevals``, ``timeout``,
``sigma0``, ``force_population_size``, ``random_seed``, ``batch_size``,
``task_search_path``, ``trust_remote_code``; its options about where and how it runs
(``vllm``, ``storage_path``, ``in_memory`` ...) have no use here and are named in a
warning.  Every other ``--set`` sets a field of the experiment the file maps to (``name``,
``output``, ``budget.evaluations``, ``execution.device`` ...).  What cannot be mapped is
logged as one warning line per field.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mergesearch.configs import format_validation_error, load_yaml, read_yaml_mapping
from mergesearch.evaluation.tasks import read_task_yaml
from mergesearch.experiment import Experiment, ExperimentError, apply_override

log = logging.getLogger(__name__)

#: mergekit-evolve's genome: the parameters of each merge method, in gene order.
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "slerp": ("t",),
}
_NEEDS_BASE = ("ties", "dare_ties", "task_arithmetic")
_NORMALIZED_BY_DEFAULT = ("ties", "dare_ties", "linear")  # mergekit-evolve's normalize: None
#: the width of every searched range (see the module doc): sigma0 / width is the fraction
_WIDTH = {"weight": 2.0, "density": 2.0, "t": 1.0}
#: mergekit-evolve command-line options that ``--set`` maps (key -> its default there)
OPTIONS: dict[str, Any] = {
    "max_fevals": 100, "timeout": None, "sigma0": 1 / 6, "force_population_size": None,
    "random_seed": 0, "batch_size": None, "task_search_path": None, "trust_remote_code": False,
}
#: its options about where and how it runs: nothing to map them to
UNUSED_OPTIONS = frozenset({
    "vllm", "strategy", "in_memory", "storage_path", "num_gpus", "merge_cuda", "allow_crimes",
    "wandb", "use_wandb", "wandb_project", "wandb_entity", "save_final_model", "reshard",
    "load_in_8bit", "load_in_4bit", "i_understand_the_depths_of_the_evils_i_am_unleashing",
    "allow_benchmark_tasks",
})
_SKIP_DIRS = {"runs", "node_modules", "__pycache__", "site-packages"}


class EvolveConfigError(ExperimentError):
    """A mergekit-evolve config that cannot be run here; the message names the field."""


class _Lenient(BaseModel):
    """Unknown keys are kept (mergekit-evolve ignores them) and named in a warning."""

    model_config = ConfigDict(extra="allow")


class GenomeConfig(_Lenient):
    """mergekit-evolve's ``ModelGenomeDefinition``."""

    models: list[str | dict[str, Any]] = Field(min_length=1)
    merge_method: str
    base_model: str | dict[str, Any] | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = Field(0, ge=0)
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False

    @model_validator(mode="after")
    def _method(self) -> GenomeConfig:
        if self.merge_method not in METHOD_PARAMS:
            raise ValueError(f"merge_method {self.merge_method!r}: mergekit-evolve's genome "
                             f"knows {', '.join(METHOD_PARAMS)}")
        if self.merge_method in _NEEDS_BASE and self.base_model is None:
            raise ValueError(f"base_model is required for {self.merge_method}")
        if self.merge_method == "slerp" and (self.smooth or self.filters):
            raise ValueError("smooth and filters are not supported for slerp (as in "
                             "mergekit-evolve)")
        return self


class TaskConfig(_Lenient):
    """mergekit-evolve's ``TaskConfiguration``: an lm-eval task, its weight and metric."""

    name: str
    weight: float = 1.0
    metric: str = "acc,none"

    @model_validator(mode="before")
    @classmethod
    def _plain_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a usable weight")
        return value


class EvolveConfig(_Lenient):
    """mergekit-evolve's ``EvolMergeConfiguration`` (plus ``task_search_path``, ours)."""

    genome: GenomeConfig
    tasks: list[TaskConfig] = Field(min_length=1)
    limit: int | None = Field(None, gt=0)
    num_fewshot: int | None = Field(None, ge=0)
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True
    task_search_path: str | list[str] | None = None


@dataclass
class Mapping:
    """An evolve config mapped: the experiment's fields and what did not map."""

    experiment: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def is_evolve_config(data: Any) -> bool:
    """A mapping with ``genome`` and ``tasks`` at the top: a mergekit-evolve config."""
    return isinstance(data, dict) and "genome" in data and "tasks" in data


def experiment_from_evolve_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                                  *, data: dict[str, Any] | None = None) -> Experiment:
    """The experiment a mergekit-evolve config file stands for, with ``--set`` overrides
    (mergekit-evolve option names, or experiment fields); each field that does not map is
    logged as one warning."""
    path = Path(path)
    if data is None:
        data = read_yaml_mapping(path, EvolveConfigError, "mergekit-evolve config")
    options, rest, unused = split_overrides(overrides)
    mapped = map_evolve_config(data, name=_name(path), where=str(path), options=options,
                               base_dir=path.resolve().parent)
    mapped.warnings += [f"--set {key}: a mergekit-evolve option about how it runs; not used "
                        "here" for key in unused]
    for line in mapped.warnings:
        log.warning("%s", line)
    exp_data = mapped.experiment
    for item in rest:
        apply_override(exp_data, item)
    exp = Experiment.from_dict(exp_data, where=f"{path} (mapped from mergekit-evolve)")
    exp._file = path.resolve()
    exp.check_paths(where=str(path))
    return exp


def split_overrides(overrides: list[str] | tuple[str, ...]
                    ) -> tuple[dict[str, Any], list[str], list[str]]:
    """``--set`` items: (mergekit-evolve options by name, experiment overrides, options of
    mergekit-evolve that have no use here)."""
    options: dict[str, Any] = {}
    rest, unused = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        if sep and name in OPTIONS:
            try:
                options[name] = load_yaml(raw) if raw.strip() else None
            except Exception:  # a bare string that is not YAML: take it as written
                options[name] = raw
        elif sep and name in UNUSED_OPTIONS:
            unused.append(name)
        else:
            rest.append(item)
    return options, rest, unused


def map_evolve_config(data: dict[str, Any], *, name: str, where: str = "config",
                      options: dict[str, Any] | None = None,
                      base_dir: str | Path | None = None) -> Mapping:
    """The experiment fields (a plain mapping, not yet validated) for a mergekit-evolve
    config ``data``; reads task YAMLs (to find the suite) but no model."""
    try:
        config = EvolveConfig.model_validate(data)
    except ValidationError as err:
        raise EvolveConfigError(format_validation_error(err, where)) from None
    opts = {**OPTIONS, **(options or {})}
    warnings = _extra_keys(config)
    genome = config.genome
    models, base = _models(genome, warnings)
    space = _space(genome, len(genome.models), list(models), warnings)
    evaluator = _evaluator(config, opts, base_dir, where, warnings)
    sigma0 = _number(opts["sigma0"], "sigma0", positive=True)
    strategy_options: dict[str, Any] = {
        "sigma0": sigma0 / max(_WIDTH[p] for p in METHOD_PARAMS[genome.merge_method]),
        "include_init": False}
    if opts["force_population_size"] is not None:
        strategy_options["popsize"] = opts["force_population_size"]
    budget: dict[str, Any] = {"evaluations": opts["max_fevals"]}
    if opts["timeout"] is not None:
        budget["wall_time"] = opts["timeout"]
    if config.random_init:
        warnings.append("random_init: true: not mapped: the search starts at mergekit-evolve's "
                        "default start (weight 1/N, density 1), not at a random point")
    model_fields: dict[str, Any] = {"base": base, "sources": models}
    if opts["trust_remote_code"]:
        model_fields["trust_remote_code"] = True
    experiment = {
        "name": name,
        "description": f"mapped from the mergekit-evolve config {where}",
        "models": model_fields,
        "space": space,
        "strategy": {"name": "sakana_ps", "options": strategy_options},
        "evaluator": evaluator,
        "budget": budget,
        "seed": opts["random_seed"],
    }
    return Mapping(experiment, warnings)


# ------------------------------------------------------------------------- pieces


def _extra_keys(config: EvolveConfig) -> list[str]:
    out = [f"{k}: not a mergekit-evolve field; ignored" for k in config.model_extra or {}]
    out += [f"genome.{k}: not a mergekit-evolve genome field; ignored"
            for k in config.genome.model_extra or {}]
    for i, task in enumerate(config.tasks):
        out += [f"tasks.{i}.{k}: not a mergekit-evolve task field; ignored"
                for k in task.model_extra or {}]
    return out


def _model_ref(value: str | dict[str, Any], where: str, warnings: list[str]) -> str:
    """A mergekit model reference (``path[@revision][+lora]`` or its mapping form) as ours."""
    if isinstance(value, dict):
        model, lora = value.get("model"), value.get("lora")
        if isinstance(model, dict):
            path, revision = model.get("path"), model.get("revision")
        else:
            path, revision = model, None
        if value.get("override_architecture"):
            warnings.append(f"{where}.override_architecture: not mapped; the model's own "
                            "architecture is used")
        if not isinstance(path, str) or not path:
            raise EvolveConfigError(f"{where}: expected a model path, or a mapping with "
                                    "model: PATH")
        text = path
    else:
        text = value
        model_part, _, lora = value.partition("+")
        path, _, revision = model_part.partition("@")
    if lora:
        raise EvolveConfigError(
            f"{where}: {text!r} applies a LoRA adapter (+{lora}); give the merged model's "
            "folder instead, or the adapter folder itself as a model (it is read on top of "
            "the base)")
    if revision:
        warnings.append(f"{where}: revision {revision!r} not mapped; {path!r} is opened as "
                        "it is (a local folder or the hub cache)")
    return path


def _source_names(refs: list[str]) -> list[str]:
    names: list[str] = []
    for ref in refs:
        stem = re.split(r"[/:\\]", ref.rstrip("/"))[-1] or "model"
        candidate, n = stem, 2
        while candidate in names:
            candidate, n = f"{stem}-{n}", n + 1
        names.append(candidate)
    return names


def _models(genome: GenomeConfig, warnings: list[str]) -> tuple[dict[str, str], str | None]:
    refs = [_model_ref(m, f"genome.models.{i}", warnings) for i, m in enumerate(genome.models)]
    base = None if genome.base_model is None else \
        _model_ref(genome.base_model, "genome.base_model", warnings)
    method = genome.merge_method
    if method == "slerp":
        if len(refs) != 2:
            raise EvolveConfigError(
                f"genome.models: a slerp genome maps here for two models, not {len(refs)} "
                "(mergekit-evolve picks the top two of N per layer group, which has no "
                "equivalent); use linear or task_arithmetic for more")
        if base is not None:
            warnings.append("genome.base_model: not used by slerp here; the merge goes from "
                            "genome.models.0 to genome.models.1")
        warnings.append("genome.merge_method slerp: mergekit-evolve's genes (a weight per "
                        "model, its t from their softmax) are searched as one t per layer "
                        "group, from genome.models.0 (t = 0) to genome.models.1 (t = 1)")
        return dict(zip(_source_names(refs[1:]), refs[1:], strict=True)), refs[0]
    if method == "linear" and base is not None:
        warnings.append("genome.base_model: a linear merge does not use a base model here; "
                        "ignored")
        base = None
    if base is not None and base in refs:
        warnings.append("genome.models: the base model is also listed; its genes do not "
                        f"change a {method} merge and are not searched")
        refs = [r for r in refs if r != base]
        if not refs:
            raise EvolveConfigError("genome.models: only the base model is listed; name the "
                                    "models to merge into it")
    return dict(zip(_source_names(refs), refs, strict=True)), base


def _space(genome: GenomeConfig, n_genes_models: int, sources: list[str],
           warnings: list[str]) -> dict[str, Any]:
    """The parameter space of mergekit-evolve's genome (see the module doc)."""
    method = genome.merge_method
    granularity: dict[str, Any] = {}
    if genome.layer_granularity > 0:
        granularity["groups"] = genome.layer_granularity
    if genome.filters:
        granularity["modules"] = list(genome.filters)
        warnings.append("genome.filters: mergekit-evolve's extra gene for tensors no filter "
                        "matches is not searched; such tensors take the mean of the filters' "
                        "values")
    if genome.smooth:
        warnings.append("genome.smooth: true: not mapped: each layer group keeps its own "
                        "values (no interpolation between groups)")
    if genome.tokenizer_source is not None:
        warnings.append("genome.tokenizer_source: not mapped; the merged model keeps the "
                        "base's tokenizer")
    parameters: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    if method == "slerp":
        parameters["t"] = {"per": "shared", "granularity": granularity, "bounds": [0.0, 1.0],
                           "init": 0.5}
    else:
        weight: dict[str, Any] = {"per": "source", "granularity": granularity,
                                  "bounds": [-1.0, 1.0], "init": 1.0 / n_genes_models}
        if not genome.allow_negative_weights:
            weight["transform"] = ["abs"]
        parameters["weight"] = weight
        if "density" in METHOD_PARAMS[method]:
            parameters["density"] = {"per": "source", "granularity": granularity,
                                     "bounds": [0.0, 2.0], "init": 1.0,
                                     "transform": ["clamp"]}
        normalize = genome.normalize
        fixed["normalize"] = method in _NORMALIZED_BY_DEFAULT if normalize is None else normalize
    space: dict[str, Any] = {
        "description": f"mergekit-evolve's {method} genome over {', '.join(sources)}",
        "method": method, "parameters": parameters}
    if fixed:
        space["fixed"] = fixed
    return space


# ------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class _Found:
    """A task or group YAML on disk."""

    path: Path
    members: tuple[str, ...] = ()  # a group's tasks (empty for a task)


def _search_paths(value: Any, base_dir: Path | None) -> list[Path]:
    if value is None:
        return [base_dir] if base_dir is not None else [Path.cwd()]
    items = [value] if isinstance(value, str | os.PathLike) else list(value)
    out = []
    for item in items:
        p = Path(str(item)).expanduser()
        if not p.is_absolute():
            p = next((b / p for b in (Path.cwd(), base_dir) if b and (b / p).is_dir()), p)
        if not p.is_dir():
            raise EvolveConfigError(f"task_search_path: {item} is not a directory; give the "
                                    "folder(s) holding the tasks' lm-eval YAMLs")
        out.append(p.resolve())
    return out


_NAME_LINE = re.compile(r"^(task|group)\s*:\s*['\"]?([^'\"\s#\[\]{}]+)", re.MULTILINE)


def _index(paths: list[Path], wanted: set[str]) -> dict[str, _Found]:
    """Where the ``wanted`` tasks and groups are defined under ``paths`` (the first found),
    and the tasks of those groups."""
    found: dict[str, _Found] = {}
    files: list[Path] = []
    for root in paths:
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
            files += [Path(folder) / n for n in sorted(names) if n.endswith((".yaml", ".yml"))]
    texts: dict[Path, str] = {}
    for f in files:
        try:
            texts[f] = f.read_text()
        except (OSError, UnicodeDecodeError):
            continue
    pending = set(wanted)
    while pending:
        name = pending.pop()
        for f, text in texts.items():
            if not any(m.group(2) == name for m in _NAME_LINE.finditer(text)):
                continue
            try:  # !function hooks read as names: the hf backend decides what it runs
                raw = read_task_yaml(text)
            except Exception:  # not YAML we can read
                continue
            if not isinstance(raw, dict):
                continue
            if raw.get("task") == name:
                found[name] = _Found(f)
            elif raw.get("group") == name and isinstance(raw.get("task"), list):
                members = tuple(t if isinstance(t, str) else str(t.get("task"))
                                for t in raw["task"])
                found[name] = _Found(f, members)
                pending |= {m for m in members if m not in found}
            else:
                continue
            break
    return found


def _metric(metric: str) -> str:
    """lm-eval's ``metric,filter`` as our metric name (``acc,none`` -> ``acc``)."""
    name, _, flt = metric.partition(",")
    return name if flt in ("", "none") else f"{name},{flt}"


def _evaluator(config: EvolveConfig, opts: dict[str, Any], base_dir: str | Path | None,
               where: str, warnings: list[str]) -> dict[str, Any]:
    from mergesearch.evaluation.tasks import load_suite

    base = None if base_dir is None else Path(base_dir)
    search = opts["task_search_path"] if opts["task_search_path"] is not None \
        else config.task_search_path
    paths = _search_paths(search, base)
    tasks = [t for t in config.tasks if t.weight != 0]
    for i, t in enumerate(config.tasks):
        if t.weight == 0:
            warnings.append(f"tasks.{i} ({t.name}): weight 0 leaves the score unchanged; not "
                            "scored")
    if not tasks:
        raise EvolveConfigError(f"{where}: tasks: every task has weight 0; give one a weight")
    found = _index(paths, {t.name for t in tasks})
    missing = [t.name for t in tasks if t.name not in found]
    if missing:
        raise EvolveConfigError(
            f"{where}: tasks {missing}: no lm-eval task YAML of that name under "
            f"{', '.join(map(str, paths))} (mergekit-evolve finds registry tasks through "
            "lm-eval; here a task needs its YAML and local data on disk): point at their "
            "folder with --set task_search_path=DIR (mergekit-evolve's --task-search-path) "
            "or a task_search_path: key in the config")
    groups = {n: f for n, f in found.items() if f.members}
    for g, f in groups.items():
        nested = [m for m in f.members if m in groups or m not in found]
        if nested:
            raise EvolveConfigError(f"{where}: group {g!r} ({f.path}): members {nested} are "
                                    "groups or have no task YAML here; list plain tasks")
    leaf = list(dict.fromkeys(m for t in tasks for m in (found[t.name].members or (t.name,))))
    files = [found[n].path for n in leaf]
    suite = Path(os.path.commonpath([str(f.parent) for f in files]))
    try:
        specs = load_suite(suite)
    except Exception as err:  # EvaluationError: a task of the folder the hf backend refuses
        raise EvolveConfigError(f"{where}: the tasks' folder {suite} is the suite, and it "
                                f"does not load: {err}") from None
    objectives = _objectives(tasks, found, specs, where, warnings)
    if config.num_fewshot:
        warnings.append(f"num_fewshot: {config.num_fewshot}: not mapped: the hf backend scores "
                        "zero-shot")
    if config.apply_chat_template:
        warnings.append("apply_chat_template: true (mergekit-evolve's default): not mapped: "
                        "prompts are scored as the task writes them, without a chat template")
    if config.limit is not None and not config.shuffle:
        warnings.append(f"limit: {config.limit}: each task's {config.limit} items are a seeded "
                        "sample here (the same for every trial), not the first ones")
    evaluator: dict[str, Any] = {"backend": "hf", "suite": str(suite), "tasks": leaf,
                                 "objectives": objectives}
    if config.limit is not None:
        evaluator["limit"] = config.limit
    if opts["batch_size"] is not None:
        evaluator["batch_size"] = opts["batch_size"]
    return evaluator


def _objectives(tasks: list[TaskConfig], found: dict[str, _Found], specs: dict[str, Any],
                where: str, warnings: list[str]) -> list[dict[str, Any]]:
    """mergekit-evolve's score, sum of weight * metric over the tasks, as objectives."""
    for i, t in enumerate(tasks):
        metric = _metric(t.metric)
        for member in found[t.name].members or (t.name,):
            known = specs[member].metrics
            if metric not in known:
                raise EvolveConfigError(
                    f"{where}: tasks.{i}.metric {t.metric!r}: task {member!r} "
                    f"({specs[member].output_type}) gives {', '.join(known)}; use one of those "
                    f"(as lm-eval names them, e.g. {known[0]},none)")
    one = len({(_metric(t.metric), t.weight) for t in tasks}) == 1 and \
        not any(found[t.name].members for t in tasks)
    if one:  # the mean over the tasks: mergekit-evolve's sum divided by their count
        names = list(dict.fromkeys(t.name for t in tasks))
        return [{"name": "score", "metric": _metric(tasks[0].metric), "tasks": names,
                 "direction": "maximize" if tasks[0].weight > 0 else "minimize"}]
    out: list[dict[str, Any]] = []
    for t in tasks:
        name = t.name if all(o["name"] != t.name for o in out) else f"{t.name}:{t.metric}"
        members = list(found[t.name].members) or [t.name]
        out.append({"name": name, "metric": _metric(t.metric), "tasks": members,
                    "direction": "maximize" if t.weight > 0 else "minimize",
                    "weight": abs(t.weight)})
        if found[t.name].members:
            warnings.append(f"tasks ({t.name}): a group: scored as the mean of its tasks' "
                            f"{_metric(t.metric)}, each task counted alike")
    return out


def _number(value: Any, key: str, *, positive: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EvolveConfigError(f"--set {key}={value!r}: expected a number") from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise EvolveConfigError(f"--set {key}={value!r}: expected a positive number")
    return number


def _name(path: Path) -> str:
    """The experiment name from the file name: letters, digits, '_', '-' and '.'."""
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "-", path.stem).lstrip(".") or "evolve"
    return stem
