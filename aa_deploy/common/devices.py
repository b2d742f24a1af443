"""Where torch runs: the one list of device choices (auto: the GPU when torch sees one)."""

DEVICES = ("auto", "cpu", "cuda")
