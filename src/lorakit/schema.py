"""Typed dataclasses as the one schema for configuration files: build them from YAML mappings,
apply `key.sub=value` overrides, and print their reference (for `--help` and the README).

Each field's documentation is the string literal under it in the class body (an attribute
docstring), read from the source once, so the docs live next to the defaults and cannot drift.
A field with a fixed set of values is a `Literal` (possibly in a union with bool or None): the
dataclass checks it with `check_choices`, and the reference and the CLI's `choices` read the
values from the type, so they are written once. Unknown keys are errors that suggest the key
meant (`_unknown_key_hint`), and an error in a file with overrides names the one it came from
(`from_file_and_overrides`).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping
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


class _UnknownKey(Exception):
    """Raised by `_build` for a key its section does not have; `from_dict`, which knows the whole
    schema and the aliases, turns it into the message."""

    def __init__(self, section: str, key: Any) -> None:
        super().__init__(section, key)
        self.section, self.key = section, key


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "", defaults: Any = None,
              aliases: Mapping[str, str] | None = None) -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields. Unknown keys
    are errors naming the key meant (`_unknown_key_hint`); `aliases` maps names other tools use
    (`learning_rate`) to the key path under `cls` that means the same (`training.lr`). Keys not
    given keep the values of `defaults` (an instance of `cls`; None: the class's own defaults). A
    nested section starts from its field's default, so a section whose default differs from its
    class's (the train config's `lora`) is built on the values that apply, the ones `reference`
    prints."""
    try:
        return _build(cls, data, where, defaults)
    except _UnknownKey as e:
        path = f"{e.section}.{e.key}" if e.section else str(e.key)
        hint = _unknown_key_hint(_key_paths(cls, where), e.section, e.key, where, aliases or {})
        raise ConfigError(f"unknown config key {path!r}{hint}") from None


def _build(cls: type, data: dict[str, Any] | None, where: str, defaults: Any) -> Any:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} ({data!r})")
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _UnknownKey(where, key)
        path = f"{where}.{key}" if where else key
        sub = _nested(hints[key])
        kwargs[key] = _build(sub, value, path, _field_default(names[key])) if sub else \
            _coerce(hints[key], value, path)
    if defaults is not None:
        kwargs = {**{name: getattr(defaults, name) for name in names}, **kwargs}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _key_paths(cls: type, where: str) -> list[str]:
    """Every key of dataclass `cls` under `where`, sections and the keys in them, as dotted paths in
    field order."""
    paths = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            path = f"{where}.{f.name}" if where else f.name
            paths.append(path)
            sub = _nested(hints[f.name])
            if sub:
                paths.extend(_key_paths(sub, path))
    return paths


_SIMILAR = 0.6
"""difflib's ratio from which two key names count as one misspelt (difflib's own default cutoff)."""


def _similarity(name: str, other: str) -> float | None:
    """How alike key names `name` and `other` are (difflib's ratio), or None when they are not alike:
    below `_SIMILAR`, unless one name's `_`-separated parts begin the other's. That rule catches a
    word added or dropped (`lr_rate` for `lr`, `max_seq` for `max_seq_len`), which the ratio misses
    on short names."""
    ratio = difflib.SequenceMatcher(None, name, other).ratio()
    parts, other_parts = name.split("_"), other.split("_")
    n = min(len(parts), len(other_parts))
    return ratio if ratio >= _SIMILAR or parts[:n] == other_parts[:n] else None


def _unknown_key_hint(keys: list[str], section: str, key: Any, root: str, aliases: Mapping[str, str]) -> str:
    """What follows "unknown config key 'section.key'": the key meant, among `keys` (every key path
    of the schema, under `root`), by the first of these rules that finds one:

    1. the same name in the same section with `-` written `_` (`micro-batch-size`);
    2. the key another tool's name stands for (`aliases`, paths under `root`: `learning_rate` means
       `training.lr`), in any section or at the top, since other tools' configs are flat;
    3. the key of that name in another section, where it lives (`training.max_seq_len` is
       `data.max_seq_len`);
    4. the most alike key name anywhere in the schema (`_similarity`), one in the same section on a
       tie.
    Else the section's valid keys. The section itself and the sections around it are no candidates
    (`lora.lora` does not mean `lora`)."""
    name = str(key).replace("-", "_")
    here = f"{section}." if section else ""
    candidates = [k for k in keys if not here.startswith(k + ".")]
    siblings = [k for k in candidates if k.startswith(here) and "." not in k[len(here):]]
    if here + name in siblings:
        return f"; did you mean {here + name!r}?"
    if name in aliases:
        target = f"{root}.{aliases[name]}" if root else aliases[name]
        return f"; did you mean {target!r}? ({key} is another tool's name for it)"
    elsewhere = [k for k in candidates if k.rpartition(".")[2] == name]
    if elsewhere:
        return f"; did you mean {' or '.join(map(repr, elsewhere))}?"
    scored = [(ratio, k in siblings, k) for k in candidates
              if (ratio := _similarity(name, k.rpartition(".")[2])) is not None]
    if scored:
        return f"; did you mean {max(scored, key=lambda s: s[:2])[2]!r}?"
    return f"; valid keys: {', '.join(k[len(here):] for k in siblings)}"


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
            raise ConfigError(f"{section}.{f.name} must be one of {', '.join(map(as_yaml, allowed))}, "
                              f"got {value!r}")


def as_yaml(value: Any) -> str:
    """A value as a config file spells it: true, false, null, [a, b], or the bare string."""
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(as_yaml, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def flat_config(section: object, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} for every leaf field of a config dataclass (`training.lr`), the keys
    `reference` lists: the params a tracker records, and what `lorakit compare` compares."""
    values: dict[str, object] = {}
    for f in dataclasses.fields(section):
        if not f.init:
            continue
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            values.update(flat_config(value, f"{prefix}{f.name}."))
        else:
            values[prefix + f.name] = value
    return values


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


def from_file_and_overrides(cls: type, path: str | None, overrides: list[str],
                            aliases: Mapping[str, str] | None = None) -> Any:
    """Dataclass `cls` from the YAML file at `path` (None: the defaults) with `key.sub=value`
    overrides applied in order on top. An error names the input it comes from: the file, or the
    first override with which, added in order, the config fails with that error (a key or value
    alone does not tell: a range or a combination is checked by the dataclass, on the whole). The
    file is not validated alone first: an override may complete it (turn on the setting another of
    its settings needs), and the file alone is then no error."""
    stages = [load_yaml(path) if path else {}]
    for item in overrides:
        stages.append(apply_overrides(copy.deepcopy(stages[-1]), [item]))
    try:
        return from_dict(cls, stages[-1], aliases=aliases)
    except ConfigError as e:
        error = str(e)
    sources = [path, *(f"override {item!r}" for item in overrides)]
    source = next(s for s, stage in zip(sources, stages, strict=True) if _failure(cls, stage, aliases) == error)
    raise ConfigError(f"{source}: {error}" if source else error)


def _failure(cls: type, data: dict[str, Any], aliases: Mapping[str, str] | None) -> str | None:
    """The message building dataclass `cls` from `data` fails with; None when it builds."""
    try:
        from_dict(cls, data, aliases=aliases)
    except ConfigError as e:
        return str(e)
    return None


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
