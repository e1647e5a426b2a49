"""The night report: files, links, every frame with its state, cached images, a browser check."""

from __future__ import annotations

import importlib.util
import json
import os
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from photowatch.core.config import Settings
from photowatch.report.html import settings_toml, write_report
from photowatch.state.store import Store

NIGHT = "2020-01-28"
CHROMIUM = Path("/usr/bin/chromium")


# ---------------------------------------------------------------------------- a hand-made night

def _fits(path: Path, shape=(64, 80), seed=0, wht=False) -> str:
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    sci = (1000 + 10 * rng.standard_normal(shape)).astype(np.float32)
    sci[20:23, 30:33] += 500  # a "star"
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(sci, name="SCI")]
    if wht:
        w = np.ones(shape, np.float32)
        w[:, :5] = 0  # no data: shown in the no-data colour
        hdus.append(fits.ImageHDU(w, name="WHT"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return str(path)


def _png(path: Path) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(path)
    return str(path)


def _info(kind: str, minute: int, *, filt: str | None = None, target: str | None = None,
          exptime: float = 60.0) -> dict:
    letter = {"bias": "b", "dark": "d", "flat": "f", "object": "o"}[kind]
    return {"std_name": f"20200129T02{minute:02d}00C0{letter}.fits", "instrument": "lmi",
            "kind": kind, "camera": "C0", "filter": filt, "target": target, "binning": "4x4",
            "readout": "", "night": NIGHT, "exptime_s": exptime,
            "obs_time": f"2020-01-29T02:{minute:02d}:00+00:00"}


def _qc(minute: int, filt: str, fwhm: float, zp: float | None, accepted: bool) -> dict:
    return {"time": f"2020-01-29T02:{minute:02d}:00+00:00", "filter": filt, "target": "M1",
            "exptime": 60.0, "fwhm_arcsec": fwhm, "ellipticity": 0.08, "nsources": 120,
            "sky_e": 3000.0, "sky_e_per_s": 50.0 + minute, "skynoise_e": 60.0, "ncr": 30,
            "airmass": 1.1, "aststat": "ok", "astrms_arcsec": 0.05, "astnstar": 40,
            "astreason": None, "zp": zp, "zp_err": 0.01, "zp_n": 30,
            "zp_per_s": None if zp is None else zp - 4.4, "flxscale": 1.0,
            "transparency_mag": None, "phot_status": "ok", "phot_reason": None,
            "accepted": accepted, "checks": [["fwhm_arcsec", fwhm, 4.0, accepted]],
            "timings": {"cosmics": 0.5, "sources": 0.1}}


def build_night(out: Path) -> Store:
    """A small night: calibrations, 5 science frames in 2 filters, every problem state."""
    store = Store(out / "state.sqlite", command="test")
    raw = out.parent / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    n = [0]

    def add(info, state="received", reason=None, name=None):
        n[0] += 1
        fid, _ = store.add_frame(path=str(raw / (name or f"raw.{n[0]:04d}.fits")),
                                 sha256=f"{n[0]:064x}", size=100, mtime=1.0, info=info,
                                 state=state, reason=reason)
        return fid

    def finish(fid, state, **fields):
        assert store.transition(fid, ["received"], "processing")
        assert store.transition(fid, ["processing"], state, **fields)

    bias = [add(_info("bias", m, exptime=0.0)) for m in (1, 2, 3)]
    for fid in bias:
        finish(fid, "used")
    flat_bad = add(_info("flat", 5, filt="SDSS-R", exptime=3.0))
    finish(flat_bad, "rejected", reason="too faint: median 800 ADU", level="warning")
    mpath = _fits(out / "masters" / NIGHT / "versions" / "bias_C0_v003.fits", seed=1)
    for v in (1, 2, 3):
        store.add_master(kind="bias", camera="C0", filter="", binning="4x4", readout="",
                         night=NIGHT, version=v, ninputs=v, inputs=bias[:v], path=mpath,
                         provisional=v < 3, method="running mean")
    minute = 10
    for filt, fwhms in (("SDSS-R", (1.2, 1.3, 4.8)), ("SDSS-I", (1.1, 1.4))):
        for fwhm in fwhms:
            fid = add(_info("object", minute, filt=filt, target="M1"))
            ok = fwhm < 4
            name = _info("object", minute)["std_name"]
            product = _fits(out / "reduced" / NIGHT / name, seed=minute)
            ql = _png(out / "reduced" / NIGHT / name.replace(".fits", ".png"))
            finish(fid, "reduced" if ok else "rejected",
                   reason=None if ok else f"FWHM {fwhm}\" is above 4.0\"",
                   product=product, quicklook=ql, coadd="added" if ok else "excluded",
                   qc_json=_qc(minute, filt, fwhm, 30.0 + minute / 100, ok))
            minute += 3
    add(_info("object", 40, filt="SDSS-R", target="M1"), state="ignored",
        reason="focus frame: not reduced")
    add(_info("object", 41, filt="SDSS-R", target="M1"))  # still queued
    add(None, state="quarantined", reason="not a FITS file: no SIMPLE card", name="junk.fits")
    cpath = _fits(out / "coadds" / NIGHT / "coadd_M1_SDSS-R.fits", shape=(90, 90), wht=True)
    store.upsert_coadd(night=NIGHT, target="M1", filter="SDSS-R", path=cpath,
                       stacktype="QUICKLOOK", ncombine=2, exptime=120.0, magzp=30.1)
    ipath = _fits(out / "coadds" / NIGHT / "coadd_M1_SDSS-I.fits", shape=(90, 90), seed=3)
    iql = _png(out / "coadds" / NIGHT / "coadd_M1_SDSS-I.png")
    store.upsert_coadd(night=NIGHT, target="M1", filter="SDSS-I", path=ipath,
                       stacktype="QUICKLOOK", ncombine=2, exptime=120.0, magzp=29.8,
                       quicklook=iql)
    store.event("stage_failed", frame_id=bias[0], file="raw.0001.fits", level="error",
                stage="astrometry", error_class="StageFailed", message="no stars found",
                action="no WCS")
    store.event("bug", frame_id=bias[1], file="raw.0002.fits", level="error", action="retried",
                message="Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                        "KeyError: 'dec'")
    return store


@pytest.fixture
def night(tmp_path):
    out = tmp_path / "out"
    store = build_night(out)
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    yield out, store, settings
    store.close()


# ---------------------------------------------------------------------------- helpers

class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("src", "href") and value is not None:
                self.links.append(value)

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def check_page(index: Path) -> _Page:
    page = parse(index)
    assert {"html", "head", "body", "table", "style"} <= set(page.tags)
    assert "link" not in page.tags  # no external stylesheet
    for link in page.links:
        assert not link.lower().startswith(("http:", "https:", "//")), link
        if link.startswith("#"):
            continue
        target = index.parent / unquote(link.split("#")[0])
        assert target.is_file(), f"broken link {link}"
    return page


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


# ---------------------------------------------------------------------------- tests

def test_report_files_links_and_thumbnails(night):
    out, store, settings = night
    index = write_report(out, store, NIGHT, settings, final=False)
    folder = out / "report" / NIGHT
    assert index == folder / "index.html"
    assert (folder / "night.json").is_file()
    page = check_page(index)
    assert "img" in page.tags
    text = " ".join(page.text)
    assert "QUICK-LOOK" in text and "FINAL" not in text
    assert "http-equiv" in index.read_text()  # a quick-look page reloads itself
    for needle in ("too faint: median 800 ADU", "focus frame", "not a FITS file",
                   "no stars found", "FWHM 4.8", "KeyError: 'dec'"):
        assert needle in text, needle
    assert "details" in page.tags  # the traceback is folded under its last line
    img = folder / "img"
    for name in ("master_bias_C0_4x4_thumb.png", "master_bias_C0_4x4.png",
                 "coadd_M1_SDSS-R_thumb.png", "coadd_M1_SDSS-R.png",
                 "coadd_M1_SDSS-I_thumb.png", "conditions.png", "latency.png"):
        assert (img / name).stat().st_size > 100, name
    assert not (img / "coadd_M1_SDSS-I.png").exists()  # its own quick-look PNG is linked
    srcs = [link for link in page.links if link.endswith(".png")]
    assert any("reduced/" in s for s in srcs) and any("coadd_M1_SDSS-I.png" in s for s in srcs)
    assert any(link.endswith(".fits") for link in page.links)
    from PIL import Image

    with Image.open(img / "coadd_M1_SDSS-R_thumb.png") as im:
        assert max(im.size) <= 240
        rgb = im.convert("RGB")
        assert rgb.getpixel((1, im.size[1] // 2)) == (28, 33, 42)  # WHT = 0: no-data colour


def test_night_json_has_every_frame_with_its_state(night):
    out, store, settings = night
    write_report(out, store, NIGHT, settings, final=True)
    data = json.loads((out / "report" / NIGHT / "night.json").read_text())
    assert data["night"] == NIGHT and data["final"] is True
    rows = store.frames()
    assert len(data["frames"]) == len(rows) == data["counts"]["total"]
    states = {f["file"]: f["state"] for f in data["frames"]}
    assert states == {r["raw_name"]: r["state"] for r in rows}
    assert data["counts"]["by_state"] == {"used": 3, "rejected": 2, "reduced": 4, "ignored": 1,
                                          "received": 1, "quarantined": 1}
    assert data["counts"]["by_type"]["unclassified"] == {"quarantined": 1}
    reduced = [f for f in data["frames"] if f["state"] == "reduced"]
    assert all(f["latency_s"] is not None and f["latency_s"] >= 0 for f in reduced)
    assert all(f["fwhm_arcsec"] and f["zp"] and f["product"] and f["quicklook"] for f in reduced)
    assert [m["version"] for m in data["masters"]] == [3]
    assert data["masters"][0]["nversions"] == 3
    assert {(c["target"], c["filter"]) for c in data["coadds"]} == {("M1", "SDSS-R"),
                                                                     ("M1", "SDSS-I")}
    assert any(e["level"] == "error" and e["message"] == "no stars found"
               for e in data["errors"])
    assert {"photowatch", "numpy", "astropy", "astroscrappy", "sep", "python"} <= set(
        data["versions"])
    assert data["settings"]["paths"]["output_dir"] == str(out)
    assert data["latency_s"]["science"]["n"] == 5
    text = (out / "report" / NIGHT / "index.html").read_text()
    assert "FINAL" in text and "http-equiv" not in text


def test_refresh_remakes_only_changed_images(night):
    # what a refresh costs is measured in benchmarks/bench_report.py, not asserted here
    out, store, settings = night
    write_report(out, store, NIGHT, settings, final=False)
    img = out / "report" / NIGHT / "img"
    before = mtimes(img)
    write_report(out, store, NIGHT, settings, final=False)
    assert mtimes(img) == before

    # a new master version (new file time): only the master's images are remade
    master = Path(store.latest_masters(NIGHT)[0]["path"])
    st = master.stat()
    os.utime(master, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    write_report(out, store, NIGHT, settings, final=False)
    after = mtimes(img)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"master_bias_C0_4x4_thumb.png", "master_bias_C0_4x4.png"}

    # a new measured frame: the plots are remade, the thumbnails are not
    fid, _ = store.add_frame(path=str(out / "raw.new.fits"), sha256="f" * 64, size=1, mtime=1.0,
                             info=_info("object", 50, filt="SDSS-I", target="M1"))
    store.transition(fid, ["received"], "processing")
    store.transition(fid, ["processing"], "reduced",
                     qc_json=_qc(50, "SDSS-I", 1.2, 30.2, True))
    write_report(out, store, NIGHT, settings, final=False)
    again = mtimes(img)
    changed = {k for k in again if again[k] != after.get(k)}
    assert changed == {"conditions.png", "latency.png"}


def test_missing_files_are_not_linked(night):
    out, store, settings = night
    (out / "coadds" / NIGHT / "coadd_M1_SDSS-R.fits").unlink()
    next((out / "reduced" / NIGHT).glob("*.png")).unlink()
    index = write_report(out, store, NIGHT, settings, final=False)
    check_page(index)  # every link still points to a file


def test_empty_night(tmp_path):
    out = tmp_path / "out"
    store = Store(out / "state.sqlite")
    index = write_report(out, store, "2021-05-05", Settings(), final=False)
    check_page(index)
    data = json.loads((index.parent / "night.json").read_text())
    assert data["frames"] == [] and data["counts"]["total"] == 0
    store.close()


def test_settings_toml_loads_back():
    settings = Settings()
    data = settings.model_dump(mode="json")
    loaded = tomllib.loads(settings_toml(data))
    assert loaded["stages"]["cosmics"] == data["stages"]["cosmics"]
    assert loaded["daemon"]["patterns"] == data["daemon"]["patterns"]
    assert "longitude_deg" not in loaded["site"]  # None: a comment


@pytest.mark.slow
def test_report_of_a_reduced_simulated_night(sim_small, tmp_path):
    from photowatch.run.batch import reduce_directory

    out = tmp_path / "out"
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    try:
        reduce_directory(sim_small.raw_dir, settings, catalog=str(sim_small.catalog_path),
                         progress=False)
    except Exception as exc:  # the pipeline is someone else's test; the report is ours
        pytest.skip(f"the pipeline did not run: {exc}")
    store = Store(out / "state.sqlite")
    night = store.nights()[-1]
    index = write_report(out, store, night, settings, final=False)
    check_page(index)
    data = json.loads((index.parent / "night.json").read_text())
    assert len(data["frames"]) == len(store.frames())
    assert {f["state"] for f in data["frames"]} <= {"used", "reduced", "rejected"}
    assert data["masters"] and all(
        (index.parent / "img").glob("master_*_thumb.png") for _ in [0])
    assert "arrived together" in index.read_text()  # a batch: latency is mostly queueing
    store.close()


def test_batch_arrivals_are_told_apart_from_a_live_night():
    from photowatch.report.html import _arrived_as_a_batch

    def frames(arrival_step_s):
        return [{"obs_time": f"2020-01-29T02:{10 + 2 * i:02d}:00",
                 "arrived_at": f"2020-01-29T03:00:{0:02d}" if arrival_step_s == 0 else
                 f"2020-01-29T02:{10 + 2 * i:02d}:{arrival_step_s:02d}"} for i in range(10)]

    assert _arrived_as_a_batch(frames(0))
    assert not _arrived_as_a_batch(frames(40))
    assert not _arrived_as_a_batch(frames(0)[:2])


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
def test_renders_in_chromium(night, tmp_path):
    from PIL import Image

    spec = importlib.util.spec_from_file_location(
        "render_report", Path(__file__).parents[1] / "tools" / "render_report.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, store, settings = night
    index = write_report(out, store, NIGHT, settings, final=False)
    png = tmp_path / "page.png"
    assert tool.main([str(index), str(png), "--width", "1200"]) == 0
    with Image.open(png) as im:
        assert im.size[0] == 1200 and im.size[1] > 1500  # the whole page, not one screen
        rgb = np.asarray(im.convert("RGB"), dtype=float)
    assert png.stat().st_size > 20_000
    assert rgb.std() > 10  # not a blank page
    # the dark page background dominates; bright text and images are present
    assert np.median(rgb) < 60 and (rgb.max(axis=2) > 200).mean() > 0.001


# ---------------------------------------------------------------------------- issue 19 (report)

def test_values_are_escaped_by_the_templates(night):
    """Text from files and the store is shown as text, never as markup (autoescape)."""
    out, store, settings = night
    evil = "<script>alert('x')</script> & \"quoted\""
    fid, _ = store.add_frame(path=str(out.parent / "raw" / "evil.fits"), sha256="e" * 64,
                             size=1, mtime=1.0, info=_info("object", 50, filt="SDSS-R",
                                                           target="<b>M1</b>"),
                             state="quarantined", reason=evil)
    store.event("bug", frame_id=fid, file="evil.fits", level="error", message=evil,
                action="<i>none</i>")
    index = write_report(out, store, NIGHT, settings, final=True)
    text = index.read_text(encoding="utf-8")
    page = check_page(index)
    assert page.tags.count("script") == 1  # the table-sorting script only
    assert "&lt;script&gt;alert(" in text and "<script>alert(" not in text
    assert "&lt;b&gt;M1&lt;/b&gt;" in text and "&lt;i&gt;none&lt;/i&gt;" in text
    shown = "".join(page.text)
    assert evil in shown and "<b>M1</b>" in shown  # the reader sees the text as it is
    facts = json.loads((index.parent / "night.json").read_text())
    assert any(f["reason"] == evil for f in facts["frames"])


def test_report_imports_no_run_layer():
    """report/ sits below run/: run/status.py imports the status facts from report/."""
    import ast

    import photowatch.report

    folder = Path(photowatch.report.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("photowatch.run") for n in names), (path, names)
            assert not (isinstance(node, ast.Attribute) and node.attr == "execute"), path


def test_status_json_and_night_json_share_the_frame_entries(night):
    from photowatch.run.status import status_data

    out, store, settings = night
    status = status_data(out, NIGHT)
    index = write_report(out, store, NIGHT, settings, final=False)
    facts = json.loads((index.parent / "night.json").read_text())
    by_name = {f["file"]: f for f in facts["frames"]}
    assert status["frames"] and len(status["frames"]) < len(facts["frames"])  # + unclassified
    for entry in status["frames"]:
        assert set(entry) == {"file", "path", "name", "type", "filter", "target", "night",
                              "obs_time", "state", "reason", "product", "stale",
                              "provisional", "coadd", "fwhm_arcsec", "zp", "astrometry",
                              "limmag"}  # issue 21: the frame's 5-sigma depth
        assert {k: by_name[entry["file"]][k] for k in entry} == entry
    assert facts["counts"]["total"] == status["total"] + 1  # junk.fits has no night


def test_store_report_queries(tmp_path):
    """The report lane's named store queries against hand-made frames, events and masters."""
    store = Store(tmp_path / "state.sqlite", command="test")

    def add(i, night, minute, state="received"):
        info = None if night is None else {**_info("object", minute, filt="g"), "night": night}
        return store.add_frame(path=str(tmp_path / f"f{i}.fits"), sha256=f"{i:064x}", size=1,
                               mtime=1.0, info=info, state=state,
                               header={"TELESCOP": f"T{i}"} if night else None)[0]

    a = add(1, "2021-01-01", 30)
    b = add(2, "2021-01-01", 10)
    orphan1 = add(3, None, 0, state="quarantined")  # nearest: b (id 2)
    c = add(4, "2021-01-02", 5)
    add(5, "2021-01-02", 6)
    orphan2 = add(6, None, 0, state="quarantined")  # nearest: id 5, the 2nd night
    assert [r["id"] for r in store.frames_of_night("2021-01-01")] == [b, a]  # by obs_time
    assert len(store.frames_of_night()) == 6
    assert [r["id"] for r in store.unclassified_frames_of_night("2021-01-01")] == [orphan1]
    assert [r["id"] for r in store.unclassified_frames_of_night("2021-01-02")] == [orphan2]
    assert [r["id"] for r in store.frames_by_ids([a, orphan1, b])] == [orphan1, b, a]
    assert store.night_header_value("2021-01-01", "TELESCOP") in ("T1", "T2")
    assert store.night_header_value("2021-01-01", "NOSUCH") is None
    assert {r["id"] for r in store.problem_state_frames("2021-01-02")} == {orphan1, orphan2}
    assert store.transition(c, ["received"], "processing")
    assert store.transition(c, ["processing"], "reduced")
    done = store.first_terminal_times([a, c, orphan1])
    assert set(done) == {c, orphan1} and done[c] >= done[orphan1]
    m1 = store.add_master(kind="bias", camera="C0", filter="", binning="1x1", readout="",
                          night="2021-01-01", version=1, ninputs=1, inputs=[b],
                          path=str(tmp_path / "m1.fits"), provisional=False, method="mean")
    store.add_master(kind="bias", camera="C0", filter="", binning="1x1", readout="",
                     night="2021-01-02", version=1, ninputs=1, inputs=[c],
                     path=str(tmp_path / "m2.fits"), provisional=False, method="mean")
    assert len(store.masters_of_night("2021-01-02")) == 1 and len(store.masters_of_night()) == 2
    assert [m["night"] for m in store.masters_from_other_nights(
        "2021-01-02", [m1, None, 99])] == ["2021-01-01"]
    assert store.masters_from_other_nights("2021-01-01", [m1]) == []
    store.event("oops", level="error", message="no frame")
    store.event("oops", frame_id=orphan2, level="warning", message="orphan")
    store.event("oops", frame_id=c, level="error", message="other night")
    msgs = [e["message"] for e in store.night_problem_events("2021-01-01", [orphan1], None)]
    assert "other night" not in msgs and "orphan" not in msgs and "no frame" not in msgs
    msgs = [e["message"] for e in store.night_problem_events(
        "2021-01-02", [orphan2], ("2000-01-01", "2999-01-01"))]
    assert {"orphan", "other night", "no frame"} <= set(msgs)
    assert store.duplicate_files() == []
    store.add_frame(path=str(tmp_path / "copy.fits"), sha256=f"{1:064x}", size=1, mtime=1.0)
    assert [(r["path"], r["frame_id"]) for r in store.duplicate_files()] == [
        (str(tmp_path / "copy.fits"), a)]
    store.close()


def test_first_screen_has_blocks_for_later_panels(night):
    """Issue 21's panels go into the blocks of report.html.j2 (a child template fills them)."""
    from photowatch.report.facts import collect_facts
    from photowatch.report.render import environment, page_context

    out, store, settings = night
    facts = collect_facts(out, store, NIGHT, settings, final=False)
    child = environment().from_string(
        '{% extends "report.html.j2" %}{% block latest_frame %}<section id="latest">'
        "{{ facts.frames[-1].file }}</section>{% endblock %}"
        "{% block candidates %}<section id=cand></section>{% endblock %}")
    page = child.render(**page_context(facts, {}, out / "report" / NIGHT, settings))
    assert page.index('id="latest"') < page.index("id=cand") < page.index('id="problems"')
    assert page.index("class=\"cards\"") < page.index('id="latest"')
