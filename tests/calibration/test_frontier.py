"""`Frontier`: the tensors it hands out part way through the graph equal a fresh pass's, whether the
batch was held, dropped over the byte budget, or run past the point the caller is about to change
(on a copy); and the layer-by-layer starts give the same weights with it as without it."""

from __future__ import annotations

import pytest
import torch

import aa_deploy
from aa_deploy.calibration import frontier
from aa_deploy.calibration.frontier import Frontier
from aa_deploy.calibration.reconstruct import calibrate_reconstruct
from aa_deploy.calibration.stats import calibrate_stats
from aa_deploy.common import bundled
from aa_deploy.converters.bridge import OnnxModule
from aa_deploy.converters.export import export


@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    """The bundled trained ResNet-20 and its triangle conversion (blurred option-A shortcuts)."""
    work = tmp_path_factory.mktemp("frontier")
    plain = export(bundled.resnet20(), work / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, work / "r20.aa.onnx", aa_deploy.Options())
    x = torch.from_numpy(bundled.cifar_normalize(bundled.cifar_test_images()[0][:40]))
    return plain, work / "r20.aa.onnx", x


def test_held_dropped_and_copied_tensors_equal_a_fresh_pass(r20):
    """Each conv's input, committed up to the conv, and the residual Add after it (past the commit
    point), in graph order, with the conv's weights changed after each request as a refit does: the
    next request must see the change. A budget of about one batch's live tensors holds some batches
    and drops the others."""
    _, converted, x = r20
    module = OnnxModule(aa_deploy.common.model_io.load(converted)).eval()
    held = Frontier(module, x, 10, budget=1_500_000)
    params = module.trainable()
    convs = [(i, n) for i, n in enumerate(module.nodes) if n.op_type == "Conv" and n.inputs[1].name in params]
    copied = 0
    with torch.no_grad():
        for position, node in convs:
            names = {node.inputs[0].name}
            readers = list(node.outputs[0].consumers())
            if len(readers) == 1 and readers[0].op_type == "Add":
                names.add(readers[0].outputs[0].name)  # computed past the conv: on a copy
                copied += 1
            for start, got in held.tensors(names, commit_until=position):
                _, want = module(x[start : start + 10], capture=names - {module.input_name})
                for name in want:
                    torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
                assert held.positions.get(start, 0) <= position
            params[node.inputs[1].name].mul_(1.1)
    assert copied == 9 and held.envs and held.restarts


@pytest.mark.parametrize("step", [calibrate_reconstruct, calibrate_stats], ids=["reconstruct", "stats"])
def test_layerwise_starts_give_the_same_weights_with_and_without_it(r20, monkeypatch, step):
    plain, converted, x = r20
    teacher = OnnxModule(aa_deploy.common.model_io.load(plain)).eval()

    def weights(budget: int) -> dict:
        monkeypatch.setattr(frontier, "FRONTIER_BYTES", budget)
        student = OnnxModule(aa_deploy.common.model_io.load(converted)).eval()
        step(student, teacher, x, 16)
        return {k: v.detach().clone() for k, v in student.trainable().items()}

    recomputed, held = weights(0), weights(frontier.FRONTIER_BYTES)
    for name in recomputed:
        torch.testing.assert_close(held[name], recomputed[name], rtol=0, atol=0)
