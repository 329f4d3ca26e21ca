"""Settings: one YAML file plus environment overrides, validated at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.settings import SettingsError, load_settings, write_settings

REPO = Path(__file__).resolve().parents[2]


def test_example_site_file_loads() -> None:
    settings = load_settings(REPO / "deploy" / "site.example.yaml", environ={})
    assert settings.listener.port == 11112
    assert settings.outputs.destinations[0].ae_title == "PACS"


def test_defaults_are_safe_without_a_file() -> None:
    settings = load_settings(None, environ={})
    assert settings.listener.host == "127.0.0.1", (
        "the listener must not open to the network by default"
    )
    assert settings.queue.broker_url == "embedded"
    assert settings.outputs.destinations == []


def test_unknown_key_is_an_error_that_names_it(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("listener:\n  prot: 104\n")
    with pytest.raises(SettingsError, match="prot"):
        load_settings(path, environ={})


def test_environment_overrides_the_file_with_typed_values(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("listener:\n  port: 104\n")
    settings = load_settings(
        path,
        environ={
            "PACS_AI__LISTENER__PORT": "11113",
            "PACS_AI__QUEUE__URGENT_CALLING_AETS": "[ER1, ER2]",
        },
    )
    assert settings.listener.port == 11113
    assert settings.queue.urgent_calling_aets == ["ER1", "ER2"]


def test_invalid_ae_title_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("listener:\n  ae_title: 'WAY_TOO_LONG_AE_TITLE'\n")
    with pytest.raises(SettingsError):
        load_settings(path, environ={})


def test_relative_paths_resolve_against_the_settings_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "site.yaml"
    path.parent.mkdir()
    path.write_text("storage:\n  data_dir: data\n")
    assert (
        load_settings(path, environ={}).storage.data_dir == (tmp_path / "conf" / "data").resolve()
    )


def test_written_settings_read_back_identically(tmp_path: Path) -> None:
    settings = load_settings(REPO / "deploy" / "site.example.yaml", environ={})
    write_settings(settings, tmp_path / "copy.yaml")
    assert load_settings(tmp_path / "copy.yaml", environ={}) == settings
