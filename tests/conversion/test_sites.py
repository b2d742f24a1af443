"""Each site kind on small synthetic graphs: found with the right facts, and converted exactly.

The reference: a site that reads the graph input X in `pre` mode must satisfy
converted(X) == original(np_blur(X)), with the blur written out independently in tests/graphs.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import aa_deploy
from aa_deploy.common import graph, inserted
from aa_deploy.conversion import blur_nodes
from aa_deploy.conversion.sites import find_sites
from tests import graphs as G

run, convert = G.run, G.convert


def sites_of(m: onnx.ModelProto):
    model = ir.serde.deserialize_model(m)
    aa_deploy.inspect(model)
    return find_sites(model.graph)


def assert_pre_exact(m, x, axes, filt="triangle", pad="reflect", channel_last=False, **options):
    converted, result = convert(m, filter=filt, pad=pad, mode="pre", **options)
    expected = run(m, G.np_blur(x, axes, filt, pad))
    np.testing.assert_allclose(run(converted, x), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(run(m, x) - expected).max() > 1e-3  # the blur mattered
    return result


RNG = np.random.default_rng(0)


# -- strided Conv -------------------------------------------------------------------------------
@pytest.mark.parametrize("filt", ["rect", "triangle", "binomial"])
@pytest.mark.parametrize("pad", ["reflect", "replicate", "zero"])
def test_strided_conv2d_pre_matches_numpy(filt, pad):
    m = G.conv_model([2, 3, 12, 10])
    x = RNG.standard_normal((2, 3, 12, 10), dtype=np.float32)
    result = assert_pre_exact(m, x, (2, 3), filt, pad)
    (site,) = [a.site for a in result.actions]
    assert (site.kind, site.strides, site.channels, site.layout) == ("strided-conv", (2, 2), 3, "NCHW")


def test_conv1d_and_conv3d():
    m1 = G.conv_model([1, 2, 16], kernel=(3,), strides=(2,))
    assert_pre_exact(m1, RNG.standard_normal((1, 2, 16), dtype=np.float32), (2,))
    m3 = G.conv_model([1, 2, 6, 8, 8], kernel=(3, 3, 3), strides=(2, 2, 2))
    assert_pre_exact(m3, RNG.standard_normal((1, 2, 6, 8, 8), dtype=np.float32), (2, 3, 4))


def test_asymmetric_stride_blurs_only_the_strided_axis():
    m = G.conv_model([1, 3, 8, 16], strides=(2, 1))
    result = assert_pre_exact(m, RNG.standard_normal((1, 3, 8, 16), dtype=np.float32), (2,))
    assert result.actions[0].site.axes == (2,)


def test_depthwise_and_grouped_conv_channels_from_weight():
    m = G.conv_model([1, 6, 8, 8], c_out=6, group=6)
    result = assert_pre_exact(m, RNG.standard_normal((1, 6, 8, 8), dtype=np.float32), (2, 3))
    assert result.actions[0].site.channels == 6
    m = G.conv_model([1, 6, 8, 8], c_out=4, group=2)
    assert sites_of(m)[0].channels == 6


def test_dynamic_batch_and_spatial_dims():
    m = G.conv_model(["N", 3, "H", "W"])
    for shape in [(1, 3, 8, 8), (3, 3, 14, 10)]:
        assert_pre_exact(m, RNG.standard_normal(shape, dtype=np.float32), (2, 3))


@pytest.mark.parametrize("size,expected_pad", [(12, "reflect"), (2, "replicate")])
def test_reflect_on_dynamic_sizes_is_decided_at_run_time(size, expected_pad):
    # Binomial at stride 2 pads 2 px: reflect needs maps of 3 px or more. With H and W dynamic the pass
    # cannot know, so an If on the run-time shape picks reflect or edge, as the PyTorch twin does.
    m = G.conv_model(["N", 3, "H", "W"])
    converted, result = convert(m, filter="binomial", pad="reflect", mode="pre")
    assert result.actions[0].spec.guarded and any(n.op_type == "If" for n in converted.graph.node)
    x = RNG.standard_normal((1, 3, size, size), dtype=np.float32)
    np.testing.assert_allclose(
        run(converted, x), run(m, G.np_blur(x, (2, 3), "binomial", expected_pad)), rtol=1e-5, atol=1e-5
    )
    import torch as pt

    from aa_deploy.twin import network as twin_torch  # the twin decides the same way

    blur = twin_torch.Blur(2, (2, 2), 5, "reflect")
    with pt.no_grad():
        np.testing.assert_allclose(
            blur(pt.from_numpy(x)).numpy(), G.np_blur(x, (2, 3), "binomial", expected_pad), rtol=1e-5, atol=1e-6
        )


def test_weights_from_constant_and_constant_of_shape_opset11_and_odd_names():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w/0.weight"], value=G.const("w", w), name="a/b.c"),
        helper.make_node("Conv", ["X", "w/0.weight"], ["t"], strides=[2, 2], pads=[1, 1, 1, 1], name="stage.1/conv:0"),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["w2"], value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.1])
        ),
        helper.make_node("Conv", ["t", "w2"], ["Y"], strides=[2, 2], pads=[1, 1, 1, 1], name="stage.2/conv"),
    ]
    m = G.model(nodes, [G.inp("X", ["N", 3, 16, 16])], [G.out("Y", 4)], [G.ints("shape", [2, 4, 3, 3])], opset=11)
    sites = sites_of(m)
    assert [(s.name, s.channels) for s in sites] == [("stage.1/conv:0", 3), ("stage.2/conv", 4)]
    converted, result = convert(m, skip_stem=True)
    x = RNG.standard_normal((2, 3, 16, 16), dtype=np.float32)
    assert [a.action for a in result.actions] == ["skip", "pre"]
    assert run(converted, x).shape == run(m, x).shape


def test_the_stem_is_skipped_by_default_only_where_it_subsamples_the_input_image():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)

    def stem_model(before):  # [normalization / activation nodes] -> strided conv -> strided conv
        nodes = [*before, helper.make_node("Conv", ["x1", "w"], ["t"], strides=[2, 2], pads=[1, 1, 1, 1], name="stem")]
        nodes.append(helper.make_node("Conv", ["t", "w2"], ["Y"], strides=[2, 2], pads=[1, 1, 1, 1], name="next"))
        inits = [G.const("w", w), G.const("w2", RNG.standard_normal((4, 4, 3, 3)).astype(np.float32))]
        inits += [G.const("mean", np.full((1, 3, 1, 1), 0.5, np.float32))]
        return G.model(nodes, [G.inp("X", ["N", 3, 16, 16])], [G.out("Y", 4)], inits)

    normalized = [
        helper.make_node("Sub", ["X", "mean"], ["xs"]),
        helper.make_node("Div", ["xs", "mean"], ["x1"]),
    ]
    activated = [helper.make_node("Relu", ["X"], ["x1"])]
    for before, skipped in (
        ([helper.make_node("Identity", ["X"], ["x1"])], True),
        (normalized, True),
        (activated, False),
    ):
        m = stem_model(before)
        _, result = convert(m, skip_stem=None)  # the default rule
        assert [a.action for a in result.actions] == (["skip", "pre"] if skipped else ["pre", "pre"])
        assert [a.action for a in convert(m, skip_stem=False)[1].actions] == ["pre", "pre"]  # --blur-stem
        # The decision is recorded as made, so the twin rebuilt from the metadata does the same.
        assert aa_deploy.common.model_io.read_metadata(result.model)["options"]["skip_stem"] is skipped
    # More than 4 channels is a feature map, not an image.
    assert convert(G.conv_model([1, 8, 12, 12]), skip_stem=None)[1].actions[0].action == "pre"


def test_the_twins_default_stem_rule():
    import torch as pt

    from aa_deploy.twin import network as twin_torch

    net = pt.nn.Sequential(pt.nn.Conv2d(3, 8, 3, 2, 1), pt.nn.ReLU(), pt.nn.Conv2d(8, 8, 3, 2, 1))
    _, report = twin_torch.antialias(net)
    assert [r.action for r in report] == ["skip", "pre"] and "input image" in report[0].note
    assert [r.action for r in twin_torch.antialias(net, skip_stem=False)[1]] == ["pre", "pre"]
    _, report = twin_torch.antialias(pt.nn.Sequential(pt.nn.Conv2d(8, 8, 3, 2, 1)))
    assert [r.action for r in report] == ["pre"]


def test_conv_blurpool_moves_bias_after_the_blur():
    m = G.conv_model([1, 3, 12, 12], c_out=4, bias=True)
    converted, result = convert(m, mode="blurpool", pad="zero")
    assert result.actions[0].action == "blurpool"
    x = RNG.standard_normal((1, 3, 12, 12), dtype=np.float32)
    # Reference: the same conv at stride 1 without bias (ONNX Runtime), blurred at stride 2 (NumPy), plus bias.
    stride1 = G.conv_model([1, 3, 12, 12], c_out=4, strides=(1, 1), bias=False)
    bias = onnx.numpy_helper.to_array(m.graph.initializer[1]).reshape(1, -1, 1, 1)
    expected = G.np_blur(run(stride1, x), (2, 3), "triangle", "zero", stride=2) + bias
    np.testing.assert_allclose(run(converted, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", ["reflect", "replicate"])
def test_conv_blurpool_pooled_keeps_its_bias(pad):
    # Pooled form: the blur of a constant is that constant, so the bias stays on the conv and the
    # result is still blur(conv at stride 1 without bias) + bias.
    m = G.conv_model([1, 3, 12, 12], c_out=4, bias=True)
    converted, result = convert(m, mode="blurpool", pad=pad)
    assert result.actions[0].action == "blurpool"
    conv = next(n for n in converted.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and {n.op_type for n in converted.graph.node if n.name.startswith("aa_blur")} == {
        "AveragePool"
    }
    x = RNG.standard_normal((1, 3, 12, 12), dtype=np.float32)
    stride1 = G.conv_model([1, 3, 12, 12], c_out=4, strides=(1, 1), bias=False)
    bias = onnx.numpy_helper.to_array(m.graph.initializer[1]).reshape(1, -1, 1, 1)
    expected = G.np_blur(run(stride1, x), (2, 3), "triangle", pad, stride=2) + bias
    np.testing.assert_allclose(run(converted, x), expected, rtol=1e-5, atol=1e-5)


def test_pointwise_conv_blurpool_is_its_pre_form():
    m = G.conv_model([1, 3, 12, 12], c_out=5, kernel=(1, 1), pads=[0, 0, 0, 0])
    converted, result = convert(m, mode="blurpool", pad="zero")
    assert result.actions[0].action == "pre" and "1x1" in result.actions[0].note
    x = RNG.standard_normal((1, 3, 12, 12), dtype=np.float32)
    # The blurpool definition: conv at stride 1 without bias, blur at stride 2, plus bias.
    stride1 = G.conv_model([1, 3, 12, 12], c_out=5, kernel=(1, 1), pads=[0, 0, 0, 0], strides=(1, 1), bias=False)
    bias = onnx.numpy_helper.to_array(m.graph.initializer[1]).reshape(1, -1, 1, 1)
    expected = G.np_blur(run(stride1, x), (2, 3), "triangle", "zero", stride=2) + bias
    np.testing.assert_allclose(run(converted, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("filt", ["rect", "triangle", "binomial"])
@pytest.mark.parametrize("size", [11, 12])
def test_pointwise_conv_pre_blurs_at_the_stride(filt, size):
    # pre on a 1x1 strided conv: the blur takes the stride and the conv runs at stride 1; the numbers
    # must still be those of blur(stride 1) -> conv(stride 2), written out in NumPy.
    m = G.conv_model([1, 3, size, size], c_out=5, kernel=(1, 1), pads=[0, 0, 0, 0])
    x = RNG.standard_normal((1, 3, size, size), dtype=np.float32)
    result = assert_pre_exact(m, x, (2, 3), filt=filt)
    assert result.actions[0].restride
    converted, _ = convert(m, filter=filt, mode="pre")
    strides = {
        (n.name.startswith("aa_blur"), tuple(helper.get_attribute_value(a)))
        for n in converted.graph.node
        if n.op_type in ("Conv", "AveragePool")
        for a in n.attribute
        if a.name == "strides"
    }
    assert (True, (2, 2)) in strides and (False, (1, 1)) in strides  # the blur strided, the 1x1 conv not
    assert (False, (2, 2)) not in strides


# -- the pooled blur form ------------------------------------------------------------------------
@pytest.mark.parametrize("pad", ["reflect", "replicate"])
@pytest.mark.parametrize("size", [3, 5, 7])
@pytest.mark.parametrize("shape", [[1, 2, 13], [2, 3, 12, 9], [1, 2, 6, 7, 8]])
def test_pre_blur_is_average_pools_and_exact(pad, size, shape):
    # Binomial taps with reflect/replicate padding become AveragePools of kernel 2 (no Pad, no taps);
    # the numbers must be NumPy's padded blur, on odd and even sizes, ranks 3-5.
    n = len(shape) - 2
    m = G.conv_model(shape, kernel=(3,) * n, strides=(2,) * n)
    x = RNG.standard_normal(shape, dtype=np.float32)
    converted, _ = convert(m, filter_size=size, pad=pad, mode="pre")
    assert [b.op_type for b in converted.graph.node if b.name.startswith("aa_blur")] == ["AveragePool"] * (size - 1)
    taps = [float(np.prod(range(size - j, size))) / float(np.prod(range(1, j + 1))) for j in range(size)]
    expected = run(m, G.np_blur(x, tuple(range(2, n + 2)), taps, pad))
    np.testing.assert_allclose(run(converted, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "filt,pad,strides", [("rect", "reflect", (2, 2)), ("triangle", "zero", (2, 2)), ("triangle", "reflect", (3, 3))]
)
def test_pre_blur_keeps_the_conv_form_where_pools_would_not_be_exact(filt, pad, strides):
    # rect's reflect padding is one-sided, zero padding belongs in the Conv's pads, stride 3 widens
    # the taps past a power of [1, 1]: all stay a depthwise Conv.
    m = G.conv_model([1, 3, 12, 12], strides=strides)
    converted, _ = convert(m, filter=filt, pad=pad, mode="pre")
    ops = {b.op_type for b in converted.graph.node if b.name.startswith("aa_blur")}
    assert "Conv" in ops and "AveragePool" not in ops


def test_pointwise_conv_behind_a_pad_keeps_its_stride():
    # A 1x1 conv reached through a zero Pad reads padded pixels: the blur cannot take its stride.
    w = G.const("w", RNG.standard_normal((4, 3, 1, 1)).astype(np.float32))
    pads = G.const("p", np.asarray([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))
    nodes = [
        helper.make_node("Pad", ["X", "p"], ["xp"]),
        helper.make_node("Conv", ["xp", "w"], ["Y"], strides=[2, 2]),
    ]
    m = G.model(nodes, [G.inp("X", [1, 3, 10, 10])], [G.out("Y", 4)], [w, pads])
    converted, result = convert(m, mode="pre", pad="zero")
    assert not result.actions[0].restride
    x = RNG.standard_normal((1, 3, 10, 10), dtype=np.float32)
    np.testing.assert_allclose(run(converted, x), run(m, G.np_blur(x, (2, 3), pad="zero")), rtol=1e-5, atol=1e-5)


def test_not_sites_stride1_convtranspose_global_pool():
    w = G.const("w", RNG.standard_normal((3, 3, 3, 3)).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["X", "w"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["a", "w"], ["b"], strides=[2, 2]),
        helper.make_node("AveragePool", ["b"], ["c"], kernel_shape=[17, 17], strides=[17, 17]),
        helper.make_node("GlobalMaxPool", ["c"], ["Y"]),
    ]
    m = G.model(nodes, [G.inp("X", [1, 3, 8, 8])], [G.out("Y", 4)], [w])
    assert sites_of(m) == []


# -- pooling --------------------------------------------------------------------------------------
def test_maxpool_default_is_maxblurpool():
    nodes = [helper.make_node("MaxPool", ["X"], ["Y"], kernel_shape=[2, 2], strides=[2, 2], name="pool")]
    m = G.model(nodes, [G.inp("X", [2, 3, 8, 8])], [G.out("Y", 4)])
    converted, result = convert(m)
    assert result.actions[0].action == "blurpool"
    x = RNG.standard_normal((2, 3, 8, 8), dtype=np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(2, 3))
    expected = G.np_blur(windows.max(axis=(-1, -2)), (2, 3), "triangle", "reflect", stride=2)
    np.testing.assert_allclose(run(converted, x), expected, rtol=1e-5, atol=1e-5)
    # The blur is in pooled form; the probe finds it after the pool and knows its taps.
    pool = next(n for n in ir.serde.deserialize_model(converted).graph if n.name == "pool")
    blur = inserted.blur_after(pool)
    assert blur.op_type == "AveragePool" and graph.ints(blur, "strides") == (2, 2)
    for taps in blur_nodes.taps_of(blur, (2, 3)):
        np.testing.assert_array_equal(taps, [0.25, 0.5, 0.25])


def test_average_pool_pre_and_ceil_mode_falls_back_to_pre():
    nodes = [helper.make_node("AveragePool", ["X"], ["Y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)]
    m = G.model(nodes, [G.inp("X", [1, 3, 9, 9])], [G.out("Y", 4)])
    result = assert_pre_exact(m, RNG.standard_normal((1, 3, 9, 9), dtype=np.float32), (2, 3))
    converted, result = convert(m, mode="blurpool")
    assert result.actions[0].action == "pre" and "ceil_mode" in result.actions[0].note


def test_strided_1x1_pool_with_ceil_mode_keeps_its_stride():
    # A 1x1 max pool of stride 2 is a plain subsample, but with ceil_mode on an even map it outputs one
    # more cell than a strided blur would: only convs get the blur-takes-the-stride form.
    nodes = [helper.make_node("MaxPool", ["X"], ["Y"], kernel_shape=[1, 1], strides=[2, 2], ceil_mode=1)]
    m = G.model(nodes, [G.inp("X", [1, 3, 10, 10])], [G.out("Y", 4)])
    result = assert_pre_exact(m, RNG.standard_normal((1, 3, 10, 10), dtype=np.float32), (2, 3))
    assert not result.actions[0].restride


def test_reflect_falls_back_to_replicate_on_tiny_maps():
    nodes = [helper.make_node("MaxPool", ["X"], ["Y"], kernel_shape=[2, 2], strides=[2, 2])]
    m = G.model(nodes, [G.inp("X", [1, 3, 2, 4])], [G.out("Y", 4)])
    converted, result = convert(m)  # blurpool: the stride-1 map is 1x3
    assert result.actions[0].spec.pad_mode == "replicate" and "replicate" in result.actions[0].note
    x = RNG.standard_normal((1, 3, 2, 4), dtype=np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(2, 3)).max(axis=(-1, -2))
    expected = G.np_blur(windows, (2, 3), "triangle", "replicate", stride=2)
    np.testing.assert_allclose(run(converted, x), expected, rtol=1e-5, atol=1e-6)


# -- strided Slice ----------------------------------------------------------------------------------
def slice_chain(x_shape, axes, name="s"):
    nodes, inits, src = [], [G.ints("st", [0]), G.ints("en", [2**62]), G.ints("step", [2])], "X"
    for i, a in enumerate(axes):
        inits.append(G.ints(f"ax{i}", [a]))
        nodes.append(helper.make_node("Slice", [src, "st", "en", f"ax{i}", "step"], [f"{name}{i}"], name=f"{name}/{i}"))
        src = f"{name}{i}"
    return nodes, inits, src


def test_strided_slice_chain_nchw_is_one_site():
    nodes, inits, last = slice_chain([1, 4, 8, 8], [2, 3])
    nodes.append(helper.make_node("Identity", [last], ["Y"]))
    m = G.model(nodes, [G.inp("X", [1, 4, 8, 8])], [G.out("Y", 4)], inits)
    result = assert_pre_exact(m, RNG.standard_normal((1, 4, 8, 8), dtype=np.float32), (2, 3))
    (a,) = result.actions
    assert (a.site.kind, a.site.axes, a.site.layout, a.site.channels) == ("strided-slice", (2, 3), "NCHW", 4)


def test_strided_slice_nhwc():
    nodes, inits, last = slice_chain([1, 8, 8, 5], [1, 2])
    nodes.append(helper.make_node("Identity", [last], ["Y"]))
    m = G.model(nodes, [G.inp("X", [1, 8, 8, 5])], [G.out("Y", 4)], inits)
    result = assert_pre_exact(m, RNG.standard_normal((1, 8, 8, 5), dtype=np.float32), (1, 2))
    assert result.actions[0].site.layout == "NHWC" and result.actions[0].site.channels == 5


def test_channel_slicing_is_not_a_site():
    nodes, inits, last = slice_chain([1, 8, 8, 8], [1, 3])
    nodes.append(helper.make_node("Identity", [last], ["Y"]))
    m = G.model(nodes, [G.inp("X", [1, 8, 8, 8])], [G.out("Y", 4)], inits)
    assert sites_of(m) == []


def test_conv_and_shortcut_share_one_blur():
    w = G.const("w", RNG.standard_normal((4, 4, 3, 3)).astype(np.float32))
    nodes, inits, last = slice_chain([1, 4, 8, 8], [2, 3])
    nodes += [
        helper.make_node("Conv", ["X", "w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", last], ["Y"]),
    ]
    m = G.model(nodes, [G.inp("X", [1, 4, 8, 8])], [G.out("Y", 4)], [w, *inits])
    result = assert_pre_exact(m, RNG.standard_normal((1, 4, 8, 8), dtype=np.float32), (2, 3))
    assert result.blurs == 1 and result.actions[1].shared_with == 0


# -- patch merging ----------------------------------------------------------------------------------
def test_patch_merge_slice_concat_nhwc():
    inits = [G.ints("e", [2**62, 2**62]), G.ints("ax", [1, 2]), G.ints("step", [2, 2])]
    nodes, parts = [], []
    for i, (h, w) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        inits.append(G.ints(f"b{i}", [h, w]))
        nodes.append(helper.make_node("Slice", ["X", f"b{i}", "e", "ax", "step"], [f"p{i}"]))
        parts.append(f"p{i}")
    nodes.append(helper.make_node("Concat", parts, ["Y"], axis=-1, name="merge"))
    m = G.model(nodes, [G.inp("X", ["N", 8, 8, 3])], [G.out("Y", 4)], inits)
    result = assert_pre_exact(m, RNG.standard_normal((2, 8, 8, 3), dtype=np.float32), (1, 2))
    (a,) = result.actions
    assert (a.site.kind, a.site.layout, a.site.channels, result.blurs) == ("patch-merge", "NHWC", 3, 1)


def test_patch_merge_slices_sharing_a_prefix_slice():
    # What the dynamo exporter makes of torchvision Swin: x[..., 0::2, 0::2, :] and x[..., 0::2, 1::2, :]
    # share the Slice over H, so the Slices form a tree, not chains.
    inits = [
        G.ints("e", [2**62]),
        G.ints("h", [1]),
        G.ints("w", [2]),
        G.ints("two", [2]),
        G.ints("z", [0]),
        G.ints("o", [1]),
    ]
    nodes = [
        helper.make_node("Slice", ["X", "z", "e", "h", "two"], ["even_h"]),
        helper.make_node("Slice", ["X", "o", "e", "h", "two"], ["odd_h"]),
    ]
    parts = []
    for src in ("even_h", "odd_h"):
        for start in ("z", "o"):
            nodes.append(helper.make_node("Slice", [src, start, "e", "w", "two"], [f"{src}{start}"]))
            parts.append(f"{src}{start}")
    nodes.append(helper.make_node("Concat", parts, ["Y"], axis=3))
    m = G.model(nodes, [G.inp("X", [1, 6, 6, 4])], [G.out("Y", 4)], inits)
    result = assert_pre_exact(m, RNG.standard_normal((1, 6, 6, 4), dtype=np.float32), (1, 2))
    assert [(a.site.kind, a.site.layout) for a in result.actions] == [("patch-merge", "NHWC")] and result.blurs == 1


def test_window_partition_is_not_a_patch_merge():
    # Swin attention: (B, H, W, C) -> (B, H/7, 7, W/7, 7, C) -> (0, 1, 3, 2, 4, 5) -> (B*nW, 49, C)
    nodes = [
        helper.make_node("Reshape", ["X", "t6"], ["r6"]),
        helper.make_node("Transpose", ["r6"], ["tr"], perm=[0, 1, 3, 2, 4, 5]),
        helper.make_node("Reshape", ["tr", "t3"], ["Y"]),
    ]
    inits = [G.ints("t6", [1, 2, 7, 2, 7, 8]), G.ints("t3", [4, 49, 8])]
    m = G.model(nodes, [G.inp("X", [1, 14, 14, 8])], [G.out("Y", 3)], inits)
    assert sites_of(m) == []


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_patch_merge_reshape_transpose_behind_a_noop_pad(layout):
    c = 3
    if layout == "NHWC":
        shape, target, perm = [2, 8, 8, c], [2, 4, 2, 4, 2, c], [0, 1, 3, 4, 2, 5]
        axes, flat = (1, 2), [2, 4, 4, 4 * c]
    else:
        shape, target, perm = [2, c, 8, 8], [2, c, 4, 2, 4, 2], [0, 1, 3, 5, 2, 4]
        axes, flat = (2, 3), [2, 4 * c, 4, 4]
    nodes = [
        helper.make_node("Pad", ["X", "pads"], ["padded"], mode="constant"),
        helper.make_node("Reshape", ["padded", "t6"], ["r6"]),
        helper.make_node("Transpose", ["r6"], ["tr"], perm=perm),
        helper.make_node("Reshape", ["tr", "t4"], ["Y"]),
    ]
    inits = [G.ints("pads", [0] * 8), G.ints("t6", target), G.ints("t4", flat)]
    m = G.model(nodes, [G.inp("X", shape)], [G.out("Y", 4)], inits)
    result = assert_pre_exact(m, RNG.standard_normal(shape, dtype=np.float32), axes)
    (a,) = result.actions
    assert (a.site.kind, a.site.layout, a.site.channels, a.site.op) == ("patch-merge", layout, c, "Reshape")


def test_space_to_depth():
    nodes = [helper.make_node("SpaceToDepth", ["X"], ["Y"], blocksize=2)]
    m = G.model(nodes, [G.inp("X", [1, 3, 8, 8])], [G.out("Y", 4)])
    result = assert_pre_exact(m, RNG.standard_normal((1, 3, 8, 8), dtype=np.float32), (2, 3))
    assert result.actions[0].site.kind == "patch-merge"


# -- idempotence, selection, metadata -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pre", "blurpool"])
def test_converting_twice_adds_nothing(mode):
    nodes = [
        helper.make_node("Conv", ["X", "w"], ["a"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["a"], ["Y"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    m = G.model(
        nodes,
        [G.inp("X", [1, 3, 16, 16])],
        [G.out("Y", 4)],
        [G.const("w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32))],
    )
    once, first = convert(m, mode=mode)
    assert first.blurs == 2
    twice, second = convert(once)
    assert second.blurs == 0
    assert len(twice.graph.node) == len(once.graph.node)


def test_existing_antialiased_cnns_style_blur_is_recognized():
    # antialiased-cnns BlurPool after a stride-1 MaxPool:
    # reflect Pad -> depthwise [1,2,1]x[1,2,1]/16 Conv with stride 2.
    k = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16
    nodes = [
        helper.make_node("MaxPool", ["X"], ["a"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("Pad", ["a", "p"], ["b"], mode="reflect"),
        helper.make_node("Conv", ["b", "blur"], ["c"], strides=[2, 2], group=3),
        helper.make_node("Conv", ["c", "w"], ["Y"], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    inits = [
        G.ints("p", [0, 0, 1, 1, 0, 0, 1, 1]),
        G.const("blur", np.broadcast_to(k, (3, 1, 3, 3)).copy()),
        G.const("w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)),
    ]
    m = G.model(nodes, [G.inp("X", [1, 3, 16, 16])], [G.out("Y", 4)], inits)
    _, result = convert(m)
    assert [(a.site.name or a.site.op, a.action) for a in result.actions] == [("Conv", "skip")]
    assert "already" in result.actions[0].note and result.blurs == 0


def test_include_exclude_on_node_names():
    m = G.conv_model([1, 3, 8, 8])
    assert convert(m, exclude=r"^stage/")[1].actions[0].action == "skip"
    assert convert(m, include=r"conv\.0$")[1].actions[0].action == "pre"
    assert convert(m, include="nothing")[1].actions[0].action == "skip"


def test_metadata_records_what_was_done():
    converted, result = convert(G.conv_model([1, 3, 8, 8]), filter="binomial", pad="zero")
    meta = aa_deploy.common.model_io.read_metadata(converted)
    assert meta["filter"] == "binomial" and meta["pad"] == "zero" and meta["version"] == aa_deploy.__version__
    assert meta["options"]["filter"] == "binomial"
    assert [s["node"] for s in meta["sites"]] == ["stage/conv.0"]


def test_input_output_names_shapes_and_dtypes_kept():
    m = G.conv_model(["N", 3, "H", "W"])
    converted, _ = convert(m)
    for a, b in ((m.graph.input, converted.graph.input), (m.graph.output, converted.graph.output)):
        assert [(v.name, v.type.tensor_type.elem_type, str(v.type.tensor_type.shape)) for v in a] == [
            (v.name, v.type.tensor_type.elem_type, str(v.type.tensor_type.shape)) for v in b
        ]


def _decision_note(note: str) -> str:
    """The part of a pass's note that is a decision the twin makes too (not how the graph is rewritten:
    a 1x1 conv's blur taking the stride, the padding fallback on small maps, shared blur nodes)."""
    rewriting = ("1x1 conv: blur at the conv's stride", "reflect -> replicate", "shares the blur")
    return "; ".join(part for part in note.split("; ") if part and not part.startswith(rewriting))


@pytest.mark.parametrize("mode", ["auto", "pre", "blurpool"])
def test_the_twin_and_the_pass_decide_alike(mode, tmp_path):
    """Each site's action and note come from one rule: a stem on the image, a 1x1 strided conv, a pool
    with ceil_mode, a 3x3 strided conv, and the CIFAR ResNet's option-A shortcut (a strided slice)."""
    import torch as pt

    from aa_deploy.common import bundled
    from aa_deploy.converters.export import export
    from aa_deploy.twin import network as twin_torch

    small = pt.nn.Sequential(
        pt.nn.Conv2d(3, 8, 3, 2, 1),
        pt.nn.ReLU(),
        pt.nn.Conv2d(8, 8, 1, 2),
        pt.nn.MaxPool2d(2, 2, ceil_mode=True),
        pt.nn.Conv2d(8, 8, 3, 2, 1),
    ).eval()
    for name, net, shape in [("small", small, (1, 3, 64, 64)), ("resnet20", bundled.resnet20(), (1, 3, 32, 32))]:
        path = tmp_path / f"{name}.onnx"
        export(net, path, shape)
        _, result = convert(onnx.load(path), mode=mode, skip_stem=None)
        _, report = twin_torch.antialias(net, mode=mode)
        onnx_side = sorted((a.site.kind, a.action, _decision_note(a.note)) for a in result.actions)
        twin_side = sorted((r.kind, r.action, r.note) for r in report)
        assert onnx_side == twin_side, name
        if mode == "blurpool":
            assert any("slicing" in note for _, _, note in onnx_side) == (name == "resnet20")


def test_the_pass_runs_in_an_onnx_ir_pass_manager_as_convert_model_does():
    """`AntiAliasPass` is `convert_model` behind onnx_ir's pass protocol: the same graph out, in place, with
    `modified` telling whether anything went in (a graph with no site: not modified)."""
    options = aa_deploy.Options(skip_stem=False)
    expected = G.convert(G.conv_model((1, 3, 16, 16)))[0]
    model = ir.serde.deserialize_model(G.conv_model((1, 3, 16, 16)))
    result = ir.passes.PassManager([aa_deploy.AntiAliasPass(options)])(model)
    assert result.model is model and result.modified
    assert ir.serde.serialize_model(model).graph == expected.graph
    direct = aa_deploy.AntiAliasPass(options)(ir.serde.deserialize_model(G.conv_model((1, 3, 16, 16))))
    assert isinstance(direct, aa_deploy.Conversion) and direct.blurs == 1 and direct.actions[0].action == "pre"
    plain = ir.serde.deserialize_model(G.conv_model((1, 3, 16, 16), strides=(1, 1)))
    assert not aa_deploy.AntiAliasPass(options)(plain).modified
