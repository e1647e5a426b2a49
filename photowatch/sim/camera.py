"""The simulated camera, site, sky and star counts: constants of :mod:`photowatch.sim.night`."""

from __future__ import annotations

# --- the camera -------------------------------------------------------------------------------
INSTRUMENT = "LMI"
TELESCOPE = "LDT"
CAMERA = "C0"
GAIN = 2.89  #: e-/ADU
READ_NOISE_E = 6.0
SATURATE_ADU = 65000.0  #: header SATURATE
ADC_MAX = 65535  #: raw values are clipped here (uint16)
FULL_WELL_E = 200000.0  #: charge above this bleeds along the column
BIAS_LEVEL_ADU = 1000.0
OVERSCAN_COLS = 32
UNBINNED_SCALE_ARCSEC = 0.12
PIXEL_SIZE_CM = 15e-4  #: unbinned pixel
SITE_LAT_DEG = 34.7444
SITE_LON_DEG = -111.4223
MOFFAT_BETA = 3.0

# --- the sky and the stars ---------------------------------------------------------------------
BANDS = ("g", "r", "i", "z")
FILTER_BAND = {"SDSS-G": "g", "SDSS-R": "r", "SDSS-I": "i", "SDSS-Z": "z"}
ZP1 = {"g": 25.6, "r": 25.5, "i": 25.3, "z": 24.6}  #: mag giving 1 e-/s above the atmosphere
EXTINCTION = {"g": 0.18, "r": 0.10, "i": 0.07, "z": 0.06}  #: mag per airmass
SKY_RATES = {"g": 8.0, "r": 15.0, "i": 25.0, "z": 30.0}  #: e-/s per 0.24" pixel
SKY_PATTERN_AMP = {"g": 0.008, "r": 0.012, "i": 0.018, "z": 0.022}  #: max |p|
VIGNETTING = {"g": 0.05, "r": 0.04, "i": 0.035, "z": 0.03}  #: loss in the corners
DARK_RATE_E_S = 0.003
HOT_FRACTION = 0.001
COUNT_SLOPE = 0.3  #: d log10 N(<m) / dm
BRIGHT_MAG, FAINT_MAG_DEFAULT = 12.0, 23.5

FLAT_FAINT_FRACTION = 0.13  #: of SATURATE, median of the too-faint flat
FLAT_SATURATED_FRACTION = 1.3  #: of SATURATE, the saturated flat (clipped at 65535)
FLAT_GOOD_FRACTIONS = (0.30, 0.65)  #: range of the good flats
CR_SIGMA = 5.0
