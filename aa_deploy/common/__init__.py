"""Shared plumbing every pipeline stands on: model files (`model_io`, `graph`, `atomic`), images and input
formats (`images`, `input_format`), what ships with the package (`bundled`, `models`), errors, progress events,
CPU threads and the version. Nothing here imports a pipeline."""
