import os

import pytest
from pydantic import ValidationError

from keyart import config
from keyart.config import Settings
from keyart.policy import PolicyConfig


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No KEYART_* variable and no keyart.yaml: only what a test sets counts."""
    for name in list(os.environ):
        if name.startswith("KEYART_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_are_embedded(clean_env):
    s = Settings()
    assert s.home == (clean_env / "var").resolve()
    assert s.spark_master == "local[*]"
    assert s.tracking_uri.startswith("sqlite:///")
    assert s.lake == s.home / "lake"


def test_default_file_is_keyart_yaml_in_the_working_directory(clean_env):
    (clean_env / "keyart.yaml").write_text("spark_master: spark://cwd:7077\n")
    assert Settings().spark_master == "spark://cwd:7077"


def test_precedence_default_then_file_then_environment_then_init(clean_env, monkeypatch):
    cfg = clean_env / "k.yaml"
    cfg.write_text("spark_master: spark://file:7077\nquality_play_minutes: 20\n"
                   "history_days: 30\nlake_root: /data/lake\n")
    monkeypatch.setenv("KEYART_CONFIG", str(cfg))
    monkeypatch.setenv("KEYART_QUALITY_PLAY_MINUTES", "25")
    monkeypatch.setenv("KEYART_HISTORY_DAYS", "60")

    s = Settings(history_days=120)
    assert s.training_window_days == 7  # default: nobody sets it
    assert s.spark_master == "spark://file:7077"  # the file beats the default
    assert str(s.lake) == "/data/lake"
    assert s.quality_play_minutes == 25  # the environment beats the file
    assert s.history_days == 120  # keyword arguments beat the environment
    assert Settings().history_days == 60


def test_settings_is_read_once_until_cleared(clean_env, monkeypatch):
    config.settings.cache_clear()
    monkeypatch.setenv("KEYART_SPARK_MASTER", "local[2]")
    first = config.settings()
    monkeypatch.setenv("KEYART_SPARK_MASTER", "local[3]")
    assert config.settings() is first
    config.settings.cache_clear()
    assert config.settings().spark_master == "local[3]"


@pytest.mark.parametrize(("text", "error", "match"), [
    (None, FileNotFoundError, "KEYART_CONFIG points at .*k.yaml"),     # no such file
    ("- spark_master\n- local[2]\n", ValueError, "must be a mapping"),
    ("spark_mastr: local[2]\n", ValidationError, "Extra inputs"),      # an unknown field
])
def test_a_bad_config_file_is_refused(clean_env, monkeypatch, text, error, match):
    cfg = clean_env / "k.yaml"
    if text is not None:
        cfg.write_text(text)
    monkeypatch.setenv("KEYART_CONFIG", str(cfg))
    with pytest.raises(error, match=match):
        Settings()


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("attribution_window_hours", 0, "greater than 0"),
        ("policy", "ucb", "squarecb"),
        ("policy_floor", 0.3, "0.125"),
        ("squarecb_gamma", 0, "greater than 0"),
        ("egreedy_epsilon", 1.5, "less than or equal to 1"),
        ("prior_blend_n0", -1, "greater than or equal to 0"),
        ("nonexistent", 1, "Extra inputs"),
        ("serve_port", 70000, "less than or equal"),
    ],
)
def test_bad_values_are_refused(clean_env, field, value, match):
    with pytest.raises(ValidationError, match=match):
        Settings(**{field: value})


def test_policy_defaults_are_the_policy_configs(clean_env):
    assert PolicyConfig.from_settings(Settings()) == PolicyConfig()


def test_flat_policy_variables_reach_the_policy_config(clean_env, monkeypatch):
    for name, value in {"POLICY": "egreedy", "POLICY_FLOOR": "0.02", "SQUARECB_GAMMA": "400",
                        "EGREEDY_EPSILON": "0.2", "PRIOR_BLEND_N0": "10"}.items():
        monkeypatch.setenv(f"KEYART_{name}", value)
    cfg = PolicyConfig.from_settings(Settings())
    assert cfg == PolicyConfig(name="egreedy", floor=0.02, gamma=400.0, epsilon=0.2, prior_blend_n0=10.0)


def test_bad_policy_variable_is_refused(clean_env, monkeypatch):
    monkeypatch.setenv("KEYART_POLICY_FLOOR", "0.2")
    with pytest.raises(ValidationError, match="policy_floor"):
        Settings()
