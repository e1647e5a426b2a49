"""``photowatch replay``: observation order, cadence / speed, how each file is written."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from photowatch.run import replay as replay_module
from photowatch.run.replay import deliver, observation_order, replay


def write_frame(path: Path, date_obs: str | None, seed: int) -> Path:
    from astropy.io import fits

    header = fits.Header()
    if date_obs:
        header["DATE-OBS"] = date_obs
    data = np.random.default_rng(seed).integers(0, 1000, (32, 32)).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


@pytest.fixture
def night(tmp_path) -> Path:
    """Names in the reverse of observation order, a sub-folder, a file without DATE-OBS."""
    raw = tmp_path / "raw"
    t0 = datetime(2020, 1, 29, 2, 0, 0)
    write_frame(raw / "c.fits", t0.isoformat(), 1)
    write_frame(raw / "b.fits", (t0 + timedelta(seconds=10)).isoformat(), 2)
    write_frame(raw / "sub" / "a.fits", (t0 + timedelta(seconds=30)).isoformat(), 3)
    write_frame(raw / "0_no_date.fits", None, 4)
    (raw / ".hidden.fits").write_bytes(b"x")
    (raw / "notes.txt").write_text("x")
    return raw


class FakeClock:
    """Stands in for the time module: sleeping advances the clock; records each sleep."""

    def __init__(self, on_sleep=None):
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep:
            self.on_sleep()
        self.now += seconds


def test_observation_order(night):
    files = observation_order(night)
    assert [str(f.rel) for f in files] == ["c.fits", "b.fits", "sub/a.fits", "0_no_date.fits"]
    assert files[0].obs_time == datetime(2020, 1, 29, 2, 0, 0, tzinfo=UTC)
    assert files[-1].obs_time is None


def test_cadence_divided_by_speed(night, tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(replay_module, "time", clock)
    lines = []
    assert replay(night, tmp_path / "watch", speed=10.0, echo=lines.append) == 0
    # arrivals due at 0, 1, 3 s (DATE-OBS 0, 10, 30 s / 10); the undated file right after
    assert sum(clock.sleeps) == pytest.approx(3.0)
    assert len(lines) == 4
    assert "c.fits" in lines[0] and "sub/a.fits" in lines[2] and "no DATE-OBS" in lines[3]
    for rel in ("c.fits", "b.fits", "sub/a.fits", "0_no_date.fits"):
        assert (tmp_path / "watch" / rel).read_bytes() == (night / rel).read_bytes()
    assert not (tmp_path / "watch" / ".hidden.fits").exists()
    assert not (tmp_path / "watch" / "notes.txt").exists()


def test_default_delivery_renames_a_hidden_temporary(tmp_path, monkeypatch):
    src = write_frame(tmp_path / "src.fits", "2020-01-29T02:00:00", 5)
    renames = []
    real_replace = os.replace

    def spy(a, b):
        renames.append((Path(a), Path(b)))
        return real_replace(a, b)

    monkeypatch.setattr(replay_module.os, "replace", spy)
    dest = tmp_path / "watch" / "frame.fits"
    deliver(src, dest)
    [(tmp, final)] = renames
    assert final == dest and tmp.parent == dest.parent
    assert tmp.name.startswith(".") and tmp.name.endswith(".tmp")
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["frame.fits"]


def test_chunked_delivery_writes_the_final_name_in_pieces(tmp_path, monkeypatch):
    src = write_frame(tmp_path / "src.fits", "2020-01-29T02:00:00", 6)
    dest = tmp_path / "watch" / "frame.fits"
    sizes = []
    clock = FakeClock(on_sleep=lambda: sizes.append(dest.stat().st_size))
    monkeypatch.setattr(replay_module, "time", clock)
    deliver(src, dest, chunked=True, chunks=4, duration_s=0.5)
    full = src.stat().st_size
    assert len(sizes) == 3 and all(0 < s < full for s in sizes) and sizes == sorted(sizes)
    assert sum(clock.sleeps) == pytest.approx(0.5 * 3 / 4)
    assert dest.read_bytes() == src.read_bytes()


@pytest.mark.parametrize(("args", "code"), [
    (lambda raw, w: (raw / "missing", w), 2),
    (lambda raw, w: (raw, raw / "inside"), 2),
])
def test_bad_arguments(night, tmp_path, args, code, capsys):
    assert replay(*args(night, tmp_path / "watch")) == code
    assert capsys.readouterr().err.startswith("photowatch replay: ")


def test_bad_speed_and_empty_folder(night, tmp_path):
    assert replay(night, tmp_path / "watch", speed=0) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert replay(empty, tmp_path / "watch") == 1


def test_command_line(night, tmp_path):
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in night.rglob("*.fits")}
    watch = tmp_path / "watch"
    result = subprocess.run([sys.executable, "-m", "photowatch", "replay", str(night),
                             str(watch), "--speed", "1000", "--chunked"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all("chunked" in line for line in lines)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in night.rglob("*.fits")} == before
    for path in before:
        if not path.name.startswith("."):
            assert (watch / path.relative_to(night)).read_bytes() == path.read_bytes()
