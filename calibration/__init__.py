"""Calibration: label-free accuracy recovery after conversion, and INT8 calibration data."""
