"""prepare: raw ADU → electrons with variance and mask (PhotoPipe's step 1, ``p`` prefix).

Shared by calibration frames and science frames:

1. overscan: per-row median of the overscan section, or a low-order
   polynomial fit along the rows to those medians, subtracted row by row;
2. trim to the trim section (else the data section; else all but the overscan);
3. gain: ADU → electrons;
4. (science and flats) master bias subtracted, master dark × exposure time subtracted;
5. variance = read noise² + Poisson (the electrons above bias) + the masters' variances;
6. mask: bad pixels (bad-pixel mask), saturated pixels grown by a pixel and
   their bleed trails along the columns, non-finite pixels as no data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from photowatch.core.classify import FrameInfo
from photowatch.core.config import Calibration, Prepare
from photowatch.core.errors import StageFailed
from photowatch.core.frame import Frame, Mask, MasterImage
from photowatch.core.schema import set_key


@dataclass(frozen=True)
class Electrons:
    """A frame after overscan, trim and gain, before masters."""

    data: np.ndarray  #: float32, electrons
    readvar: np.ndarray | float  #: read-noise variance (e-²), incl. the overscan estimate's
    mask: np.ndarray  #: uint16 (saturation, no data)
    overscan_adu: float  #: median overscan level
    saturated_fraction: float
    raw_median_adu: float  #: median raw level of the trimmed region (before overscan)


def trim_slices(info: FrameInfo, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The (rows, columns) of the raw image kept in the product."""
    ny, nx = shape
    sec = info.trimsec or info.datasec
    if sec is None and info.biassec is not None:
        y0, y1, x0, x1 = info.biassec
        # data is what is left beside the overscan strip
        if x0 > nx // 2:
            sec = (0, ny, 0, x0)
        elif x1 < nx // 2:
            sec = (0, ny, x1, nx)
        elif y0 > ny // 2:
            sec = (0, y0, 0, nx)
        else:
            sec = (y1, ny, 0, nx)
    if sec is None:
        return slice(0, ny), slice(0, nx)
    y0, y1, x0, x1 = sec
    return slice(max(0, y0), min(ny, y1)), slice(max(0, x0), min(nx, x1))


def overscan_rows(raw: np.ndarray, info: FrameInfo, *, method: str = "median",
                  order: int = 1) -> tuple[np.ndarray | None, float]:
    """Overscan level per raw row (ADU) and the variance of that estimate (ADU²).

    Returns (None, 0) when the frame has no overscan section (e.g. RATIR).
    """
    if info.biassec is None:
        return None, 0.0
    y0, y1, x0, x1 = info.biassec
    strip = raw[y0:y1, x0:x1]
    if strip.size == 0:
        return None, 0.0
    per_row = np.median(strip, axis=1)
    levels = np.full(raw.shape[0], float(np.median(per_row)), np.float32)
    ncols = strip.shape[1]
    rn_adu = info.read_noise_e / info.gain
    if method == "poly" and strip.shape[0] > order + 2:
        rows = np.arange(y0, y0 + strip.shape[0], dtype=float)
        scale = max(1.0, rows.max() - rows.min())
        coef = np.polynomial.polynomial.polyfit((rows - rows.min()) / scale, per_row, order)
        allrows = (np.arange(raw.shape[0]) - rows.min()) / scale
        levels = np.polynomial.polynomial.polyval(allrows, coef).astype(np.float32)
        est_var = rn_adu**2 * (order + 1) / (ncols * strip.shape[0])
    else:
        levels[y0:y0 + strip.shape[0]] = per_row
        est_var = (np.pi / 2) * rn_adu**2 / ncols
    return levels, float(est_var)


def saturation_mask(raw_trim: np.ndarray, saturation_adu: float, *, grow_px: int = 1,
                    bleed: bool = True) -> np.ndarray:
    """Boolean mask of saturated pixels (raw ADU ≥ saturation), their bleed trails and a border.

    A bleed trail is followed along the columns: pixels above half the
    saturation level connected to a saturated pixel.
    """
    from scipy import ndimage  # lazy: scipy.ndimage costs ~1 s of start-up

    sat = raw_trim >= saturation_adu
    cols = np.flatnonzero(sat.any(axis=0))
    if cols.size == 0:
        return sat
    # work only in the runs of columns around saturated pixels (bleed trails run along
    # columns): a few hundred columns instead of the whole frame
    margin = 16 + grow_px
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 2 * margin) + 1)
    out = np.zeros_like(sat)
    for run in runs:
        x0, x1 = max(0, run[0] - margin), min(sat.shape[1], run[-1] + margin + 1)
        part = sat[:, x0:x1]
        if bleed:
            bright = raw_trim[:, x0:x1] >= 0.5 * saturation_adu
            labels, n = ndimage.label(bright, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
            hit = np.zeros(n + 1, bool)
            hit[labels[part]] = True
            hit[0] = False
            part = hit[labels] | part
        if grow_px:
            size = 2 * grow_px + 1
            part = ndimage.maximum_filter(part.view(np.uint8), size=size).view(bool)
        out[:, x0:x1] |= part
    sat = out
    return sat


def to_electrons(raw: np.ndarray, info: FrameInfo, *, calibration: Calibration,
                 settings: Prepare) -> Electrons:
    """Overscan, trim, gain; read-noise variance and saturation/no-data mask."""
    raw = np.asarray(raw, dtype=np.float32)
    levels, est_var_adu = overscan_rows(raw, info, method=calibration.overscan,
                                        order=calibration.overscan_order)
    rows, cols = trim_slices(info, raw.shape)
    trimmed = raw[rows, cols]
    mask = np.zeros(trimmed.shape, np.uint16)
    sat = saturation_mask(trimmed, info.saturation_adu, grow_px=settings.saturation_grow_px,
                          bleed=settings.bleed_trail)
    mask[sat] |= np.uint16(Mask.SATURATED)
    if levels is not None:
        data = (trimmed - levels[rows][:, None]) * np.float32(info.gain)
        overscan = float(np.median(levels[rows]))
    else:
        data = trimmed * np.float32(info.gain)
        overscan = 0.0
    bad = ~np.isfinite(data)
    if bad.any():
        mask[bad] |= np.uint16(Mask.NODATA)
        data[bad] = 0.0
    readvar = info.read_noise_e**2 + est_var_adu * info.gain**2
    sub = trimmed[:: max(1, trimmed.shape[0] // 512), :: max(1, trimmed.shape[1] // 512)]
    return Electrons(
        data=data.astype(np.float32, copy=False),
        readvar=np.float32(readvar),
        mask=mask,
        overscan_adu=overscan,
        saturated_fraction=float(np.count_nonzero(sat)) / sat.size,
        raw_median_adu=float(np.median(sub)),
    )


def subtract_masters(el: Electrons, info: FrameInfo, *, bias: MasterImage | None,
                     dark: MasterImage | None) -> tuple[np.ndarray, np.ndarray]:
    """Bias and exposure-scaled dark subtraction with the variance of the result (e-, e-²).

    The Poisson term is the electrons above bias (sky, stars and dark current).
    """
    data = el.data
    if bias is not None:
        _check_shape(bias, data)
        data = data - bias.data
    poisson = np.maximum(data, 0)
    var = poisson + el.readvar
    if bias is not None:
        var = var + bias.var
    if dark is not None and info.exptime_s > 0:
        _check_shape(dark, data)
        t = np.float32(info.exptime_s)
        data = data - dark.data * t
        var = var + dark.var * (t * t)
    return data.astype(np.float32, copy=False), var.astype(np.float32, copy=False)


def _check_shape(master: MasterImage, data: np.ndarray) -> None:
    if master.data.shape != data.shape:
        raise StageFailed(f"master {master.kind} {master.label} has shape {master.data.shape}, "
                          f"the frame {data.shape}")


def prepare(raw: np.ndarray, header, info: FrameInfo, *, bias: MasterImage | None,
            dark: MasterImage | None, bpm: np.ndarray | None, settings: Prepare,
            calibration: Calibration) -> Frame:
    """Overscan, trim, gain, bias and dark: a science frame in electrons.

    Parameters
    ----------
    raw
        raw image (ADU), as read from the file
    bpm
        boolean bad-pixel mask of the trimmed frame (or None)

    Returns
    -------
    Frame
        ``sci`` electrons above bias and dark; ``var`` e-²; ``mask`` with BAD,
        SATURATED, NODATA; a header with the masters used, ``GAIN = 1`` and
        ``SATURATE`` in electrons (raw values in ``GAINRAW``, ``SATURRAW``)
    """
    el = to_electrons(raw, info, calibration=calibration, settings=settings)
    data, var = subtract_masters(el, info, bias=bias, dark=dark)
    mask = el.mask
    if bpm is not None:
        if bpm.shape != mask.shape:
            raise StageFailed(f"bad-pixel mask has shape {bpm.shape}, the frame {mask.shape}")
        mask = mask | (bpm.astype(bool) * np.uint16(Mask.BAD))
    hdr = header.copy()
    hdr["OVERSCAN"] = (round(el.overscan_adu, 3), "[adu] median overscan level subtracted")
    # the data are in electrons now: GAIN = 1 and SATURATE in electrons (the lowest level at
    # which a pixel may have saturated, after overscan, bias and dark), so SExtractor, SWarp
    # and SCAMP weight and flag right; the raw values stay as GAINRAW and SATURRAW
    hdr["GAINRAW"] = (info.gain, "[electron/adu] detector gain applied")
    hdr["GAIN"] = (1.0, "[electron/adu] data in electrons")
    hdr["RDNOISE"] = (info.read_noise_e, "[electron] read noise")
    hdr["SATURRAW"] = (info.saturation_adu, "[adu] raw saturation level")
    # the most bias and dark any good pixel can have had removed (hot pixels are BAD);
    # maxima of each master (a bound, without a frame-sized temporary)
    good = (mask & np.uint16(Mask.BAD | Mask.NODATA)) == 0
    top = 0.0
    if bias is not None:
        top += float(np.max(bias.data, where=good, initial=0.0))
    if dark is not None and info.exptime_s > 0:
        top += info.exptime_s * float(np.max(dark.data, where=good, initial=0.0))
    hdr["SATURATE"] = (round((info.saturation_adu - el.overscan_adu) * info.gain - top, 1),
                       "[electron] data above this may be saturated")
    hdr["GAINSRC"] = (info.gain_source, "gain from: header, profile or measured")
    hdr["RDNSRC"] = (info.read_noise_source, "read noise from: header, profile or measured")
    hdr["SATFRAC"] = (round(el.saturated_fraction, 6), "fraction of saturated pixels")
    for m, key in ((bias, "MBIAS"), (dark, "MDARK")):
        if m is not None:
            set_key(hdr, key, m.label, f"master {m.kind} used")
            hdr[key + "V"] = (m.version, f"master {m.kind} version")
            if m.night:
                hdr[key + "N"] = (m.night, f"night of the master {m.kind}")
    return Frame(sci=data, var=var, mask=mask, header=hdr, info=info)
