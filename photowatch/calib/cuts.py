"""Automatic quality cuts for calibration frames (PhotoPipe's choose_calib, without the plots).

Pure functions: a prepared calibration frame, the levels of the frames already
accepted into its group and the current master estimate in, a verdict with
every measured level out (the levels are stored with the frame either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.stats import mad_std

from photowatch.calib.combine import RunningMean, robust_level
from photowatch.core.classify import FrameInfo
from photowatch.core.config import Calibration


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None
    levels: dict = field(default_factory=dict)


def _group_stats(values: list[float]) -> tuple[float, float] | None:
    vals = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if vals.size < 2:
        return None
    med = float(np.median(vals))
    return med, float(mad_std(vals))


def judge(kind: str, info: FrameInfo, *, data: np.ndarray, var: np.ndarray,
          raw_median_adu: float, saturated_fraction: float, group_levels: list[float],
          running: RunningMean | None, settings: Calibration,
          flat_filters: list[str] | None = None, flat_level_e: float | None = None) -> Verdict:
    """Decide whether a prepared calibration frame may enter its master.

    Parameters
    ----------
    data, var
        the frame as it would be combined: bias in e-, dark in e-/s, flat
        normalised to its central level
    raw_median_adu
        median raw level of the trimmed frame (flats: compared with saturation)
    group_levels
        the ``level`` of the frames already accepted into this master
    running
        the master's current accumulator (for the noise and outlier tests)
    flat_level_e
        a flat's central level in electrons above bias and dark, before normalisation
    """
    level, sigma = robust_level(data)
    levels = {"level": level, "sigma": sigma, "raw_median_adu": raw_median_adu,
              "saturated_fraction": saturated_fraction}
    sat = info.saturation_adu

    if kind == "flat":
        levels["fraction_of_saturation"] = raw_median_adu / sat
        if flat_filters and info.filter and info.filter.lower() not in {
                f.lower() for f in flat_filters}:
            return Verdict(False, f"filter {info.filter} is not a flat filter of this "
                                  f"instrument ({', '.join(flat_filters)})", levels)
        if not info.filter:
            return Verdict(False, "flat without a filter", levels)
        if raw_median_adu >= settings.flat_amax * sat:
            return Verdict(False, f"saturated: median {raw_median_adu:.0f} ADU is above "
                                  f"{settings.flat_amax:g} x saturation ({sat:.0f} ADU)", levels)
        if raw_median_adu <= settings.flat_amin * sat:
            return Verdict(False, f"too faint: median {raw_median_adu:.0f} ADU is below "
                                  f"{settings.flat_amin:g} x saturation ({sat:.0f} ADU)", levels)
        levels["level_e"] = flat_level_e
        if flat_level_e is not None and flat_level_e < settings.flat_min_level:
            return Verdict(False, f"too faint: {flat_level_e:.0f} e- per pixel (limit "
                                  f"{settings.flat_min_level:g} e-)", levels)
        if saturated_fraction > settings.flat_max_saturated_fraction:
            return Verdict(False, f"{100 * saturated_fraction:.3f} % of pixels saturated "
                                  f"(limit {100 * settings.flat_max_saturated_fraction:g} %)",
                           levels)
    elif kind == "bias":
        stats = _group_stats(group_levels)
        if stats is not None:
            med, scatter = stats
            tol = settings.bias_level_sigma * max(scatter, 0.5 * info.read_noise_e)
            levels["group_level"] = med
            if abs(level - med) > tol:
                return Verdict(False, f"bias level {level:.1f} e- differs from the group's "
                                      f"{med:.1f} e- by more than {tol:.1f} e-", levels)
    elif kind == "dark":
        if level > settings.dark_max_rate:
            return Verdict(False, f"dark current {level:.3g} e-/s/px above the limit "
                                  f"{settings.dark_max_rate:g} (light leak?)", levels)
        noise_rate = info.read_noise_e / max(info.exptime_s, 1e-3)
        if level < -5 * noise_rate / np.sqrt(max(data.size, 1)) - 0.05:
            return Verdict(False, f"negative dark current {level:.3g} e-/s/px "
                                  "(bias mismatch?)", levels)

    if running is not None and running.nframes >= 1:
        mean, mvar, _ = running.estimate()
        if mean.shape != data.shape:
            return Verdict(False, f"shape {data.shape} differs from the master's {mean.shape}",
                           levels)
        step = max(1, data.shape[0] // 512)
        sub = data[::step, ::step] - mean[::step, ::step]
        subvar = var[::step, ::step] + mvar[::step, ::step]
        ratio = float(mad_std(sub)) / float(
            np.sqrt(np.median(subvar)))
        levels["noise_ratio"] = ratio
        if kind == "bias" and ratio > settings.bias_noise_factor:
            return Verdict(False, f"noise {ratio:.2f} x the expected read noise "
                                  f"(limit {settings.bias_noise_factor:g})", levels)
        if running.nframes >= 3:
            frac = running.deviation_fraction(data, var, settings.outlier_sigma,
                                              stride=max(1, data.shape[0] // 512))
            levels["outlier_fraction"] = frac
            if frac > settings.outlier_fraction:
                return Verdict(False, f"{100 * frac:.1f} % of pixels differ from the current "
                                      f"master by more than {settings.outlier_sigma:g} sigma "
                                      f"(limit {100 * settings.outlier_fraction:g} %)", levels)
    return Verdict(True, None, levels)
