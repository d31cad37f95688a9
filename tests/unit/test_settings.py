"""Unit tests for common.settings: the one mechanism configs declare their fields, checks and help text with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest

from common.errors import ConfigError
from common.settings import (
    SettingError,
    Settings,
    format_keys,
    load,
    markdown_keys,
    option,
    range_text,
    settings_fields,
)


def _upper(value: str) -> str:
    if not value.isalpha():
        raise ValueError(f"{value!r} is not a word")
    return value.upper()


@dataclass(frozen=True)
class Inner(Settings):
    label: ClassVar[str] = "Inner key"

    limit: int | None = option(None, help="a limit", gt=0)
    words: tuple[str, ...] = option((), help="some words")


@dataclass(frozen=True)
class Outer(Settings):
    label: ClassVar[str] = "Outer key"
    dashes: ClassVar[bool] = True

    site_name: str = option(help="required name", nonempty=True)
    rate: float = option(0.5, help="a fraction", gt=0, le=1)
    count: int = option(3, help="a count", ge=1)
    flag: bool = option(False, help="a switch")
    mode: str = option("a", help="a mode", choices=("a", "b"))
    word: str = option("", help="a word, upper-cased", convert=lambda v: _upper(v) if v else v)
    inner: Inner = option(help="a table", default_factory=Inner)  # noqa: RUF009

    def check(self) -> None:
        if self.flag and self.count < 2:
            raise self.invalid("count", "must be at least 2 with flag")


@dataclass(frozen=True)
class Bare(Settings):
    x: int = 0


def test_construction_checks_and_normalises() -> None:
    cfg = Outer(site_name="s", rate=1, inner=Inner(words=["a", "b"]), word="abc")  # type: ignore[arg-type]
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.inner.words == ("a", "b")
    assert cfg.word == "ABC"
    assert dataclasses.replace(cfg, count=5).count == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.count = 4  # type: ignore[misc]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"site_name": "  "}, "Outer key 'site-name' must not be empty."),
    ({"site_name": 3}, "Outer key 'site-name' must be a string, got 3."),
    ({"site_name": "s", "rate": 0}, "Outer key 'rate' must be in (0, 1], got 0."),
    ({"site_name": "s", "rate": float("nan")}, "Outer key 'rate' must be finite, got nan."),
    ({"site_name": "s", "rate": True}, "Outer key 'rate' must be a number, got True."),
    ({"site_name": "s", "count": 0}, "Outer key 'count' must be at least 1, got 0."),
    ({"site_name": "s", "count": 2.0}, "Outer key 'count' must be an integer, got 2.0."),
    ({"site_name": "s", "flag": "yes"}, "Outer key 'flag' must be true or false, got 'yes'."),
    ({"site_name": "s", "mode": "c"}, "Outer key 'mode' must be one of ('a', 'b'), got 'c'."),
    ({"site_name": "s", "word": "a1"}, "Outer key 'word' is invalid: 'a1' is not a word."),
    ({"site_name": "s", "inner": {}}, "Outer key 'inner' must be a table (Inner), got {}."),
    ({"site_name": "s", "flag": True, "count": 1}, "Outer key 'count' must be at least 2 with flag."),
])
def test_bad_values_raise_a_typed_error_naming_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(SettingError) as info:
        Outer(**kwargs)
    assert str(info.value) == message
    assert isinstance(info.value, ConfigError)


def test_optional_and_list_fields() -> None:
    assert Inner(limit=None).limit is None
    with pytest.raises(ConfigError, match=r"'limit' must be an integer \(or absent\), got 'x'"):
        Inner(limit="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'limit' must be positive, got -1"):
        Inner(limit=-1)
    with pytest.raises(ConfigError, match="'words' must be a list of strings"):
        Inner(words=("a", 1))  # type: ignore[arg-type]


def test_load_strict_and_lenient() -> None:
    values = {"site-name": "s", "count": 2.0, "flag": "true", "inner": {"limit": 3, "words": ["x"]}}
    with pytest.raises(ConfigError, match=r"^f\.toml: key 'count' must be an integer, got 2\.0\.$"):
        load(Outer, values, where="f.toml")
    cfg = load(Outer, values, lenient=True)
    assert (cfg.count, cfg.flag, cfg.inner) == (2, True, Inner(limit=3, words=("x",)))
    with pytest.raises(ConfigError, match=r"^f.toml, \[inner\]: key 'limit' must be positive, got 0.$"):
        load(Outer, {"site-name": "s", "inner": {"limit": 0}}, where="f.toml")
    with pytest.raises(ConfigError, match=r"^f.toml, \[inner\]: unknown key\(s\) \['other'\]"):
        load(Outer, {"site-name": "s", "inner": {"other": 0}}, where="f.toml")


def test_load_unknown_and_missing_keys() -> None:
    with pytest.raises(ConfigError, match=r"^f.toml: missing key\(s\) \['site-name'\].$"):
        load(Outer, {}, where="f.toml")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['site_name'\]"):
        load(Outer, {"site-name": "s", "site_name": "t"})
    assert load(Outer, {"site-name": "s", "other": 1}, ignore_unknown=True) == Outer(site_name="s")


def test_a_field_without_option_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match=r"Bare.x is not declared with option"):
        Bare()


def test_range_text() -> None:
    texts = {f.key: range_text(f.spec) for f in settings_fields(Outer)}
    assert texts["rate"] == "in (0, 1]"
    assert texts["count"] == "at least 1"
    assert texts["flag"] == "any value"
    assert range_text(settings_fields(Inner)[0].spec) == "positive"


def test_help_text_renders_every_key() -> None:
    text = format_keys(Outer)
    assert "  site-name (string, required; not empty)\n      required name" in text
    assert "  rate (float, default 0.5; in (0, 1])\n      a fraction" in text
    assert "  mode (string, default \"a\"; one of a, b)" in text
    table = markdown_keys(Inner)
    assert "| `limit` | int | *absent* | positive | a limit |" in table
    assert "| `words` | list of strings | `[]` |  | some words |" in table
