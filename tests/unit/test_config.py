import pytest
from pydantic import ValidationError

from keyart.config import load_settings


def test_defaults_are_embedded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.spark_master == "local[*]"
    assert s.tracking_uri.startswith("sqlite:///")
    assert s.lake == s.home / "lake"


def test_file_then_environment_then_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "k.yaml"
    cfg.write_text("spark_master: spark://file:7077\nquality_play_minutes: 20\nlake_root: /data/lake\n")
    monkeypatch.setenv("KEYART_CONFIG", str(cfg))
    monkeypatch.setenv("KEYART_QUALITY_PLAY_MINUTES", "25")
    s = load_settings()
    assert s.spark_master == "spark://file:7077"
    assert s.quality_play_minutes == 25  # environment beats the file
    assert str(s.lake) == "/data/lake"
    assert load_settings(spark_master="local[2]").spark_master == "local[2]"


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("attribution_window_hours", 0, "greater than 0"),
        ("policy", "ucb", "squarecb"),
        ("policy_floor", 0.3, "0.125"),
        ("nonexistent", 1, "Extra inputs"),
        ("serve_port", 70000, "less than or equal"),
    ],
)
def test_bad_values_are_refused(field, value, match):
    with pytest.raises(ValidationError, match=match):
        load_settings(**{field: value})


def test_missing_config_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYART_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_settings()
