"""Verification: numerical parity of the runtimes against the PyTorch originals (`parity`, `comparator`),
the pytest helpers a release suite calls (`testing`), and how far conversion moved a model's outputs
(`drift`)."""
