"""The runtimes behind one runner: the ONNX -> PyTorch bridge against ONNX's conformance cases and ONNX Runtime, INT8, TensorRT (converters/)."""
