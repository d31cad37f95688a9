"""Unit tests for client.site.SiteConfig.from_toml: a department's own TOML config."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site import SiteConfig, site_config_help
from common.errors import ConfigError

VALID = """\
name = "cardiology"
data = "data/notes.csv"
epsilon = 4.0
delta = 1e-6
ledger = "state/ledger.json"
"""


def _write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir(exist_ok=True)
    path = conf_dir / name
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_toml_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = SiteConfig.from_toml(_write(tmp_path, VALID))
    conf_dir = (tmp_path / "conf").resolve()
    assert cfg.name == "cardiology"
    assert cfg.epsilon == 4.0
    assert cfg.delta == 1e-6
    assert Path(cfg.data) == conf_dir / "data" / "notes.csv"
    assert Path(cfg.ledger) == conf_dir / "state" / "ledger.json"
    assert Path(cfg.data).is_absolute()
    assert Path(cfg.ledger).is_absolute()
    # defaults
    assert cfg.accountant == "rdp"
    assert cfg.require_secagg is True
    assert cfg.allow_non_private is False
    assert cfg.test_fraction == 0.2


def test_paths_resolved_relative_to_toml_not_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = SiteConfig.from_toml(_write(tmp_path, VALID))
    assert not cfg.ledger.startswith(str(elsewhere.resolve()))
    assert cfg.ledger == str((tmp_path / "conf" / "state" / "ledger.json").resolve())


def test_absolute_paths_kept(tmp_path: Path) -> None:
    data = tmp_path / "abs" / "d.parquet"
    ledger = tmp_path / "abs" / "l.json"
    text = VALID.replace('"data/notes.csv"', f'"{data}"').replace('"state/ledger.json"', f'"{ledger}"')
    cfg = SiteConfig.from_toml(_write(tmp_path, text))
    assert cfg.data == str(data.resolve())
    assert cfg.ledger == str(ledger.resolve())


def test_hutto_data_is_not_a_path(tmp_path: Path) -> None:
    cfg = SiteConfig.from_toml(_write(tmp_path, VALID.replace('"data/notes.csv"', '"hutto"')))
    assert cfg.data == "hutto"


def test_optional_keys(tmp_path: Path) -> None:
    extra = ('text_column = "note"\nlabel_column = "dx"\ndepartment_column = "ward"\naccountant = "prv"\n'
             "require_secagg = false\nallow_non_private = true\ntest_fraction = 0.3\nsplit_seed = 5\n")
    cfg = SiteConfig.from_toml(_write(tmp_path, VALID + extra))
    assert (cfg.text_column, cfg.label_column, cfg.department_column) == ("note", "dx", "ward")
    assert cfg.accountant == "prv"
    assert cfg.require_secagg is False
    assert cfg.allow_non_private is True
    assert cfg.test_fraction == 0.3
    assert cfg.split_seed == 5


def test_integer_epsilon_accepted(tmp_path: Path) -> None:
    cfg = SiteConfig.from_toml(_write(tmp_path, VALID.replace("epsilon = 4.0", "epsilon = 4")))
    assert cfg.epsilon == 4


@pytest.mark.parametrize("key", ["name", "data", "epsilon", "delta", "ledger"])
def test_missing_key(tmp_path: Path, key: str) -> None:
    text = "".join(line + "\n" for line in VALID.splitlines() if not line.startswith(f"{key} ="))
    with pytest.raises(ConfigError, match="missing key") as info:
        SiteConfig.from_toml(_write(tmp_path, text))
    assert f"'{key}'" in str(info.value)


def test_several_missing_keys_all_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing") as info:
        SiteConfig.from_toml(_write(tmp_path, 'name = "x"\n'))
    for key in ("data", "epsilon", "delta", "ledger"):
        assert f"'{key}'" in str(info.value)


def test_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key") as info:
        SiteConfig.from_toml(_write(tmp_path, VALID + 'budget_epsilon = 3.0\n'))
    assert "budget_epsilon" in str(info.value)


def test_malformed_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        SiteConfig.from_toml(_write(tmp_path, VALID + "this is = = not toml\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        SiteConfig.from_toml(tmp_path / "absent.toml")


@pytest.mark.parametrize("value", ["0.0", "-1.0", "0", "inf", "nan"])
def test_bad_epsilon(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="'epsilon'"):
        SiteConfig.from_toml(_write(tmp_path, VALID.replace("epsilon = 4.0", f"epsilon = {value}")))


@pytest.mark.parametrize("value", ["1.0", "1", "2.5", "0.0", "-1e-5"])
def test_bad_delta(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="'delta'"):
        SiteConfig.from_toml(_write(tmp_path, VALID.replace("delta = 1e-6", f"delta = {value}")))


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('accountant = "moments"\n', "accountant"),
        ("test_fraction = 1.0\n", "test_fraction"),
        ("test_fraction = 0\n", "test_fraction"),
    ],
)
def test_bad_optional_values(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        SiteConfig.from_toml(_write(tmp_path, VALID + extra))


def test_blank_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'name'"):
        SiteConfig.from_toml(_write(tmp_path, VALID.replace('"cardiology"', '"   "')))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"data/notes.csv"', "5", "key 'data' must be a string, got 5"),
        ("epsilon = 4.0", 'epsilon = "four"', "key 'epsilon' must be a number, got 'four'"),
        ('"cardiology"', "3", "key 'name' must be a string, got 3"),
        ("ledger", 'require_secagg = "false"\nledger', "key 'require_secagg' must be true or false, got 'false'"),
        ("ledger", "split_seed = 1.0\nledger", "key 'split_seed' must be an integer, got 1.0"),
        ("ledger", 'server = ["a"]\nledger', "key 'server' must be a string"),
    ],
)
def test_wrong_value_types_raise_config_error(tmp_path: Path, old: str, new: str, message: str) -> None:
    """A site's TOML is typed strictly (no 'false' strings for bools, unlike the run config)."""
    path = _write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as info:
        SiteConfig.from_toml(path)
    assert str(path) in str(info.value)


def _direct(**overrides: object) -> SiteConfig:
    kwargs: dict = {"name": "cardiology", "data": "hutto", "epsilon": 4.0, "delta": 1e-6, "ledger": "l.json"}
    return SiteConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epsilon": 0.0}, "Site config key 'epsilon' must be positive, got 0.0"),
        ({"epsilon": float("inf")}, "Site config key 'epsilon' must be finite"),
        ({"delta": 1}, r"Site config key 'delta' must be in \(0, 1\), got 1"),
        ({"name": " "}, "Site config key 'name' must not be empty"),
        ({"ledger": ""}, "Site config key 'ledger' must not be empty"),
        ({"accountant": "moments"}, "Site config key 'accountant' must be one of"),
        ({"test_fraction": 0}, "Site config key 'test_fraction' must be in"),
        ({"require_secagg": 1}, "Site config key 'require_secagg' must be true or false"),
        ({"policy": {"approved_apps": []}}, "Site config key 'policy' must be a table"),
    ],
)
def test_direct_construction_is_checked_too(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _direct(**overrides)


def test_direct_construction_same_message_as_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as direct:
        _direct(delta=2.5)
    with pytest.raises(ConfigError) as loaded:
        SiteConfig.from_toml(_write(tmp_path, VALID.replace("delta = 1e-6", "delta = 2.5")))
    assert str(loaded.value).endswith(str(direct.value).removeprefix("Site config "))


def test_direct_construction_normalises_numbers() -> None:
    cfg = _direct(epsilon=4)
    assert cfg.epsilon == 4.0
    assert isinstance(cfg.epsilon, float)


def test_site_config_help_lists_every_key() -> None:
    from client.policy import SitePolicy
    from common.settings import settings_fields

    text = site_config_help()
    for cls in (SiteConfig, SitePolicy):
        for f in settings_fields(cls):
            assert f"\n  {f.key} (" in text
    assert "  epsilon (float, required; positive)\n      the site's total privacy budget" in text
    assert "  max_rounds_per_job (int, default absent; positive)" in text
