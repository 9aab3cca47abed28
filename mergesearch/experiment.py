"""Experiment files: models + search space + strategy + evaluator + budget, validated.

An experiment is one YAML file (``experiments/*.yaml``).  Every section is a
typed model that rejects unknown keys; errors name their path in the file.
``--set dotted.key=value`` overrides are applied to the raw mapping before
validation, so they are checked like the file itself.

Relative paths (search space files, evaluation suites, local models) are
looked up in the current directory, then in the experiment file's folder and
its parents.  Model references ``zoo:base`` and ``zoo:<skill>`` name the
built-in tiny model zoo, built on first use.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from mergesearch.configs import format_validation_error, load_yaml, read_yaml_mapping
from mergesearch.errors import MergesearchError
from mergesearch.evaluation import EvaluatorConfig
from mergesearch.recipe import Dtype

_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def check_name(name: str) -> str:
    """A name that becomes a folder name (``runs/<name>``): no separators, no leading dot
    (so never ``.`` or ``..``, which would put the run outside ``runs/``)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a usable name: use letters, digits, '_', '-' and "
                         "'.', not starting with '.' (it names the run folder)")
    return name


Name = Annotated[str, AfterValidator(check_name)]


class ExperimentError(MergesearchError, ValueError):
    """An experiment file (or an override) is invalid; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelsConfig(_Strict):
    """The base model and the source models to merge, by short name.

    Without ``loader`` they are HF causal LMs (folders, hub ids, zoo names); with
    ``loader: "package.module:function"`` each reference, a path or any string, is
    passed to ``function(ref) -> (torch.nn.Module, state_dict)`` (any torch model).
    """

    base: str | None = Field(None, description="local path, hub id or zoo:base")
    sources: dict[str, str] = Field(min_length=1, description="name -> path, hub id or zoo:<skill>")
    loader: str | None = Field(None, pattern=r"^[\w.]+:[\w.]+$", description="package.module:"
                               "function giving (module, state_dict) for each reference")
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @model_serializer(mode="wrap")
    def _dump_models(self, handler: SerializerFunctionWrapHandler) -> dict:
        """No loader is left out, so HF models dump (and fingerprint studies) as before."""
        data = handler(self)
        if data.get("loader") is None:
            data.pop("loader", None)
        return data

    @field_validator("sources", mode="before")
    @classmethod
    def _list_to_names(cls, value: Any) -> Any:
        if isinstance(value, list):  # a plain list: names from the last path component
            names = [re.split(r"[/:]", str(v).rstrip("/"))[-1] for v in value]
            if len(set(names)) != len(names):
                raise ValueError("source names clash: give sources as a mapping name: path")
            return dict(zip(names, value, strict=True))
        return value


class StrategyConfig(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


_UNITS = {"s": 1, "m": 60, "h": 3600}


class BudgetConfig(_Strict):
    """When the search stops: after ``evaluations`` trials, ``wall_time`` and/or ``cost``
    (evaluation items scored by trials and probes together, so cheap low-fidelity
    candidates and probes are counted for what they cost)."""

    evaluations: StrictInt | None = Field(None, ge=1)
    wall_time: StrictFloat | None = Field(None, gt=0,
                                          description="seconds, or a string like 10m, 2h")
    cost: StrictFloat | None = Field(None, gt=0, description="items scored, all tasks together")

    @field_validator("wall_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", value)
            if not m:
                raise ValueError(f"not a duration: {value!r} (use e.g. 90, 30m, 2h)")
            return float(m.group(1)) * _UNITS[m.group(2) or "s"]
        return value

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if self.evaluations is None and self.wall_time is None and self.cost is None:
            raise ValueError("set evaluations, wall_time and/or cost")
        return self


class ExecutionConfig(_Strict):
    """Where candidates are merged and scored: in this process, or on a Ray actor pool."""

    backend: Literal["local", "ray"] = "local"
    device: str = Field("cpu", description="cpu, cuda, cuda:1 ...; Ray GPU workers use cuda")
    dtype: Dtype | None = Field(
        None, description="dtype of the resident model; default: the recipe's")
    hold_sources: Literal["auto", "device", "host"] = Field(
        "auto", description="where workers keep the source models: device, host (pinned CPU "
        "memory, copied to the GPU per tensor while merging), or auto (device if they fit)")
    address: str = Field("local", description="Ray: local (a private cluster), auto (the one "
                         "`ray start` runs here), or ray://host:port")
    workers: StrictInt = Field(1, ge=1,
                               description="Ray: worker actors, each with the models loaded")
    cpus_per_worker: StrictFloat = Field(1.0, gt=0)
    gpus_per_worker: StrictFloat = Field(0.0, ge=0, description="fractions share a GPU")
    queue: StrictInt = Field(0, ge=0, description="Ray: candidates queued per worker beyond "
                             "the one it runs (hides dispatch latency on fast evaluations)")
    max_retries: StrictInt = Field(2, ge=0, description="Ray: re-runs of a candidate whose "
                                   "worker died, before it is recorded as failed")
    start_timeout: float = Field(600.0, gt=0, description="Ray: seconds a worker may take to "
                                 "start and load its models; a replacement that cannot start "
                                 "in time is given up (its node lost, no room elsewhere)")
    worker_class: str | None = Field(None, description="module:Class of a Worker subclass to "
                                     "run instead of the default (an extension point)")

    @model_validator(mode="after")
    def _ray_only(self) -> ExecutionConfig:
        if self.backend == "local":
            used = [k for k in ("workers", "gpus_per_worker", "queue")
                    if getattr(self, k) != type(self).model_fields[k].default]
            if used:
                raise ValueError(f"{', '.join(used)} need backend: ray")
        return self


class StageConfig(_Strict):
    """One search of a staged experiment; what it leaves out comes from the experiment."""

    name: Name
    space: str | dict[str, Any] | None = None
    strategy: StrategyConfig | None = None
    budget: BudgetConfig | None = None
    sources_from: dict[str, str] = Field(
        default_factory=dict, description="new source name -> an earlier stage, whose chosen "
        "trial (the best by the objectives' weights) joins the models, rebuilt from its recipe")


class Experiment(_Strict):
    """A whole search, as written in an experiment file (or several, in ``stages``)."""

    name: Name
    description: str = ""
    models: ModelsConfig
    space: str | dict[str, Any] | None = Field(
        None, description="a search_spaces/ file or an inline space")
    strategy: StrategyConfig | None = None
    evaluator: EvaluatorConfig
    report: dict[str, Any] | None = Field(
        None, description="evaluator fields that score the chosen trial once more, on "
        "report items the search never sees (e.g. {suite: evaluators/hard/report})")
    budget: BudgetConfig
    stages: list[StageConfig] | None = Field(
        None, min_length=1, description="searches run in order, each its own study "
        "(<study>.<stage>); a later one may merge with an earlier one's chosen trial")
    execution: ExecutionConfig = ExecutionConfig()
    storage: str | None = Field(
        None, description="SQLAlchemy URL; default: sqlite file study.db in the run folder")
    output: str | None = Field(None, min_length=1, description="run folder; default runs/<name>")
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _report_is_an_evaluator(self) -> Experiment:
        if self.report is not None:
            if not self.report:
                raise ValueError("report: give the evaluator fields that differ on the report "
                                 "items (e.g. suite: ...), or leave report out")
            self.report_evaluator()  # raises on fields an evaluator does not take
        return self

    def report_evaluator(self) -> EvaluatorConfig | None:
        """The evaluator of the report items: the search's with ``report``'s fields."""
        if self.report is None:
            return None
        data = self.evaluator.model_dump(mode="json", exclude_none=True) | self.report
        try:
            return EvaluatorConfig.model_validate(data)
        except ValidationError as err:
            raise ValueError(format_validation_error(err, "report").removeprefix("report: ")
                             ) from None

    def report_experiment(self) -> Experiment | None:
        """This experiment scoring on the report items (None without ``report``)."""
        if self.report is None:
            return None
        data = self.model_dump(mode="json", exclude={"report"})
        data["evaluator"] = self.report_evaluator().model_dump(mode="json")
        exp = Experiment.from_dict(data, where="report")
        exp._file = self._file
        return exp

    @model_validator(mode="after")
    def _space_and_strategy(self) -> Experiment:
        if self.stages is None:
            missing = [k for k in ("space", "strategy") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} missing (or give stages)")
            return self
        names = [st.name for st in self.stages]
        for i, st in enumerate(self.stages):
            if names.index(st.name) != i:
                raise ValueError(f"stages: {st.name!r} is named twice")
            for k in ("space", "strategy"):
                if getattr(st, k) is None and getattr(self, k) is None:
                    raise ValueError(f"stages.{i}.{k}: missing (and no top-level {k})")
            for source, earlier in st.sources_from.items():
                if earlier not in names[:i]:
                    raise ValueError(f"stages.{i}.sources_from.{source}: {earlier!r} is not an "
                                     f"earlier stage ({', '.join(names[:i]) or 'none'})")
                if source in self.models.sources:
                    raise ValueError(f"stages.{i}.sources_from.{source}: a source of that "
                                     "name exists already")
        return self

    def stage(self, index: int, extra_sources: dict[str, str] | None = None) -> Experiment:
        """Stage ``index`` as an experiment of its own (its sources plus ``extra_sources``)."""
        st = self.stages[index]
        data = self.model_dump(mode="json", exclude={"stages"})
        data |= {"space": st.space if st.space is not None else self.space,
                 "strategy": (st.strategy or self.strategy).model_dump(mode="json"),
                 "budget": (st.budget or self.budget).model_dump(mode="json")}
        data["models"]["sources"] = {**self.models.sources, **(extra_sources or {})}
        exp = Experiment.from_dict(data, where=f"stages.{index}")
        exp._file = self._file
        return exp

    # Fields that may change when a study is resumed (everything else must match).
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = ("budget", "execution", "storage", "output",
                                          "description", "report")

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "experiment") -> Experiment:
        if not isinstance(data, dict):
            raise ExperimentError(f"{where}: expected a mapping at the top level")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ExperimentError(format_validation_error(err, where)) from None

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
        """Read an experiment file, apply ``dotted.key=value`` overrides, validate."""
        path = Path(path)
        data = read_yaml_mapping(path, ExperimentError, "experiment file")
        if "genome" in data and "tasks" in data:  # mergekit_evolve.is_evolve_config
            from mergesearch.mergekit_evolve import experiment_from_evolve_config

            return experiment_from_evolve_config(path, overrides, data=data)
        for item in overrides:
            apply_override(data, item)
        exp = cls.from_dict(data, where=str(path))
        exp._file = path.resolve()
        exp.check_paths(where=str(path))
        return exp

    def check_paths(self, *, where: str = "experiment") -> None:
        """Refuse places the run cannot write: a run folder under a regular file, or an
        explicit SQLite storage whose folder is missing (a typo would otherwise create a
        new, empty study somewhere unexpected; the default run-folder storage is made)."""
        for parent in [self.run_dir, *self.run_dir.parents]:
            if parent.exists():
                if not parent.is_dir():
                    raise ExperimentError(f"{where}: output: {parent} is a file, not a "
                                          "directory; choose another run folder")
                break
        db = sqlite_path(self.storage) if self.storage else None
        if db is not None and not db.parent.is_dir():
            raise ExperimentError(
                f"{where}: storage: the folder {db.parent} of {self.storage} does not exist; "
                "create it, or fix the URL (or leave storage out for runs/<name>/study.db)")

    # where relative paths are looked up (set by load; cwd only for in-code experiments)
    _file: Path | None = None

    @property
    def search_dirs(self) -> list[Path]:
        dirs = [Path.cwd()]
        if self._file is not None:
            dirs += [self._file.parent, *self._file.parent.parents]
        return dirs

    def find(self, ref: str | Path) -> Path | None:
        """A relative path looked up in :attr:`search_dirs`; absolute paths as given."""
        ref = Path(ref).expanduser()
        if ref.is_absolute():
            return ref if ref.exists() else None
        for d in self.search_dirs:
            if (d / ref).exists():
                return (d / ref).resolve()
        return None

    @property
    def run_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.run_dir / 'study.db').as_posix()}"

    def fingerprint(self) -> dict[str, Any]:
        """The parts that define the search (must match when resuming)."""
        data = self.model_dump(mode="json")
        for key in self.RESUMABLE_CHANGES:
            data.pop(key, None)
        return data


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (``None``: not SQLite, or in memory)."""
    head, sep, rest = url.partition(":///")
    if not sep or not head.startswith("sqlite") or rest in ("", ":memory:"):
        return None
    return Path(rest.split("?")[0])


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested mapping; the value is parsed as YAML.  A list is
    entered by index or by the ``name`` of one of its mappings (``stages.dfs.budget``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ExperimentError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = load_yaml(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = _list_item(node, part, key, ".".join(parts[:i]))
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict | list):
            raise ExperimentError(f"--set {key}: {where} is not a mapping")
        node = child
    if isinstance(node, list):
        raise ExperimentError(f"--set {key}: {'.'.join(parts[:-1])} is a list: name one of "
                              "its items (by index or name), then the field to set")
    node[parts[-1]] = value


def _list_item(items: list, part: str, key: str, where: str) -> dict[str, Any]:
    """The item of a list an override names: by index, or by its ``name``."""
    named = [x for x in items if isinstance(x, dict) and x.get("name") == part]
    if named:
        return named[0]
    if part.lstrip("-").isdigit() and -len(items) <= int(part) < len(items) and \
            isinstance(items[int(part)], dict):
        return items[int(part)]
    names = [str(x["name"]) for x in items if isinstance(x, dict) and "name" in x]
    raise ExperimentError(f"--set {key}: {where} has no item {part!r} (give an index below "
                          f"{len(items)}" + (f" or a name: {', '.join(names)})" if names else ")"))

