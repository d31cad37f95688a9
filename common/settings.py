"""One declarative mechanism for fedsilo's configs: each field says its type, range and help text, and a config
checks itself when it is constructed, however it is constructed.

A config is a frozen dataclass deriving from `Settings` whose fields are declared with `option(...)`:

    @dataclass(frozen=True)
    class JobConfig(Settings):
        label: ClassVar[str] = "Config key"
        batch_size: int = option(64, help="expected (Poisson) batch size", gt=0)

The field's type comes from its annotation (bool, int, float, str, `X | None`, `tuple[str, ...]`, or a nested
`Settings` class); its range from `gt`/`ge`/`lt`/`le`, `choices` and `nonempty`; `convert` normalises a value (or
raises). `Settings.__post_init__` checks every field and then the config's own cross-field `check()`. A bad value
raises `SettingError` (a `ConfigError`) naming the key as the user writes it: with dashes for run-config keys
(`dashes = True`), the field name otherwise. `load` builds a config from a mapping (a run config, a TOML table),
with the same checks and so the same messages; `format_keys`/`markdown_keys` render the help text for `--help` and
the docs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

from common.errors import ConfigError

_SPEC = "fedsilo.option"
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")

S = TypeVar("S", bound="Settings")


@dataclasses.dataclass(frozen=True)
class Spec:
    """What `option` records about one field (in the dataclass field's metadata)."""

    help: str
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()
    nonempty: bool = False
    convert: Callable[[Any], Any] | None = None
    note: str = ""  # how the value is read, where the range alone does not say it (shown in the docs)


def option(default: Any = dataclasses.MISSING, *, help: str, gt: float | None = None,
           ge: float | None = None, lt: float | None = None, le: float | None = None,
           choices: Iterable[str] = (), nonempty: bool = False, convert: Callable[[Any], Any] | None = None,
           note: str = "", default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A config field: its default (none: the key is required), help text and allowed values.

    `gt`/`ge`/`lt`/`le`: bounds of a number; `choices`: the allowed strings; `nonempty`: a string that must not be
    blank; `convert`: normalises the checked value (e.g. a digest to lower case) or raises ConfigError/ValueError.
    """
    spec = Spec(help=help, gt=gt, ge=ge, lt=lt, le=le, choices=tuple(choices), nonempty=nonempty, convert=convert,
                note=note)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_SPEC: spec})


class SettingError(ConfigError):
    """A config value has the wrong type or is out of range; `key` names it, `problem` says what is wrong."""

    def __init__(self, label: str, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{label} '{key}' {problem}.")


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a config, as the checks and the help text see it."""

    name: str
    key: str
    kind: Any  # bool, int, float, str, tuple (of str), or a Settings subclass
    optional: bool  # None allowed
    default: Any  # dataclasses.MISSING when the key is required
    spec: Spec

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


class Settings:
    """Base of fedsilo's configs (frozen dataclasses): checks every field at construction."""

    label: ClassVar[str] = "Config key"  # how messages name a key: "<label> '<key>' must be ..."
    dashes: ClassVar[bool] = False  # keys are field names with '_' written '-' (run-config keys)

    def __post_init__(self) -> None:
        for f in settings_fields(type(self)):
            value = _checked(f, getattr(self, f.name), self.label)
            if value is not getattr(self, f.name):
                object.__setattr__(self, f.name, value)  # normalised (int -> float, list -> tuple, convert)
        self.check()

    def check(self) -> None:
        """Cross-field checks of a config (one field's own type and range are declared with `option`)."""

    def invalid(self, name: str, problem: str) -> SettingError:
        """The error for field `name` (for `check`): `raise self.invalid("labels", "has duplicates")`."""
        return SettingError(self.label, key_of(type(self), name), problem)


def key_of(cls: type[Settings], name: str) -> str:
    return name.replace("_", "-") if cls.dashes else name


@functools.cache
def settings_fields(cls: type[Settings]) -> tuple[Field, ...]:
    """The fields of a config class declared with `option`, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        spec = f.metadata.get(_SPEC)
        if spec is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with option(...)")
        kind, optional = _kind(hints[f.name])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out.append(Field(f.name, key_of(cls, f.name), kind, optional, default, spec))
    return tuple(out)


def _kind(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"unsupported config field type {hint}")
        return _kind(rest[0])[0], True
    if typing.get_origin(hint) is tuple and args == (str, ...):
        return tuple, False
    if hint in (bool, int, float, str) or (isinstance(hint, type) and issubclass(hint, Settings)):
        return hint, False
    raise TypeError(f"unsupported config field type {hint}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a list of strings"}


def _type_name(kind: Any) -> str:
    return _TYPE_NAMES.get(kind) or f"a table ({kind.__name__})"


def _checked(f: Field, value: Any, label: str) -> Any:
    """The field's value, type-checked, range-checked and normalised; SettingError otherwise."""
    if value is None and f.optional:
        return None
    raw = value
    value = _typed(f, value, label)
    spec = f.spec
    if f.kind is float and not math.isfinite(value):
        raise SettingError(label, f.key, f"must be finite, got {raw!r}")
    if spec.choices and value not in spec.choices:
        raise SettingError(label, f.key, f"must be one of {spec.choices}, got {value!r}")
    if not _in_range(spec, value):
        raise SettingError(label, f.key, f"must be {range_text(spec)}, got {raw!r}")
    if spec.nonempty and not value.strip():
        raise SettingError(label, f.key, "must not be empty")
    if spec.convert is not None:
        try:
            value = spec.convert(value)
        except (ConfigError, ValueError) as exc:
            raise SettingError(label, f.key, f"is invalid: {str(exc).rstrip('.')}") from exc
    return value


def _typed(f: Field, value: Any, label: str) -> Any:
    kind = f.kind
    if kind is tuple:
        if isinstance(value, list | tuple) and all(isinstance(x, str) for x in value):
            return tuple(value)
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value if isinstance(value, float) else float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, kind):
        return value
    raise SettingError(label, f.key, f"must be {_type_name(kind)}{' (or absent)' if f.optional else ''}, "
                                     f"got {value!r}")


def _in_range(spec: Spec, value: Any) -> bool:
    return ((spec.gt is None or value > spec.gt) and (spec.ge is None or value >= spec.ge)
            and (spec.lt is None or value < spec.lt) and (spec.le is None or value <= spec.le))


def _num(x: float) -> str:
    if isinstance(x, int) and x >= 2**16 and (x & (x - 1)) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(spec: Spec) -> str:
    """The allowed range in words: 'positive', 'at least 1', 'in (0, 1]', 'below 2**32', ..."""
    low = (spec.gt, "(") if spec.gt is not None else (spec.ge, "[") if spec.ge is not None else None
    high = (spec.lt, ")") if spec.lt is not None else (spec.le, "]") if spec.le is not None else None
    if low and high:
        return f"in {low[1]}{_num(low[0])}, {_num(high[0])}{high[1]}"
    if low:
        if low[0] == 0:
            return "positive" if low[1] == "(" else "at least 0"
        return f"{'greater than' if low[1] == '(' else 'at least'} {_num(low[0])}"
    if high:
        return f"{'below' if high[1] == ')' else 'at most'} {_num(high[0])}"
    return "any value"


def allowed_text(f: Field) -> str:
    """The allowed values of a field, in words, for help text and docs."""
    parts = []
    if f.spec.choices:
        parts.append("one of " + ", ".join(f.spec.choices))
    if any(b is not None for b in (f.spec.gt, f.spec.ge, f.spec.lt, f.spec.le)):
        parts.append(range_text(f.spec))
    if f.spec.nonempty:
        parts.append("not empty")
    if f.spec.note:
        parts.append(f.spec.note)
    return "; ".join(parts)


# ---------------------------------------------------------------- building from a mapping


def load(cls: type[S], values: Mapping[str, Any], *, where: str = "", lenient: bool = False,
         ignore_unknown: bool = False) -> S:
    """Build config `cls` from a mapping keyed by its keys (a run config, a TOML table).

    Keys not given take their defaults; required keys must be present and, unless `ignore_unknown`, no other keys
    may be. `lenient` (run configs, whose values may arrive as strings from the command line): a bool may be given
    as 'true'/'false'/'yes'/'no'/'1'/'0' and an integer as an integral float. A nested `Settings` field is loaded
    from a table the same way. `where` (e.g. the file) prefixes the messages of every error.
    """
    prefix = f"{where}: " if where else ""
    fields_ = settings_fields(cls)
    known = {f.key for f in fields_}
    unknown = sorted(set(values) - known)
    if unknown and not ignore_unknown:
        raise ConfigError(f"{prefix}unknown key(s) {unknown}; known: {sorted(known)}.")
    missing = [f.key for f in fields_ if f.required and f.key not in values]
    if missing:
        raise ConfigError(f"{prefix}missing key(s) {missing}.")
    kwargs: dict[str, Any] = {}
    for f in fields_:
        if f.key not in values:
            continue
        value = values[f.key]
        if isinstance(f.kind, type) and issubclass(f.kind, Settings) and isinstance(value, Mapping):
            value = load(f.kind, value, where=f"{where or cls.__name__}, [{f.key}]", lenient=lenient)
        elif lenient:
            value = _coerce(f.kind, value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except SettingError as exc:
        if not where:
            raise
        raise SettingError(f"{where}: key", exc.key, exc.problem) from None


def _coerce(kind: Any, value: Any) -> Any:
    """A run-config value as `kind` where the run config's looser spelling allows it; unchanged otherwise (the
    config's own check then names the key)."""
    if kind is bool and isinstance(value, str) and value.lower() in (*_TRUE, *_FALSE):
        return value.lower() in _TRUE
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def known_keys(*classes: type[Settings]) -> set[str]:
    return {f.key for cls in classes for f in settings_fields(cls)}


def as_mapping(*configs: Settings) -> dict[str, Any]:
    """The key -> value view of configs (e.g. the run config a report records)."""
    return {f.key: getattr(cfg, f.name) for cfg in configs for f in settings_fields(type(cfg))}


# ---------------------------------------------------------------- help text


def value_text(value: Any) -> str:
    """A value as it is written in TOML and on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if value is None:
        return "absent"
    if isinstance(value, Settings):
        return "empty"
    return repr(value)


def _literal(value: Any) -> bool:
    return value is not None and not isinstance(value, Settings)


def _type_word(f: Field) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", tuple: "list of strings"}.get(f.kind, "table")


def format_keys(*classes: type[Settings], width: int = 100) -> str:
    """Every key of `classes` with its type, default, allowed values and help: a plain-text block, e.g. an
    argparse epilog (use `RawDescriptionHelpFormatter` to keep its layout)."""
    lines = []
    indent = " " * 6
    for cls in classes:
        for f in settings_fields(cls):
            default = "required" if f.required else f"default {value_text(f.default)}"
            allowed = allowed_text(f)
            lines.append(f"  {f.key} ({_type_word(f)}, {default}{'; ' + allowed if allowed else ''})")
            lines.extend(textwrap.wrap(f.spec.help, width=width, initial_indent=indent, subsequent_indent=indent))
    return "\n".join(lines)


def markdown_keys(cls: type[Settings]) -> str:
    """A markdown table of the keys of `cls` (for docs/configuration.md)."""
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for f in settings_fields(cls):
        default = ("*required*" if f.required else f"`{value_text(f.default)}`" if _literal(f.default)
                   else f"*{value_text(f.default)}*")
        cells = (f"`{f.key}`", _type_word(f), default, allowed_text(f) or "", f.spec.help)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
