"""Small PyTorch models of the shapes users export, and their ONNX exports the common ways.

Each factory takes no arguments, so `aa-deploy verify --reference tests.sweep_models:NAME` builds the
same model (weights from a fixed seed) in another process.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

SIZE = 32


def _seeded(build):
    def factory() -> nn.Module:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(0)
            model = build().eval()
            # Non-trivial BatchNorm statistics, so that folding and `stats` have something to do.
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        return model

    factory.__name__ = build.__name__
    return factory


def _stem() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
    )


class Classifier(nn.Module):
    """Strided convs, a max pool, global pooling, `flatten` (a Reshape to [batch, 16] in a fixed-batch
    export, as in ResNets) and a linear head: (N, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _stem()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.gap(self.pool(self.features(x))), 1))


class Detector(nn.Module):
    """A YOLO-like head: boxes (N, 6, K) and scores (N, K), K = cells of the stride-4 map."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _stem()
        self.boxes = nn.Conv2d(16, 6, 1)
        self.scores = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        f = self.features(x)
        n = x.shape[0]
        return self.boxes(f).reshape(n, 6, -1), torch.sigmoid(self.scores(f)).reshape(n, -1)


class DenseMap(nn.Module):
    """A segmentation-like output: (N, 4, H/4, W/4)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _stem()
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(self.features(x))


class LayerNormNet(nn.Module):
    """ConvNeXt-like: a strided patch stem, channels-last LayerNorm, a strided downsampling conv, GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.down = nn.Conv2d(16, 32, 2, stride=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = nn.functional.gelu(self.down(x))
        return self.head(x.mean((2, 3)))


classifier = _seeded(Classifier)
detector = _seeded(Detector)
dense_map = _seeded(DenseMap)
layernorm_net = _seeded(LayerNormNet)
MODELS = {"classifier": classifier, "detector": detector, "dense_map": dense_map, "layernorm_net": layernorm_net}


def export(name: str, path: Path, batch: int | None, dynamo: bool = True) -> Path:
    """Export MODELS[name] with a fixed batch (`batch`) or a dynamic one (None), with torch's dynamo or
    TorchScript exporter, the way users call torch.onnx.export."""
    model = MODELS[name]()
    x = torch.rand(batch or 2, 3, SIZE, SIZE)
    outputs = ["boxes", "scores"] if name == "detector" else ["output"]
    kw: dict = {"input_names": ["input"], "output_names": outputs, "dynamo": dynamo}
    if batch is None and dynamo:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    elif batch is None:
        kw["dynamic_axes"] = {"input": {0: "batch"}} | {o: {0: "batch"} for o in outputs}
    if not dynamo:
        kw["opset_version"] = 17
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kw)
    return path
