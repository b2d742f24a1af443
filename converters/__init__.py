"""Turning models into deployable artifacts: PyTorch -> ONNX, ONNX -> runtime sessions."""
