"""Reading configuration files: strict YAML and JSON, and validation errors in one line.

Every file mergesearch reads (experiments, search spaces, recipes, mergekit configs,
sweeps, evaluation task YAML) goes through :func:`load_yaml` or :func:`load_json`, which
refuse a key given twice (PyYAML and ``json`` keep the last one silently, so
``{rev: a, rev: b}`` would drop an entry); pydantic's errors are reported by
:func:`format_validation_error`, one line per problem, each naming its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last one silently, so ``{rev: a, rev: b}`` would drop an entry)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<:`` merges may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} is given twice; keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys: every YAML mergesearch reads goes
    through here."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def load_json(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys (``ValueError``)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"key {twice[0]!r} is given twice; keep one")
        return dict(items)

    return json.loads(text, object_pairs_hook=pairs)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line: where, then what."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + problem


def read_yaml_mapping(path: str | Path, error: type[Exception], what: str = "file") -> dict:
    """The mapping at the top of a YAML file (JSON for a ``.json`` file), or ``error`` with
    one line saying what is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
        data = load_json(text) if path.suffix == ".json" else load_yaml(text)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory, not a {what}") from None
    except OSError as err:
        raise error(f"{what} {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path}: not a text file") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    except ValueError as err:  # JSON
        raise error(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level")
    return data


def format_validation_error(err: ValidationError, what: str) -> str:
    """One readable line per problem, each naming its path in the document."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not _is_union_tag(p))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = "expected a mapping"
        lines.append(f"{what}.{loc}: {msg}" if loc else f"{what}: {msg}")
    return "; ".join(dict.fromkeys(lines))


def _is_union_tag(part: Any) -> bool:
    """Pydantic puts union member names (``list[float]``, ``bool``) into error paths."""
    return isinstance(part, str) and ("[" in part or part in {"bool", "float", "int"})
