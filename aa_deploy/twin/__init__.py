"""The PyTorch twin: the same anti-aliasing as the graph pass, built on a torch module (`network`), its
dense-sampling phases (`phases`) and the weights read back from a converted graph (`weights`). It is the
independent reference that verification compares the runtimes against."""
