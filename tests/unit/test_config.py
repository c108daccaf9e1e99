"""Configuration: defaults, flags over the file, and errors that name the key."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, load_config


def test_defaults_are_valid():
    config = load_config()
    assert config.upstream.address == "127.0.0.1:8001"
    assert config.tap.queue_size > 0
    assert config.drift.false_alarm_budget == "1/30d" and config.detection.rate_alarm.false_alarm_budget == "1/30d"


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("listen: 127.0.0.1:7000\nupstream:\n  address: model:8001\ntap:\n  queue_size: 16\n")
    config = load_config(path, {"upstream.address": "127.0.0.1:9", "listen": None})
    assert config.listen == "127.0.0.1:7000"
    assert config.upstream.address == "127.0.0.1:9"
    assert config.tap.queue_size == 16


@pytest.mark.parametrize("text, key", [
    ("upstream:\n  adress: x:1\n", "upstream.adress"),
    ("listen: nowhere\n", "listen"),
    ("tap:\n  queue_size: 0\n", "tap.queue_size"),
    ("tls:\n  cert_file: a.pem\n", "tls.key_file"),
    ("drift:\n  false_alarm_budget: 1/30m\n", "drift.false_alarm_budget"),      # minutes or months?
    ("drift:\n  false_alarm_budget: 0/1d\n", "drift.false_alarm_budget"),
    ("drift:\n  min_effect: -1\n", "drift.min_effect"),
    ("detection:\n  rate_alarm:\n    false_alarm_budget: often\n", "detection.rate_alarm.false_alarm_budget"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert key in str(raised.value)
