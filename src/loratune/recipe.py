"""YAML recipes for frozen config dataclasses, with command-line overrides and errors that say where.

A recipe is a YAML mapping whose keys are the fields of a config dataclass (a nested dataclass field, such as
``lora:``, is a nested mapping). Every field can be overridden on the command line as ``--field value`` or
``--section.field value``. An unknown key is an error that names ``file:line`` and suggests the nearest valid key.
Field help comes from the docstring written under each field in the dataclass source.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A bad recipe or override: one line naming file:line (or the flag), the field and what is valid."""


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each field of a dataclass: ``{field: first line of its doc}``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _nested(cls: type) -> dict[str, type]:
    """Fields whose type is itself a dataclass (e.g. ``lora: LoraConfig``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints.get(f.name))}


def _suggest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(valid))}"


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a recipe file: (data, {dotted key: line number}). Errors carry file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe must be a mapping of option: value")
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return data, lines


def build(cls: type, data: dict[str, Any], source: str = "<recipe>", lines: dict[str, int] | None = None,
          prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping; unknown keys and invalid values name where they came from."""
    lines = lines or {}
    names = [f.name for f in dataclasses.fields(cls)]
    nested = _nested(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        where = f"{source}:{lines[dotted]}" if dotted in lines else source
        if key not in names:
            raise RecipeError(f"{where}: unknown key '{dotted}'{_suggest(str(key), names)}")
        if key in nested:
            if value is None:
                continue
            if dataclasses.is_dataclass(value):
                kwargs[key] = value
                continue
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: '{dotted}' must be a mapping of {nested[key].__name__} fields")
            kwargs[key] = build(nested[key], value, source, lines, prefix=f"{dotted}.")
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        bad = next((k for k in kwargs if f"{k} " in str(err) or f".{k}" in str(err)), None)
        dotted = f"{prefix}{bad}" if bad else None
        where = f"{source}:{lines[dotted]}" if dotted and dotted in lines else source
        raise RecipeError(f"{where}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain data (tuples → lists), suitable for YAML."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[f.name] = value
    return out


def dump_yaml(config: Any) -> str:
    """The complete recipe for ``config``: every field, each with its doc as a comment."""
    lines: list[str] = []

    def emit(cfg: Any, indent: str) -> None:
        docs = field_docs(type(cfg))
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if docs.get(f.name):
                lines.append(f"{indent}# {docs[f.name]}")
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                emit(value, indent + "  ")
            else:
                plain = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value
                rendered = yaml.safe_dump({f.name: plain}, default_flow_style=True, sort_keys=False, width=1000).strip()
                lines.append(f"{indent}{rendered[1:-1] if rendered.startswith('{') else rendered}")

    emit(config, "")
    return "\n".join(lines) + "\n"


# -- command-line overrides -------------------------------------------------------------------------------------
def _flag_type(tp: Any) -> tuple[Any, str]:
    """How to parse a flag for a field annotation: (converter, metavar)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if tp is bool:
        return _parse_bool, "BOOL"
    if tp is int:
        return int, "INT"
    if tp is float:
        return float, "FLOAT"
    if tp is str:
        return str, "STR"
    return yaml.safe_load, "YAML"  # lists, dicts, unions: parse the flag value as YAML (e.g. "[q_proj, v_proj]")


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_override_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", aliases: bool = True) -> None:
    """Add ``--field`` (and ``--section.field``) flags for every field of ``cls``, each defaulting to 'not given'."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    nested = _nested(cls)
    group = parser.add_argument_group(f"{cls.__name__} options" + (f" ({prefix.rstrip('.')})" if prefix else ""))
    for f in dataclasses.fields(cls):
        if f.name in nested:
            add_override_flags(parser, nested[f.name], prefix=f"{prefix}{f.name}.", aliases=aliases)
            continue
        conv, metavar = _flag_type(hints[f.name])
        flags = [f"--{prefix}{f.name}"]
        if aliases:
            short = f"--{f.name.replace('_', '-')}"
            if short not in parser._option_string_actions and short not in flags:
                flags.insert(0, short)
        if any(flag in parser._option_string_actions for flag in flags):
            continue
        group.add_argument(*flags, dest=f"override:{prefix}{f.name}", type=conv, metavar=metavar,
                           default=argparse.SUPPRESS, help=docs.get(f.name, ""))


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--field`` values the user gave, as a nested mapping ready to merge into a recipe."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith("override:"):
            continue
        node = out
        *parents, leaf = key[len("override:"):].split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (nested mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
