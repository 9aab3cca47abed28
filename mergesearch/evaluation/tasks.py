"""lm-eval task YAMLs (a subset of the 0.4 format), read without importing lm-eval.

Supported: ``task``, ``include``, ``dataset_path: json`` with ``dataset_kwargs.data_files``,
``test_split`` / ``validation_split``, ``output_type`` ``generate_until`` or
``multiple_choice``, Jinja templates in ``description`` / ``doc_to_text`` /
``doc_to_target`` / ``doc_to_choice`` (rendered by jinja2 in a sandbox, as lm-eval
does), ``target_delimiter``, ``generation_kwargs`` (``until`` / ``max_gen_toks``; the
rest is kept for backends that sample), ``filter_list``
(``regex``, ``take_first``, ``lowercase``, ``uppercase``, ``remove_whitespace`` and our
``last_number``) and the ``exact_match`` options of ``metric_list``; our own addition, a
``metric_list`` entry ``{metric: <name>, scorer: "package.module:function"}``, scores each
generation with that function (:mod:`mergesearch.evaluation.scorers`). Python hooks
(``!function``, ``process_docs``) and few-shot contexts are refused with a clear error.
"""

from __future__ import annotations

import ast
import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mergesearch.configs import _StrictLoader

from .base import EvaluationError

OutputType = Literal["generate_until", "multiple_choice"]
Filter = Callable[[str], str]

#: Metrics each output type produces (generate_until adds ``exact_match,<filter name>``).
METRICS: dict[str, tuple[str, ...]] = {
    "generate_until": ("char_accuracy", "answer_logprob", "greedy_match", "exact_match"),
    "multiple_choice": ("acc", "acc_norm"),
}
FILTERS = ("regex", "take_first", "last_number", "lowercase", "uppercase", "remove_whitespace")
_REFUSED_KEYS = ("process_docs", "process_results", "use_prompt", "doc_to_image",
                 "doc_to_audio", "custom_dataset")
_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
#: The lm-eval task class of our zoo suites (``class: !function utils.TokenScoredTask``,
#: a copy of mergesearch/evaluation/lm_eval_task.py): it gives lm-eval the metrics this
#: reader's backends compute themselves, so here it is accepted and ignored.
OUR_TASK_CLASS = "TokenScoredTask"


class _Hook(str):
    """A ``!function`` reference in a task YAML: its dotted name, never imported here."""


class _TaskLoader(_StrictLoader):
    """Our strict YAML loader, reading ``!function`` tags as :class:`_Hook` names."""


_TaskLoader.add_constructor("!function",
                            lambda loader, node: _Hook(loader.construct_scalar(node)))


def read_task_yaml(text: str) -> Any:
    """A task file's YAML as data: duplicate keys refused, ``!function`` tags kept as
    their dotted names (never imported)."""
    return yaml.load(text, Loader=_TaskLoader)  # noqa: S506 (a SafeLoader)


@dataclass(frozen=True)
class Rendered:
    """One document as the model sees it: the context, and the target or the choices."""

    context: str
    target: str = ""  # generate_until
    choices: tuple[str, ...] = ()  # multiple_choice
    gold: int = -1  # multiple_choice: index of the right choice


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: where its documents are and how to turn them into requests."""

    name: str
    path: Path  # the task YAML
    output_type: OutputType
    data_files: tuple[Path, ...]
    doc_to_text: Any
    doc_to_target: Any
    doc_to_choice: Any = None
    description: str = ""
    target_delimiter: str = " "
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    filters: dict[str, tuple[Filter, ...]] = field(default_factory=dict)  # pipeline -> steps
    ignore_case: bool = False
    ignore_punctuation: bool = False
    regexes_to_ignore: tuple[str, ...] = ()
    # metric name -> "package.module:function", a custom scorer of the generations
    # (metric_list entries with ``scorer:``; see mergesearch.evaluation.scorers)
    scorers: dict[str, str] = field(default_factory=dict)
    generation_kwargs: dict[str, Any] = field(default_factory=dict)  # as the YAML gives them

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric this task can produce."""
        named = tuple(f"exact_match,{n}" for n in self.filters if n)
        named += tuple(self.scorers)
        return METRICS[self.output_type] + (named if self.output_type == "generate_until" else ())

    def docs(self) -> list[dict[str, Any]]:
        """The documents of the evaluation split, in file order (JSON lines or a JSON list)."""
        docs: list[dict[str, Any]] = []
        for path in self.data_files:
            text = path.read_text()
            try:
                if text.lstrip().startswith("["):
                    docs += json.loads(text)
                else:
                    docs += [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise EvaluationError(f"{path} (data of task {self.name!r}) is not JSON lines "
                                      f"or a JSON list: {err}") from err
        if not docs or not all(isinstance(d, dict) for d in docs):
            raise EvaluationError(f"{', '.join(map(str, self.data_files))} (data of task "
                                  f"{self.name!r}) must hold at least one JSON object per line")
        return docs

    def render(self, doc: Mapping[str, Any], index: int = 0) -> Rendered:
        """Apply the templates to one document (``index`` only names it in errors)."""
        try:
            context = self.description and str(_render(self.description, doc))
            context += str(_render(self.doc_to_text, doc))
            target = _render(self.doc_to_target, doc)
            if self.output_type == "generate_until":
                return Rendered(context, target=str(target))
            choices = tuple(map(str, self._choices(doc)))
            return Rendered(context, choices=choices, gold=self._gold(target, choices))
        except (TemplateError, ValueError, SyntaxError, TypeError) as err:
            raise EvaluationError(f"task {self.name!r} ({self.path}), item {index}: {err}; fix "
                                  "the task's doc_to_* templates or the data") from err

    def _choices(self, doc: Mapping[str, Any]) -> list[Any]:
        spec = self.doc_to_choice
        if isinstance(spec, list):
            return spec
        if isinstance(spec, dict):
            return list(spec.values())
        value = _render(spec, doc)
        choices = ast.literal_eval(value) if isinstance(value, str) else value
        if not isinstance(choices, list | tuple) or not choices:
            raise ValueError(f"doc_to_choice gave {choices!r}, not a non-empty list")
        return list(choices)

    @staticmethod
    def _gold(target: Any, choices: tuple[str, ...]) -> int:
        if isinstance(target, str):
            target = int(target) if target.strip().isdigit() else target
        if isinstance(target, str):
            if target not in choices:
                raise ValueError(f"target {target!r} is neither an index nor one of {choices}")
            return choices.index(target)
        if not isinstance(target, int) or not 0 <= target < len(choices):
            raise ValueError(f"target {target!r} is not an index into {len(choices)} choices")
        return target

    def filtered(self, text: str) -> dict[str, str]:
        """``text`` through every filter pipeline (``""``: no filter_list in the YAML)."""
        out = {}
        for name, steps in (self.filters or {"": ()}).items():
            value = text
            for step in steps:
                value = step(value)
            out[name] = value
        return out

    def matches(self, prediction: str, target: str) -> bool:
        """lm-eval's ``exact_match`` (with this task's options), after stripping both."""
        return self._normalise(prediction) == self._normalise(target)

    def _normalise(self, text: str) -> str:
        for pattern in self.regexes_to_ignore:
            text = re.sub(pattern, "", text)
        if self.ignore_case:
            text = text.lower()
        if self.ignore_punctuation:
            text = text.translate(str.maketrans("", "", string.punctuation))
        return text.strip()


def load_suite(path: str | Path) -> dict[str, TaskSpec]:
    """Every task YAML under ``path`` (recursively), by task name.

    Group files (``task:`` a list, e.g. ``zoo.yaml``) and templates without ``task:`` are
    skipped. Relative data files resolve against the YAML's folder, each parent of it,
    then the current directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise EvaluationError(f"evaluation suite {root} is not a directory; set evaluator.suite "
                              "to a folder of lm-eval task YAMLs (e.g. evaluators/zoo)")
    tasks: dict[str, TaskSpec] = {}
    for file in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
        raw = _read_yaml(file)
        if not isinstance(raw.get("task"), str):
            continue
        spec = _parse(raw, file)
        if spec.name in tasks:
            raise EvaluationError(f"task {spec.name!r} is defined twice, in {tasks[spec.name].path}"
                                  f" and {file}; rename one of them")
        tasks[spec.name] = spec
    if not tasks:
        raise EvaluationError(f"evaluation suite {root} holds no task YAML (a file with "
                              "`task: <name>`); point evaluator.suite at a folder of lm-eval tasks")
    return tasks


def find_suite(suite: str | Path, base_dir: str | Path | None = None) -> Path:
    """``suite`` as given if absolute, else against ``base_dir``, its parents, then the cwd."""
    suite = Path(suite).expanduser()
    if suite.is_absolute():
        return suite
    bases = [Path(base_dir).resolve(), *Path(base_dir).resolve().parents] if base_dir else []
    for base in [*bases, Path.cwd()]:
        if (base / suite).is_dir():
            return base / suite
    where = f"{base_dir}, its parent folders or " if base_dir else ""
    raise EvaluationError(f"evaluation suite {suite} is not a directory in {where}the current "
                          f"directory {Path.cwd()}; fix evaluator.suite")


def _read_yaml(path: Path, depth: int = 0) -> dict[str, Any]:
    try:
        # duplicate keys refused, like every file we read; !function read as a name
        raw = read_task_yaml(path.read_text())
    except yaml.YAMLError as err:
        hint = ("; `!function` hooks run Python from the task file, which the hf backend does "
                "not do: use templates instead" if "!function" in str(err) else "")
        raise EvaluationError(f"{path} is not a task YAML the hf backend can read: "
                              f"{err}{hint}") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EvaluationError(f"{path} must hold a YAML mapping (a task), not {type(raw).__name__}")
    include = raw.pop("include", None)
    if include:
        if depth > 8:
            raise EvaluationError(f"{path}: `include` nests too deep (a cycle?)")
        inc = path.parent / include
        if not inc.is_file():
            raise EvaluationError(f"{path} includes {include}, which does not exist next to it")
        raw = {**_read_yaml(inc, depth + 1), **raw}
    return raw


def _parse(raw: dict[str, Any], path: Path) -> TaskSpec:
    name = raw["task"]

    def fail(problem: str) -> EvaluationError:
        return EvaluationError(f"task {name!r} ({path}): {problem}")

    refused = [k for k in _REFUSED_KEYS if k in raw]
    if refused:
        raise fail(f"uses {refused}, which the hf backend does not support; remove them")
    cls = raw.get("class")
    if cls is not None and not (isinstance(cls, _Hook)
                                and cls.rsplit(".", 1)[-1] == OUR_TASK_CLASS):
        raise fail(f"class {cls!r} is a Python task class, which the hf backend does not run; "
                   f"only utils.{OUR_TASK_CLASS} (lm-eval's side of our metrics) is accepted")
    hooked = [k for k, v in raw.items() if k != "class" and _has_hook(v)]
    if hooked:
        raise fail(f"{hooked} use `!function` hooks, which run Python from the task file; "
                   "the hf backend does not: use templates instead")
    if int(raw.get("num_fewshot") or 0) > 0 or int(raw.get("repeats") or 1) > 1:
        raise fail("few-shot contexts and repeats are not supported by the hf backend; "
                   "set num_fewshot: 0 and repeats: 1")
    output_type = raw.get("output_type", "generate_until")
    if output_type not in METRICS:
        raise fail(f"output_type {output_type!r} is not supported; use one of {list(METRICS)}")
    if output_type == "multiple_choice" and raw.get("doc_to_choice") is None:
        raise fail("a multiple_choice task needs doc_to_choice")
    for key in ("doc_to_text", "doc_to_target"):
        if raw.get(key) is None:
            raise fail(f"{key} is missing")
    gen = raw.get("generation_kwargs") or {}
    until = gen.get("until", [])
    exact = next((m for m in raw.get("metric_list") or [] if m.get("metric") == "exact_match"), {})
    return TaskSpec(
        name=name,
        path=path,
        output_type=output_type,
        data_files=_data_files(raw, path, fail),
        doc_to_text=raw["doc_to_text"],
        doc_to_target=raw["doc_to_target"],
        doc_to_choice=raw.get("doc_to_choice"),
        description=raw.get("description") or "",
        target_delimiter=raw.get("target_delimiter", " "),
        until=tuple([until] if isinstance(until, str) else until),
        max_gen_toks=int(gen.get("max_gen_toks", 256)),
        filters={f.get("name", f"filter{i}"): tuple(_filter(s, fail) for s in f.get("filter", []))
                 for i, f in enumerate(raw.get("filter_list") or [])},
        ignore_case=bool(exact.get("ignore_case", False)),
        ignore_punctuation=bool(exact.get("ignore_punctuation", False)),
        regexes_to_ignore=tuple(exact.get("regexes_to_ignore", ())),
        scorers=_scorers(raw, output_type, fail),
        generation_kwargs=dict(gen),
    )


def _scorers(raw: dict[str, Any], output_type: str, fail: Callable[[str], Exception]
             ) -> dict[str, str]:
    """The custom scorers of ``metric_list`` (``{metric: name, scorer: "module:function"}``)."""
    found: dict[str, str] = {}
    for entry in raw.get("metric_list") or []:
        if not isinstance(entry, dict) or "scorer" not in entry:
            continue
        name, path = entry.get("metric"), entry["scorer"]
        if output_type != "generate_until":
            raise fail(f"metric {name!r}: a custom scorer reads generations, so it needs "
                       "output_type: generate_until")
        if not isinstance(name, str) or not name or name in METRICS["generate_until"] \
                or name.startswith("exact_match") or name in found:
            raise fail(f"custom scorer {path!r} needs its own metric name (metric: <name>), "
                       f"not {name!r} (taken by a built-in metric or another scorer)")
        if not isinstance(path, str) or ":" not in path:
            raise fail(f"metric {name!r}: scorer must be 'package.module:function', not {path!r}")
        found[name] = path
    return found


def _has_hook(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_hook(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_hook(v) for v in value)
    return isinstance(value, _Hook)


def _data_files(raw: dict[str, Any], path: Path, fail: Callable[[str], Exception]
                ) -> tuple[Path, ...]:
    if raw.get("dataset_path") != "json":
        raise fail(f"dataset_path {raw.get('dataset_path')!r} is not supported by the hf backend "
                   "(no downloads); use dataset_path: json with dataset_kwargs.data_files")
    files = (raw.get("dataset_kwargs") or {}).get("data_files")
    split = raw.get("test_split") or raw.get("validation_split")
    if isinstance(files, dict):
        if split not in files and len(files) == 1 and split is None:
            split = next(iter(files))
        if split not in files:
            raise fail(f"split {split!r} is not among data_files {list(files)}; set test_split")
        files = files[split]
    if isinstance(files, str):
        files = [files]
    if not files:
        raise fail("dataset_kwargs.data_files is missing; name the JSON lines file(s)")
    return tuple(_find_data(str(f), path, fail) for f in files)


def _find_data(name: str, path: Path, fail: Callable[[str], Exception]) -> Path:
    file = Path(name).expanduser()
    if file.is_absolute():
        candidates = [file]
    else:
        folder = path.resolve().parent
        candidates = [base / file for base in (folder, *folder.parents, Path.cwd())]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise fail(f"data file {name!r} not found (looked next to the YAML, in its parent folders and "
               "in the current directory); fix dataset_kwargs.data_files")


def _filter(step: dict[str, Any], fail: Callable[[str], Exception]) -> Filter:
    fn = step.get("function")
    if fn == "regex":
        pattern = re.compile(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
        return partial(_regex, pattern, int(step.get("group_select", 0)),
                       step.get("fallback", "[invalid]"))
    if fn == "last_number":
        return partial(_regex, _LAST_NUMBER, -1, step.get("fallback", "[invalid]"))
    simple: dict[str, Filter] = {"take_first": lambda s: s, "lowercase": str.lower,
                                 "uppercase": str.upper, "remove_whitespace": str.lstrip}
    if fn not in simple:
        raise fail(f"filter function {fn!r} is not supported; use one of {list(FILTERS)}")
    return simple[fn]


def _regex(pattern: re.Pattern[str], group_select: int, fallback: str, text: str) -> str:
    """lm-eval's RegexFilter: the ``group_select``-th match (its first non-empty group)."""
    found = pattern.findall(text)
    if not found:
        return fallback
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def _render(template: Any, doc: Mapping[str, Any]) -> Any:
    """lm-eval's template rule: a field name gives the field, else a Jinja template's text."""
    if not isinstance(template, str):
        return template
    if template in doc:
        return doc[template]
    return _compile(template).render(**doc)


@lru_cache(maxsize=256)
def _compile(template: str) -> Any:
    return _ENV.from_string(template)
