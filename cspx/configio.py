"""Reading a recipe, before a run starts: typed YAML whose sections are dataclasses, every key
checked at load.

A recipe is a YAML mapping whose top-level keys are the root dataclass's fields; a field whose type
is a dataclass is a section, and its keys are that dataclass's fields. Unknown keys (with a
did-you-mean), wrong types and out-of-range values (raised by each dataclass's `__post_init__`) all
become one `CspxError` line naming the source and the dotted key. Only `yaml.safe_load` is used.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import typing
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple, Type, TypeVar

import yaml

from cspx.errors import CspxError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
T = TypeVar("T", bound="DataclassInstance")  # a config dataclass


class ConfigValueError(ValueError):
    """Raised by a section's __post_init__: `key` is the field (or a dotted key from the root)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"a list of {len(args)} {_type_name(args[0])}" if origin is tuple else "a list"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> Tuple[bool, Any]:
    """(ok, value converted to tp). Where a number is expected, ints and float literals written
    as strings (`1e-3`, see _number) are accepted; nothing else is converted, so `steps: 1.5`,
    `steps: "10"` or `hflip: yes` is an error rather than a silent cast."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(tp) and not isinstance(value, bool), value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, value
        items = [_coerce(v, a) for v, a in zip(value, args)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        return _number(value)
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {tp!r}")


def _number(value: Any) -> Tuple[bool, Any]:
    """A float key's value: an int, a float, or a string that Python's float() reads. PyYAML
    follows YAML 1.1, where `1e-3` (no dot in the mantissa) is a string, yet it is how learning
    rates are written; `"0.1"`, ` 5E-4`, `.5` and `1_000.5` are accepted alike. nan and inf are
    refused (as strings or YAML's .nan/.inf): no key means anything with them."""
    if isinstance(value, bool):
        return False, value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return False, value
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        return False, value
    return (True, number) if math.isfinite(number) else (False, value)


def _hints(cls: Type) -> Dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _unknown(key: str, prefix: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    hint = f", did you mean {prefix}{close[0]}?" if close else f" (known: {', '.join(allowed)})"
    return f"{prefix}{key}: unknown key{hint}"


def build(cls: Type[T], data: Dict[str, Any], source: str, prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a mapping, checking keys and types recursively."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "top level"
        raise CspxError(f"{source}: {where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints:
            raise CspxError(f"{source}: {_unknown(str(key), prefix, fields)}")
        tp = hints[key]
        if is_section(tp):
            kwargs[key] = build(tp, value if value is not None else {}, source, f"{prefix}{key}.")
            continue
        ok, v = _coerce(value, tp)
        if not ok:
            raise CspxError(f"{source}: {prefix}{key}: expected {_type_name(tp)}, got {value!r}")
        kwargs[key] = v
    try:
        return cls(**kwargs)
    except ConfigValueError as e:
        raise CspxError(f"{source}: {prefix}{e.key}: {e.message}") from None


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """['optim.lr=0.2', 'model.init_from=null'] -> nested dict; values are YAML scalars."""
    nested: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise CspxError(f"command line: {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise CspxError(f"command line: {key}: cannot parse value {raw!r}") from None
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CspxError(f"command line: {key}: {p} is not a section")
        node[parts[-1]] = value
    return nested


def merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise CspxError(f"{path}: cannot read recipe ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CspxError(f"{path}: invalid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CspxError(f"{path}: a recipe must be a mapping of sections")
    return data


def load(cls: Type[T], path: str, overrides: Sequence[str] = ()) -> T:
    """Load a recipe, then apply command-line overrides; both are checked the same way."""
    data = read_yaml(path)
    cfg = build(cls, data, path)  # errors in the file name the file, not the command line
    over = parse_overrides(overrides)
    if not over:
        return cfg
    check_keys(cls, over)
    return build(cls, merge(data, over), "command line")


def check_keys(cls: Type, over: Dict[str, Any], prefix: str = "") -> None:
    """Reject unknown override keys before merging (the merged build would blame the file)."""
    hints = _hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key, value in over.items():
        if key not in hints:
            raise CspxError(f"command line: {_unknown(key, prefix, fields)}")
        if is_section(hints[key]):
            if not isinstance(value, dict):
                raise CspxError(f"command line: {prefix}{key}: is a section, "
                                f"set {prefix}{key}.<key>")
            check_keys(hints[key], value, f"{prefix}{key}.")


def to_dict(obj: Any) -> Dict[str, Any]:
    """Plain dict (tuples become lists) for YAML dumps and checkpoints."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(obj)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_hash(obj: Any) -> str:
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """Dotted keys whose values differ between two (nested) config dicts."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<unset>") != fb.get(k, "<unset>"))
