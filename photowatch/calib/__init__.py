"""Calibration: incremental combination, master building, selection, bad-pixel masks."""
