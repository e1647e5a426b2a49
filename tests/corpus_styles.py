"""Rewrite a simulated LMI night's raw files in the header style of corpus instruments.

Each style follows what ``/work/shared/data/headers/README.md`` lists for a real
instrument (keywords, vocabularies, section forms, compression); the pixels are the
simulator's, so the night's truth still holds. ``INSTRUME`` is changed, so no
profile but ``generic`` matches.

- ``maxim``  MaxIm DL (Feder, iTelescope): IMAGETYP 'Bias Frame'/'Dark Frame'/'Flat
  Field'/'Light Frame', XBINNING/YBINNING, OBJCTRA/OBJCTDEC space-separated, no GAIN or
  RDNOISE (measured), no sections (the overscan columns are cropped, as such cameras
  save none).
- ``lco``    LCO Sinistro: fpack RICE float32 with an empty primary and a (1, ny, nx)
  array, OBSTYPE BIAS/DARK/SKYFLAT/EXPOSE, GAIN a string list of four amplifier gains,
  BIASSEC/DETSEC 'UNKNOWN', DATASEC in unbinned detector pixels, FILTER plus FILTER1..3
  with 'air', CCDSUM '4 4'.
- ``saao``   SAAO STE3 / IRAF: IMAGETYP 'zero'/'dark'/'flat'/'object' lower case,
  TRIMSEC/BIASSEC with blanks inside the brackets, DATE-OBS a date with the time in UT,
  RA with a leading blank.
- ``issue``  the night of issue 18: biases typed OBSTYPE='DARK' with zero exposure, sky
  flats typed OBJECT with OBJECT='sky flat', no GAIN, and a DATASEC in an unknown form
  ('1:N, 1:N' without brackets) in unbinned coordinates of a sub-frame readout
  (CCDSEC gives the offset).
- ``decam``  one HDU read by two amplifiers of different gains (DATASECA/B, BIASSECA/B,
  GAINA/GAINB, RDNOISEA/B as DECam): each amplifier's overscan and gain applied first.
- ``mef``    one HDU per amplifier (two halves), each with DATASEC/BIASSEC/DETSEC and its
  own GAIN, assembled by DETSEC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

STYLES = ("maxim", "lco", "saao", "issue", "mef", "decam")


def _kind(hdr) -> str:
    return {"BIAS": "bias", "DARK": "dark", "SKY FLAT": "flat", "OBJECT": "object"}.get(
        str(hdr.get("OBSTYPE", "")).upper(), "other")


def _strip(hdr) -> fits.Header:
    out = hdr.copy()
    for key in ("INSTRUME", "OBSTYPE", "FILTER1", "FILTER2", "GAIN", "RDNOISE", "DATASEC",
                "BIASSEC", "CCDSUM", "RA", "DEC", "OBJNAME", "SATURATE"):
        out.remove(key, ignore_missing=True)
    return out


def _sexa(text: str) -> str:
    return str(text).replace(":", " ")


def restyle(raw_dir: Path, out_dir: Path, style: str, calib_days_earlier: float = 0.0
            ) -> list[Path]:
    """Write every raw file of ``raw_dir`` in ``style`` into ``out_dir``; returns the paths.

    ``calib_days_earlier`` moves the biases, darks and flats that many days back (a
    night of science frames whose calibrations were taken on an earlier night).
    """
    from datetime import datetime, timedelta

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(raw_dir.glob("lmi.*.fits")):
        with fits.open(path) as hdul:
            data = hdul[0].data.astype(np.float32)
            hdr = hdul[0].header.copy()
            if calib_days_earlier and _kind(hdr) in ("bias", "dark", "flat"):
                t = datetime.fromisoformat(hdr["DATE-OBS"]) - timedelta(days=calib_days_earlier)
                hdr["DATE-OBS"] = t.isoformat(timespec="milliseconds")
            written.append(_write(style, path, out_dir, data, hdr))
    return written


def _write(style: str, path: Path, out_dir: Path, data, hdr) -> Path:
    kind = _kind(hdr)
    ny = data.shape[0]
    n = ny  # data section is [:, :n], overscan [:, n:n+32]
    b = int(str(hdr["CCDSUM"]).split()[0])
    filt = hdr.get("FILTER1") if kind in ("flat", "object") else None
    short = {"SDSS-R": "r", "SDSS-G": "g", "SDSS-I": "i", "SDSS-Z": "z"}.get(filt, filt)
    new = _strip(hdr)
    if style == "maxim":
        new["INSTRUME"] = "Apogee USB/Net"
        new["IMAGETYP"] = {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field",
                           "object": "Light Frame"}.get(kind, "Focus")
        new["XBINNING"], new["YBINNING"] = b, b
        new["OBJCTRA"], new["OBJCTDEC"] = _sexa(hdr["RA"]), _sexa(hdr["DEC"])
        new["OBJECT"] = hdr.get("OBJNAME", "")
        if filt:
            new["FILTER"] = short
        new["SWCREATE"] = "MaxIm DL Version 6.18"
        new["XPIXSZ"] = 15.0 * b  # um (binned)
        new["FOCALLEN"] = 15.0 * 206.264806 / 0.12  # mm: 0.12"/px unbinned
        out = out_dir / path.name.replace(".fits", ".fit")
        fits.PrimaryHDU(data[:, :n].astype(np.uint16), new).writeto(out, overwrite=True)
        return out
    if style == "lco":
        new["INSTRUME"] = "fl08"
        new["OBSTYPE"] = {"bias": "BIAS", "dark": "DARK", "flat": "SKYFLAT",
                          "object": "EXPOSE"}.get(kind, "EXPERIMENTAL")
        new["FILTER"] = short or "rp"
        new["FILTER1"], new["FILTER2"], new["FILTER3"] = "air", short or "rp", "air"
        g = hdr["GAIN"]
        new["GAIN"] = f"[{g:.2f}, {g:.2f}, {g:.2f}, {g:.2f}]"
        new["RDNOISE"] = hdr["RDNOISE"]
        new["CCDSUM"] = f"{b} {b}"
        new["DATASEC"] = f"[1:{n * b},1:{n * b}]"  # full-chip unbinned pixels
        new["BIASSEC"] = "UNKNOWN"
        new["DETSEC"] = "UNKNOWN"
        new["DETSIZE"] = "[1:0,1:0]"
        new["RA"], new["DEC"] = hdr["RA"], hdr["DEC"]
        new["OBJECT"] = hdr.get("OBJNAME", "N/A")
        new["SATURATE"] = hdr["SATURATE"]
        new["PIXSCALE"] = 0.12 * b
        out = out_dir / path.name.replace(".fits", ".fits.fz")
        cube = data[None, :, :].astype(np.float32)
        comp = fits.CompImageHDU(cube, new, compression_type="RICE_1", quantize_level=64)
        fits.HDUList([fits.PrimaryHDU(), comp]).writeto(out, overwrite=True)
        return out
    if style == "saao":
        new["INSTRUME"] = "STE3 CCD"
        new["IMAGETYP"] = {"bias": "zero", "dark": "dark", "flat": "flat",
                           "object": "object"}.get(kind, "focus")
        day, _, clock = str(hdr["DATE-OBS"]).partition("T")
        new["DATE-OBS"] = day
        new["UT"] = clock
        new["TRIMSEC"] = f"[{1:4d}:{n:4d},{1:4d}:{n:4d}]"
        new["BIASSEC"] = f"[{n + 3:4d}:{n + 30:4d},{1:4d}:{n:4d}]"
        new["GAIN"], new["RDNOISE"] = hdr["GAIN"], hdr["RDNOISE"]
        new["CCDSUM"] = f"{b} {b}"
        new["RA"], new["DEC"] = " " + str(hdr["RA"]), str(hdr["DEC"])
        new["SECPIX"] = 0.12 * b
        new["OBJECT"] = hdr.get("OBJNAME", "")
        if filt:
            new["FILTER"] = short
        out = out_dir / path.name
        fits.PrimaryHDU(data.astype(np.uint16), new).writeto(out, overwrite=True)
        return out
    if style == "issue":
        new["INSTRUME"] = "SomeCam"
        new["OBSTYPE"] = {"bias": "DARK", "dark": "DARK", "flat": "OBJECT",
                          "object": "OBJECT"}.get(kind, "FOCUS")
        new["OBJECT"] = {"bias": "bias", "dark": "dark", "flat": "sky flat"}.get(
            kind, hdr.get("OBJNAME", ""))
        if filt:
            new["FILTER"] = short
        ox, oy = 200, 120  # sub-frame origin, unbinned detector pixels
        new["CCDSUM"] = f"{b} {b}"
        new["CCDSEC"] = f"[{ox + 1}:{ox + n * b},{oy + 1}:{oy + n * b}]"
        new["DATASEC"] = f"{ox + 1}:{ox + n * b}, {oy + 1}:{oy + n * b}"
        new["BIASSEC"] = f"[{n + 1}:{n + 32},1:{n}]"
        new["RDNOISE"] = hdr["RDNOISE"]
        new["SATURATE"] = hdr["SATURATE"]
        new["RA"], new["DEC"] = hdr["RA"], hdr["DEC"]
        new["PIXSCALE"] = 0.12 * b
        out = out_dir / path.name
        fits.PrimaryHDU(data.astype(np.uint16), new).writeto(out, overwrite=True)
        return out
    if style == "mef":
        new["INSTRUME"] = "TwoAmpCam"
        new["OBSTYPE"] = hdr["OBSTYPE"]
        new["OBJECT"] = hdr.get("OBJNAME", "")
        if filt:
            new["FILTER"] = short
        new["CCDSUM"] = f"{b} {b}"
        new["RA"], new["DEC"] = hdr["RA"], hdr["DEC"]
        new["NEXTEND"] = 2
        new["PIXSCALE"] = 0.12 * b
        half = n // 2
        hdus = [fits.PrimaryHDU(header=new)]
        for i, (x0, x1) in enumerate(((0, half), (half, n))):
            amp = np.concatenate([data[:, x0:x1], data[:, n:n + 32]], axis=1)
            ah = fits.Header()
            w = x1 - x0
            ah["EXTNAME"] = f"AMP{i + 1}"
            ah["DATASEC"] = f"[1:{w},1:{ny}]"
            ah["BIASSEC"] = f"[{w + 1}:{w + 32},1:{ny}]"
            ah["DETSEC"] = f"[{x0 * b + 1}:{x1 * b},1:{ny * b}]"
            ah["GAIN"] = hdr["GAIN"]
            ah["RDNOISE"] = hdr["RDNOISE"]
            ah["SATURATE"] = hdr["SATURATE"]
            hdus.append(fits.ImageHDU(amp.astype(np.uint16), ah))
        out = out_dir / path.name
        fits.HDUList(hdus).writeto(out, overwrite=True)
        return out
    if style == "decam":
        new["INSTRUME"] = "DECamLike"
        new["OBSTYPE"] = {"bias": "zero", "dark": "dark", "flat": "dome flat",
                          "object": "object"}.get(kind, "focus")
        new["OBJECT"] = hdr.get("OBJNAME", "")
        if filt:
            new["FILTER"] = f"{short} DECam SDSS c0002 6415.0 1480.0"
        new["CCDBIN1"], new["CCDBIN2"] = b, b
        new["RA"], new["DEC"] = hdr["RA"], hdr["DEC"]
        new["PIXSCALE"] = 0.12 * b
        g0 = float(hdr["GAIN"])
        half = n // 2
        os_row = np.median(data[:, n + 2:], axis=1)[:, None]
        out_data = data.copy()
        for s, (x0, x1), g in (("A", (0, half), g0 * 1.10), ("B", (half, n), g0 * 0.92)):
            out_data[:, x0:x1] = (data[:, x0:x1] - os_row) * (g0 / g) + os_row
            new[f"DATASEC{s}"] = f"[{x0 + 1}:{x1},1:{ny}]"
            o = n + (0 if s == "A" else 16)
            new[f"BIASSEC{s}"] = f"[{o + 1}:{o + 16},1:{ny}]"
            new[f"GAIN{s}"] = g
            new[f"RDNOISE{s}"] = float(hdr["RDNOISE"])
            new[f"SATURAT{s}"] = float(hdr["SATURATE"]) * g0 / g
        new["DATASEC"] = f"[1:{n},1:{ny}]"
        out = out_dir / path.name
        fits.PrimaryHDU(np.clip(np.rint(out_data), 0, 65535).astype(np.uint16),
                        new).writeto(out, overwrite=True)
        return out
    raise ValueError(f"unknown style {style!r}")
