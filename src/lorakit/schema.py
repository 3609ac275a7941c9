"""Typed dataclasses as the one schema for configuration files: build them from YAML mappings,
apply `key.sub=value` overrides, and print their reference (for `--help` and the README).

Each field's documentation is the string literal under it in the class body (an attribute
docstring), read from the source once, so the docs live next to the defaults and cannot drift.
A field with a fixed set of values is a `Literal` (possibly in a union with bool or None): the
dataclass checks it with `check_choices`, and the reference and the CLI's `choices` read the
values from the type, so they are written once. Unknown keys are errors that suggest the
closest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from typing import Any

import yaml

from .errors import ConfigError
from .files import read_text


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring} for a dataclass."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nested(tp: Any) -> type | None:
    """The dataclass a field holds, if it holds one."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _field_default(f: dataclasses.Field) -> Any:
    """A fresh default value of field `f` (None when it has none)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "", defaults: Any = None) -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields. Unknown keys
    are errors naming the closest valid key. Keys not given keep the values of `defaults` (an
    instance of `cls`; None: the class's own defaults). A nested section starts from its field's
    default, so a section whose default differs from its class's (the train config's `lora`) is
    built on the values that apply, the ones `reference` prints."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} ({data!r})")
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            path = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else \
                f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        path = f"{where}.{key}" if where else key
        sub = _nested(hints[key])
        kwargs[key] = from_dict(sub, value, path, _field_default(names[key])) if sub else \
            _coerce(hints[key], value, path)
    if defaults is not None:
        kwargs = {**{name: getattr(defaults, name) for name in names}, **kwargs}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Fit a YAML value to a field's type where YAML is ambiguous (`2e-4` is a string in YAML
    1.1; an int is a fine float); anything else that does not fit is an error naming the key.
    A Literal passes any value: the dataclass checks it (`check_choices`), on every construction."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
    else:
        options = [tp]
    for option in options:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                continue
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is str and isinstance(value, str):
            return value
        if base is list and isinstance(value, list):
            return value
        if base is dict and isinstance(value, dict):
            return value
        if base is Any or base is typing.Literal:
            return value
    if any(o is Any for o in options):
        return value
    raise ConfigError(f"{path} must be {_type_name(tp)}, got {value!r}")


def _choices(tp: Any) -> tuple | None:
    """The values a field of type `tp` may hold when they are a fixed set: the values of a Literal,
    with True and False, or None, when it is in a union with bool or None. None for a free field."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if not any(typing.get_origin(o) is typing.Literal for o in options):
        return None
    values: list[Any] = []
    for option in options:
        if typing.get_origin(option) is typing.Literal:
            values.extend(typing.get_args(option))
        elif option is bool:
            values.extend((True, False))
        elif option is type(None):
            values.append(None)
        else:
            return None
    return tuple(values)


def check_choices(obj: Any, section: str) -> None:
    """Raise a ConfigError naming `section.field` for the first field of dataclass `obj` whose
    value its Literal type does not allow (compared with the type too, so 1 is not True)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        allowed = _choices(hints[f.name])
        value = getattr(obj, f.name)
        if allowed is not None and not any(type(value) is type(a) and value == a for a in allowed):
            raise ConfigError(f"{section}.{f.name} must be one of {', '.join(map(_as_yaml, allowed))}, "
                              f"got {value!r}")


def _as_yaml(value: Any) -> str:
    """A choice as a config file spells it: true, false, null, or the bare string."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested mapping; values are parsed as YAML scalars
    (`lr=1e-4`, `packing=true`, `target_modules=[q_proj,v_proj]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags beyond plain data), refusing a key given twice in one mapping:
    PyYAML keeps the last silently, so a setting edited higher up in a config would be ignored.
    Merge keys (`<<: *base`) still override what they merge in, as YAML defines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:     # an unhashable key: the base class reports it
                continue
            if seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r}, first given on line {first_line[key] + 1}; keep one of them",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.load(read_text(path, ConfigError), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def reference(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field, nested sections flattened as `a.b`. Defaults
    are read from a default instance, so a section whose default differs from its class's own
    defaults (the train config's `lora`) shows the values that actually apply."""
    defaults = cls() if defaults is None else defaults
    rows = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = prefix + f.name
        value = getattr(defaults, f.name)
        sub = _nested(hints[f.name])
        if sub:
            rows.extend(reference(sub, key + ".", value))
            continue
        rows.append((key, _type_name(hints[f.name]), repr(value), docs.get(f.name, "")))
    return rows


def reference_markdown(cls: type) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in reference(cls):
        lines.append(f"| `{key}` | {tp.replace('|', '&#124;')} | `{default}` | {doc} |")
    return "\n".join(lines)


def reference_text(cls: type) -> str:
    return "\n".join(f"  {key} ({tp}, default {default})\n      {doc}" for key, tp, default, doc in reference(cls))
