"""Mistakes a person can fix: configuration checked at start (exit 2, nothing written),
no store (exit 1, nothing created), --night validated, held frames taken up by themselves
once the configuration is fixed, and the exit statuses documented in --help."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photowatch import cli
from photowatch.core.config import Settings
from photowatch.core.instruments import available_profiles
from photowatch.run.engine import Engine
from photowatch.run.ingest import ingest_file
from photowatch.state.store import Store


def newcam_frame(path: Path, **cards) -> Path:
    """A FITS frame from an imager no profile knows (INSTRUME='NEWCAM', type in FRAMETYP)."""
    h = fits.Header()
    h["INSTRUME"] = "NEWCAM"
    h["FRAMETYP"] = "object"
    h["DATE-OBS"] = "2020-01-29T03:00:00"
    h["EXPTIME"] = 30.0
    h["FILTER"] = "r"
    h["OBJECT"] = "M1"
    for k, v in cards.items():
        h[k] = v
    rng = np.random.default_rng(len(str(path)))
    fits.PrimaryHDU(rng.integers(900, 1100, (64, 64)).astype(np.uint16), h).writeto(path)
    return path


def newcam_profile(folder: Path, type_keyword: str = "FRAMETYP") -> Path:
    """A profile for NEWCAM that reads its frame type from ``type_keyword`` and infers
    nothing (``infer = false``). With the default it is the fix; with another keyword it
    is the mistake a person makes writing a profile: frames it cannot type are held."""
    import re

    folder.mkdir(parents=True, exist_ok=True)
    text = available_profiles()["generic"].read_text()
    text = text.replace('name = "generic"', 'name = "newcam"')
    text = text.replace("detect_values = []", 'detect_values = ["NEWCAM"]')
    text = text.replace("infer = true", "infer = false")
    text, n = re.subn(r"(\[types\]\s*\nkeywords = )\[[^\]]*\]", rf'\1["{type_keyword}"]', text)
    assert n == 1, "generic.toml's [types] keywords not found"
    (folder / "newcam.toml").write_text(text)
    return folder


@pytest.fixture
def raw(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    newcam_frame(folder / "newcam.0001.fits")
    return folder


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -------------------------------------------------------------- 2. configuration at start
@pytest.mark.parametrize(("extra", "needle"), [
    (["--instrument", "lmii"], "--instrument: unknown instrument 'lmii'"),
    (["--catalog", "{tmp}/missing.ecsv"], "--catalog: {tmp}/missing.ecsv: no such file"),
    (["--catalog", "{tmp}"], "not a file"),
])
def test_bad_configuration_exits_2_with_one_line_and_writes_nothing(raw, tmp_path, capsys,
                                                                    extra, needle):
    out = tmp_path / "out"
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    code, stdout, err = run(["reduce", raw, "--out", out, *extra], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and needle.replace("{tmp}", str(tmp_path)) in err
    assert not (out / "state.sqlite").exists()


def test_an_output_folder_that_cannot_be_written_exits_2(raw, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run(["reduce", raw, "--out", tmp_path / "afile" / "out"], capsys)
    assert code == 2 and "--out" in err and "Not a directory" in err
    assert err.strip().count("\n") == 0


def test_an_unreadable_profile_exits_2(raw, tmp_path, capsys):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "broken.toml").write_text("this = = not toml\n")
    config = tmp_path / "c.toml"
    config.write_text(f'[instrument]\nprofile_dir = "{profiles}"\n')
    code, _, err = run(["reduce", raw, "--out", tmp_path / "out", "--config", config], capsys)
    assert code == 2 and "instrument.profile_dir" in err and "broken.toml" in err
    assert not (tmp_path / "out" / "state.sqlite").exists()


@pytest.mark.parametrize("command", [["finalize"], ["status"], ["masters"], ["requeue"],
                                     ["masters", "rebuild"]])
def test_no_store_exits_1_and_creates_nothing(tmp_path, capsys, command):
    out = tmp_path / "typo"
    code, _, err = run([*command, "--out", out], capsys)
    assert code == 1 and "no state.sqlite" in err
    assert not out.exists()


def test_night_is_validated(raw, tmp_path, capsys):
    out = tmp_path / "out"
    config = tmp_path / "c.toml"
    config.write_text(f'[instrument]\nprofile_dir = "{newcam_profile(tmp_path / "p")}"\n')
    # no calibrations: the frame ends rejected for want of masters (a problem: exit 3)
    assert run(["reduce", raw, "--out", out, "--config", config], capsys)[0] == 3
    for night in ("2031-13-45", "20200129", "tonight"):
        code, _, err = run(["finalize", "--out", out, "--night", night], capsys)
        assert code == 2 and "not a date" in err, err
    code, _, err = run(["status", "--out", out, "--night", "2031-12-01"], capsys)
    assert code == 2 and "no frames of that night" in err and "2020-01-28" in err
    assert not (out / "report" / "2031-12-01").exists()


def test_help_documents_exit_statuses(capsys):
    for argv in (["--help"], ["finalize", "--help"], ["reduce", "--help"],
                 ["requeue", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = capsys.readouterr().out
        assert "exit status" in text and "3  done with problems" in text
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "3  done with problems" in readme or "| 3 |" in readme


# -------------------------------------------------------------- 2. held, then fixed
def test_a_header_the_profile_cannot_read_is_held_then_taken_up_by_itself(raw, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"
    mistaken = newcam_profile(tmp_path / "mistaken", type_keyword="IMAGETYP")
    config = tmp_path / "mistaken.toml"
    config.write_text(f'[instrument]\nprofile_dir = "{mistaken}"\n')
    code, stdout, _ = run(["reduce", raw, "--out", out, "--config", config], capsys)
    assert code == 3 and "done with problems: 1 held" in stdout
    store = Store(out / "state.sqlite")
    (row,) = store.frames()
    assert row["state"] == "held" and row["info_json"] is None
    assert "profile newcam" in row["reason"] and "IMAGETYP" in row["reason"]
    status = run(["status", "--out", out], capsys)[1]
    assert "held (fix the configuration" in status and "newcam.0001.fits" in status
    entry = json.loads(run(["status", "--out", out, "--json"], capsys)[1])["frames"][0]
    assert entry["state"] == "held"
    # the same configuration: still held, no new problem
    engine = Engine(Settings().with_overrides(paths={"output_dir": str(out)},
                                              instrument={"profile_dir": str(mistaken)}))
    engine.startup()
    assert store.frame(row["id"])["state"] == "held"
    engine.shutdown()
    # the configuration fixed (a profile for the camera): the next start takes it up
    fixed = Settings().with_overrides(paths={"output_dir": str(out)}, instrument={
        "profile_dir": str(newcam_profile(tmp_path / "profiles"))})
    engine = Engine(fixed)
    engine.startup()
    engine.shutdown()
    now = store.frame(row["id"])
    assert now["state"] == "received" and now["instrument"] == "newcam"
    assert now["kind"] == "object" and now["night"] == "2020-01-28"
    events = [e["event"] for e in store.events(row["id"])]
    assert "requeued" in events


def test_requeue_reads_a_never_classified_frame_again(raw, tmp_path, capsys):
    out = tmp_path / "out"
    store = Store(out / "state.sqlite")
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    bad = raw / "late.fits"
    data = (raw / "newcam.0001.fits").read_bytes()
    bad.write_bytes(data[:2880])  # cut short: quarantined as truncated
    newcam_frame(raw / "other.fits", FRAMETYP="object", EXPTIME=31.0)
    ingested = ingest_file(store, bad, settings)
    assert ingested.state == "quarantined" and "truncated" in ingested.reason
    code, stdout, _ = run(["requeue", "--out", out, "--state", "quarantined", bad], capsys)
    assert code == 3 and "not requeued" in stdout  # still truncated: said so, kept
    assert store.frame(ingested.frame_id)["state"] == "quarantined"
    shutil.copy(raw / "other.fits", bad)  # the copy finished
    config = tmp_path / "c.toml"
    config.write_text(f'[instrument]\nprofile_dir = "{newcam_profile(tmp_path / "p")}"\n')
    code, stdout, _ = run(["requeue", "--out", out, "--config", config, "--reason",
                           "copy completed", bad], capsys)
    assert code == 0, stdout
    row = store.frame(ingested.frame_id)
    assert row["state"] == "received" and row["instrument"] == "newcam"
    assert not row["sha256"].startswith("bad:")
