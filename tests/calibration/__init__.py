"""Label-free recovery: calibrate, its time plan, reconstruct, the layer-by-layer frontier (calibration/)."""
