"""Typed config trees: YAML + dotted overrides -> nested dataclasses, with strict key checking.

Every stage (prep, train, eval) describes its settings as a tree of dataclasses. Fields carry their
documentation as attribute docstrings (a string literal right after the field), which this module
reads back so `--dry-run` can print the resolved config with its help text, and so an unknown key
can be answered with the valid ones and what they mean.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from addpipe.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the config tree."""


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal that follows it}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _describe_valid(cls: type) -> str:
    docs = field_docs(cls)
    lines = [f"  {f.name}: {docs.get(f.name, '')}" for f in dataclasses.fields(cls)]
    return "\n".join(lines)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently convert) one value against its type annotation."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if value is None:
            return annotation()
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return build(annotation, value, where)
    if origin is Union or origin is types.UnionType:
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} fits none of {annotation}")
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_types = get_args(annotation)
        if origin is tuple and item_types and item_types[-1] is not Ellipsis:
            if len(item_types) != len(value):
                raise ConfigError(f"{where}: expected {len(item_types)} items, got {len(value)}")
            items = [_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
        else:
            item_type = item_types[0] if item_types else Any
            items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-5" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping, rejecting unknown keys with the list of valid ones.

    A tree whose shape depends on one of its own values (the training config grows the sections of the method it
    names) says so with a classmethod `variant(data) -> the class to build`."""
    variant = getattr(cls, "variant", None)
    if variant is not None:
        try:
            cls = variant(data)
        except (ValueError, TypeError) as error:
            raise ConfigError(str(error)) from error
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {', '.join(prefix + k for k in unknown)!s} in {cls.__name__}; "
            f"valid keys are:\n{_describe_valid(cls)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where or cls.__name__}: {error}") from error


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # brace patterns like {000..009} are not YAML; keep them as text
    if isinstance(value, (dict, set)) and "{" in raw:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load `cls` from a YAML file (optional) plus dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:  # the parser's own account names the line and column
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    apply_overrides(data, list(overrides or []))
    return build(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(config)


def to_yaml(config: Any, with_docs: bool = False) -> str:
    """The resolved config as YAML; with_docs adds each field's docstring as a comment."""
    if not with_docs:
        return yaml.safe_dump(to_dict(config), sort_keys=False)
    lines: list[str] = []

    def emit(node: Any, indent: int) -> None:
        docs = field_docs(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            doc = docs.get(f.name)
            if doc:
                for wrapped in textwrap.wrap(doc, 96 - indent):
                    lines.append(" " * indent + "# " + wrapped)
            if dataclasses.is_dataclass(value):
                lines.append(" " * indent + f"{f.name}:")
                emit(value, indent + 2)
            else:
                dumped = yaml.safe_dump({f.name: to_dict(value)}, default_flow_style=True, width=10**6)
                lines.append(" " * indent + dumped.strip().strip("{}"))

    emit(config, 0)
    return "\n".join(lines) + "\n"


def differences(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, before, after) for every leaf that differs between two config mappings (to_dict's shape)."""
    found = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found.extend(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            found.append((f"{prefix}{key}", a, b))
    return found
