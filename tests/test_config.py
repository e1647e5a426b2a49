"""Settings: defaults load, every key of config.toml is known, errors name the file and key."""

import subprocess
import sys
from pathlib import Path

import pytest

from photowatch.core.config import Settings, load_settings
from photowatch.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    s = Settings()
    assert s.calibration.min_inputs == 3
    assert s.calibration.flat_amin == 0.2 and s.calibration.flat_amax == 0.8


def test_repository_config_loads():
    s = load_settings(ROOT / "config.toml")
    assert s.source.endswith("config.toml")


def test_repository_config_sets_every_key():
    """config.toml documents every key the settings know (and no others)."""
    import tomllib

    text = (ROOT / "config.toml").read_text()
    data = tomllib.loads(text)

    def walk(model, data, prefix):
        for name in type(model).model_fields:
            if name == "source":
                continue
            sub = getattr(model, name)
            if sub is None:  # TOML has no null: an optional key is shown commented out
                assert f"# {name} = " in text, f"config.toml does not show {prefix}{name}"
                continue
            assert name in data, f"config.toml lacks {prefix}{name}"
            if hasattr(type(sub), "model_fields"):
                walk(sub, data[name], f"{prefix}{name}.")

    walk(Settings(), data, "")


@pytest.mark.parametrize("text, key", [
    ("[calibration]\nmin_input = 3\n", "calibration.min_input: unknown key"),
    ("[stages.cosmics]\nniter = 'two'\n", "stages.cosmics.niter"),
    ("[calibration]\nflat_amin = 1.5\n", "calibration.flat_amin"),
    ("[daemon]\nworkers = -1\n", "daemon.workers"),
    ("[bogus]\nx = 1\n", "bogus: unknown key"),
])
def test_errors_name_file_and_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    message = str(err.value)
    assert str(path) in message and key in message
    assert "\n" not in message


def test_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[calibration\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_lookup_order(tmp_path, monkeypatch):
    env = tmp_path / "env.toml"
    env.write_text("[calibration]\nmin_inputs = 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PHOTOWATCH_CONFIG", str(env))
    assert load_settings().calibration.min_inputs == 7
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[calibration]\nmin_inputs = 5\n")
    assert load_settings(explicit).calibration.min_inputs == 5
    monkeypatch.delenv("PHOTOWATCH_CONFIG")
    (tmp_path / "config.toml").write_text("[calibration]\nmin_inputs = 4\n")
    assert load_settings().calibration.min_inputs == 4
    (tmp_path / "config.toml").unlink()
    assert load_settings().source == "built-in defaults"


def test_cli_config_error_exit_status(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[stages]\nbogus = 1\n")
    proc = subprocess.run([sys.executable, "-m", "photowatch", "status", "--config", str(bad),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "stages.bogus" in lines[0] and str(bad) in lines[0]
