"""Makes `paddle_cls.onnx`, a graph exported by paddle2onnx (2.1, opset 11): the architecture of
PaddleOCR's text direction classifier, MobileNetV3-small x0.35 with 2 classes, at random weights (seed 0),
64 x 64 px. Needs `pip install paddlepaddle paddle2onnx packaging`, which no test needs."""

import sys
from pathlib import Path

import paddle
from paddle.vision.models import mobilenet_v3_small


def main(folder: Path) -> None:
    paddle.seed(0)
    spec = [paddle.static.InputSpec(shape=[None, 3, 64, 64], dtype="float32", name="x")]
    net = mobilenet_v3_small(scale=0.35, num_classes=2)
    net.eval()
    paddle.onnx.export(net, str(folder / "paddle_cls"), input_spec=spec, opset_version=11)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
