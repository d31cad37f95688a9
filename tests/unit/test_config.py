"""Unit tests for common.config: JobConfig / SimulationConfig parsing and validation (common.settings)."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

from common.config import (
    JobConfig,
    SimulationConfig,
    as_run_config,
    check_known_keys,
    run_config_help,
    run_config_key_help,
)
from common.errors import ConfigError
from common.settings import SettingError, settings_fields


def test_job_defaults_are_valid() -> None:
    cfg = JobConfig.from_run_config({})
    assert cfg == JobConfig()
    assert cfg.num_server_rounds == 4
    assert cfg.finetune == "lora"
    assert cfg.label_names == ()


def test_simulation_defaults_are_valid() -> None:
    cfg = SimulationConfig.from_run_config({})
    assert cfg == SimulationConfig()
    assert cfg.sim_epsilon == 8.0
    assert cfg.site_epsilon_overrides() == {}


def test_job_values_are_parsed_and_coerced() -> None:
    cfg = JobConfig.from_run_config({
        "num-server-rounds": 7,
        "learning-rate": 1,  # int accepted for a float key
        "lora-r": 4.0,  # integral float accepted for an int key
        "dp": "false",  # bool from string
        "secagg": "no",
        "min-departments": 1,
        "labels": " neg , pos ",
    })
    assert cfg.num_server_rounds == 7
    assert cfg.learning_rate == 1.0
    assert isinstance(cfg.learning_rate, float)
    assert cfg.lora_r == 4
    assert isinstance(cfg.lora_r, int)
    assert cfg.dp is False
    assert cfg.secagg is False
    assert cfg.label_names == ("neg", "pos")


@pytest.mark.parametrize(
    ("rc", "key"),
    [
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"num-server-rounds": -3}, "num-server-rounds"),
        ({"finetune": "x"}, "finetune"),
        ({"grad-sample-mode": "magic"}, "grad-sample-mode"),
        ({"learning-rate": -1}, "learning-rate"),
        ({"learning-rate": 0.0}, "learning-rate"),
        ({"learning-rate": float("nan")}, "learning-rate"),
        ({"learning-rate": float("inf")}, "learning-rate"),
        ({"learning-rate": "fast"}, "learning-rate"),
        ({"max-length": 0}, "max-length"),
        ({"max-length": 513}, "max-length"),
        ({"batch-size": 0}, "batch-size"),
        ({"batch-size": 2.5}, "batch-size"),
        ({"batch-size": True}, "batch-size"),
        ({"lora-r": 0}, "lora-r"),
        ({"lora-alpha": -1}, "lora-alpha"),
        ({"local-epochs": 0}, "local-epochs"),
        ({"clip-norm": -0.5}, "clip-norm"),
        ({"secagg-num-shares": 0}, "secagg-num-shares"),
        ({"secagg-num-shares": 1.5}, "secagg-num-shares"),
        ({"secagg-num-shares": 2}, "secagg-num-shares"),
        ({"secagg-num-shares": 4}, "secagg-num-shares"),
        ({"secagg-num-shares": 30.0}, "secagg-num-shares"),
        ({"secagg-reconstruction-threshold": 0}, "secagg-reconstruction-threshold"),
        ({"secagg-reconstruction-threshold": 0.5}, "secagg-reconstruction-threshold"),
        ({"secagg-reconstruction-threshold": 1.2}, "secagg-reconstruction-threshold"),
        ({"secagg-quantization-range": 2**32}, "secagg-quantization-range"),
        ({"secagg-max-weight": 0}, "secagg-max-weight"),
        ({"secagg": True, "min-departments": 1}, "min-departments"),
        ({"secagg": False, "min-departments": 0}, "min-departments"),
        ({"dp": "maybe"}, "dp"),
        ({"dp": 1}, "dp"),
        ({"model": 3}, "model"),
        ({"labels": "only"}, "labels"),
        ({"labels": " , "}, "labels"),
        ({"labels": "a,b,a"}, "labels"),
        ({"seed": "zero"}, "seed"),
    ],
)
def test_job_bad_value_names_key(rc: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        JobConfig.from_run_config(rc)


@pytest.mark.parametrize(("value", "expected"), [(31, 31), (3, 3), (3.0, 3), (1, 1.0), (1.0, 1.0), (0.4, 0.4)])
def test_secagg_num_shares_is_a_count_above_one_and_a_fraction_otherwise(value: float, expected: float) -> None:
    shares = JobConfig.from_run_config({"secagg-num-shares": value}).secagg_num_shares
    assert shares == expected and type(shares) is type(expected)  # Flower reads an int as a count


def test_the_default_neighbourhood_is_31_departments() -> None:
    assert JobConfig().secagg_num_shares == 31 and isinstance(JobConfig().secagg_num_shares, int)


def test_a_threshold_of_half_a_neighbourhood_or_less_is_refused_with_the_reason() -> None:
    with pytest.raises(SettingError, match=r"'secagg-reconstruction-threshold' is invalid: must be above 0\.5, got "
                                           r"0\.5: the server decides which departments it reports as dropped"):
        JobConfig.from_run_config({"secagg-reconstruction-threshold": 0.5})
    assert JobConfig.from_run_config({"secagg-reconstruction-threshold": 0.51}).secagg_reconstruction_threshold == 0.51


def test_an_even_neighbourhood_is_refused() -> None:
    with pytest.raises(SettingError, match=r"'secagg-num-shares' is invalid: .* must be odd and at least 3 .*, got 30"):
        JobConfig.from_run_config({"secagg-num-shares": 30})


def test_secagg_off_allows_single_department() -> None:
    cfg = JobConfig.from_run_config({"secagg": False, "min-departments": 1})
    assert cfg.min_departments == 1


def test_duplicate_labels_message_mentions_duplicates() -> None:
    with pytest.raises(ConfigError, match="duplicates"):
        JobConfig.from_run_config({"labels": "pos,neg,pos"})


@pytest.mark.parametrize(
    ("rc", "key"),
    [
        ({"sim-delta": 1}, "sim-delta"),
        ({"sim-delta": 0}, "sim-delta"),
        ({"sim-delta": 1.5}, "sim-delta"),
        ({"sim-epsilon": 0}, "sim-epsilon"),
        ({"sim-epsilon": -2.0}, "sim-epsilon"),
        ({"sim-test-fraction": 0}, "sim-test-fraction"),
        ({"sim-test-fraction": 1.0}, "sim-test-fraction"),
        ({"sim-site-epsilons": "amazon"}, "sim-site-epsilons"),
        ({"sim-site-epsilons": "amazon=abc"}, "sim-site-epsilons"),
        ({"sim-site-epsilons": "amazon=0"}, "sim-site-epsilons"),
        ({"sim-site-epsilons": "amazon=-1"}, "sim-site-epsilons"),
        ({"sim-site-epsilons": "amazon=inf"}, "sim-site-epsilons"),
        ({"sim-site-epsilons": "amazon=nan"}, "sim-site-epsilons"),
        ({"sim-site-epsilons": "=3"}, "sim-site-epsilons"),
        ({"sim-site-epsilons": "amazon=2,nyt"}, "sim-site-epsilons"),
        ({"sim-global-eval": "perhaps"}, "sim-global-eval"),
    ],
)
def test_simulation_bad_value_names_key(rc: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        SimulationConfig.from_run_config(rc)


def test_site_epsilon_overrides() -> None:
    cfg = SimulationConfig.from_run_config({"sim-epsilon": 4, "sim-site-epsilons": " amazon = 2.5 , nyt=10,"})
    assert cfg.site_epsilon_overrides() == {"amazon": 2.5, "nyt": 10.0}
    assert cfg.site_epsilon("amazon") == 2.5
    assert cfg.site_epsilon("nyt") == 10.0
    assert cfg.site_epsilon("tweets") == 4.0


def test_check_known_keys_accepts_all_known() -> None:
    check_known_keys(as_run_config(JobConfig(), SimulationConfig()))
    check_known_keys({})


def test_check_known_keys_rejects_unknown() -> None:
    with pytest.raises(ConfigError, match="learning_rate") as info:
        check_known_keys({"num-server-rounds": 2, "learning_rate": 0.1, "bogus-key": 1})
    assert "bogus-key" in str(info.value)
    assert "num-server-rounds" not in str(info.value).split("Known keys")[0]


def test_as_run_config_round_trips() -> None:
    job = JobConfig(num_server_rounds=9, model="tiny-random", finetune="full", learning_rate=0.125, dp=False,
                    secagg=False, min_departments=1, labels="a,b,c", seed=42, out_dir="/tmp/x")
    sim = SimulationConfig(sim_data="data.csv", sim_epsilon=3.5, sim_delta=1e-6, sim_site_epsilons="a=1,b=2",
                           sim_global_eval=False, sim_test_fraction=0.3)
    rc = as_run_config(job, sim)
    assert set(rc) == {f.name.replace("_", "-") for f in (*fields(JobConfig), *fields(SimulationConfig))}
    assert rc["num-server-rounds"] == 9
    assert rc["sim-site-epsilons"] == "a=1,b=2"
    assert JobConfig.from_run_config(rc) == job
    assert SimulationConfig.from_run_config(rc) == sim


def test_as_run_config_round_trips_defaults() -> None:
    rc = as_run_config(JobConfig())
    assert JobConfig.from_run_config(rc) == JobConfig()
    assert all("_" not in k for k in rc)


# --- configs check themselves at construction, with the same messages as from_run_config --------------------------

def _message(build: Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as info:
        build()
    return str(info.value)


@pytest.mark.parametrize(
    "rc",
    [
        {"batch-size": 0},
        {"batch-size": 2.5},
        {"batch-size": True},
        {"num-server-rounds": -3},
        {"finetune": "x"},
        {"learning-rate": float("nan")},
        {"learning-rate": "fast"},
        {"max-length": 513},
        {"secagg-num-shares": 1.5},
        {"secagg-quantization-range": 2**32},
        {"round-retries": -1},
        {"stage-timeout": 0.0},
        {"dp": "maybe"},
        {"model": 3},
        {"labels": "a,b,a"},
        {"resume": True},
        {"secagg": True, "min-departments": 1},
    ],
)
def test_direct_construction_gives_the_run_config_message(rc: dict) -> None:
    kwargs = {k.replace("-", "_"): v for k, v in rc.items()}
    direct = _message(lambda: JobConfig(**kwargs))
    assert direct == _message(lambda: JobConfig.from_run_config(rc))
    assert f"'{next(reversed(rc))}'" in direct


def test_the_error_is_typed_and_names_the_key() -> None:
    with pytest.raises(SettingError, match=r"^Config key 'batch-size' must be positive, got 0\.$") as info:
        JobConfig(batch_size=0)
    assert isinstance(info.value, ConfigError)
    assert info.value.key == "batch-size"
    with pytest.raises(SettingError, match="'sim-delta' must be in \\(0, 1\\)"):
        SimulationConfig(sim_delta=1.0)
    with pytest.raises(SettingError, match="'sim-site-epsilons' must look like"):
        SimulationConfig(sim_site_epsilons="amazon")


def test_replace_checks_again() -> None:
    with pytest.raises(ConfigError, match="'batch-size'"):
        dataclasses.replace(JobConfig(), batch_size=-1)
    assert dataclasses.replace(JobConfig(), batch_size=8).batch_size == 8


def test_configs_stay_frozen() -> None:
    cfg = JobConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 1  # type: ignore[misc]


def test_direct_construction_normalises_numbers() -> None:
    cfg = JobConfig(learning_rate=1, stage_timeout=60)
    assert isinstance(cfg.learning_rate, float)
    assert isinstance(cfg.stage_timeout, float)
    assert cfg == JobConfig(learning_rate=1.0, stage_timeout=60.0)
    # the run config's looser spellings (strings for bools, integral floats for ints) are for run configs only
    with pytest.raises(ConfigError, match="'dp' must be true or false, got 'false'"):
        JobConfig(dp="false")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'lora-r' must be an integer, got 4\.0"):
        JobConfig(lora_r=4.0)  # type: ignore[arg-type]


# --- one schema: pyproject's [tool.flwr.app.config], the dataclasses and the help text agree -----------------------

def test_pyproject_app_config_is_the_configs_keys_and_defaults() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    defaults = as_run_config(JobConfig(), SimulationConfig())
    assert list(app_config) == list(defaults)  # same keys, same order
    for key, value in app_config.items():
        assert value == defaults[key], key
        assert type(value) is type(defaults[key]), key
    assert JobConfig.from_run_config(app_config) == JobConfig()
    assert SimulationConfig.from_run_config(app_config) == SimulationConfig()


def test_every_field_has_help_and_the_help_text_lists_every_key() -> None:
    text = run_config_help()
    for cls in (JobConfig, SimulationConfig):
        for f in settings_fields(cls):
            assert f.spec.help.strip(), f.key
            assert f"  {f.key} (" in text
            assert run_config_key_help(f.key) == f.spec.help
    assert '  batch-size (int, default 64; positive)\n      expected (Poisson) batch size' in text
    assert "  finetune (string, default \"lora\"; one of lora, full)" in text
    with pytest.raises(ConfigError, match="batch_size"):
        run_config_key_help("batch_size")
