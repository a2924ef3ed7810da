"""What cnnc imports from ONNX, op by op: the attributes it takes, what it refuses, and the
ONNX backend node tests (shipped in the onnx wheel, `onnx.backend.test`) that run against
cnnc for that op. `tests/onnx/test_conformance.py` runs exactly `NODE_TESTS`;
`python -m cnnc.onnx.support` prints the table docs/onnx.md holds (a test keeps the two
the same).

The node tests of an op that none of its tests can show are listed with the reason: a
cnnc network has one input (tests of Add, Mul and Concat feed two), samples of rank 1 to 3
(tests of 1-D inputs have none, 3-D and 5-D pools a wrong rank) and float data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpSupport:
    op: str
    takes: str  # the attributes and forms cnnc imports
    refuses: str  # what it refuses, with the error's reason
    tests: tuple[str, ...] = ()  # the node tests that pass (without "test_")


SUPPORT: tuple[OpSupport, ...] = (
    OpSupport("Conv", "2-D; `group`, `dilations`, `strides`, `pads`, `auto_pad` (SAME_UPPER, "
              "SAME_LOWER, VALID), bias; a zero `Pad` in front is merged",
              "1-D and 3-D convolutions; a weight or bias computed at run time",
              ("basic_conv_with_padding", "basic_conv_without_padding",
               "conv_with_strides_padding", "conv_with_strides_no_padding",
               "conv_with_strides_and_asymmetric_padding", "conv_with_autopad_same")),
    OpSupport("BatchNormalization", "`epsilon`, `momentum` (as 1 − torch's); "
              "`training_mode` 1 when its statistics outputs are not read",
              "reading the running-statistics outputs (cnnc keeps them as buffers)",
              ("batchnorm_example", "batchnorm_epsilon")),
    OpSupport("Relu", "", "", ("relu",)),
    OpSupport("LeakyRelu", "`alpha`", "", ("leakyrelu", "leakyrelu_default")),
    OpSupport("Clip", "constant `min` / `max` (either may be absent): relu6, relu or "
              "`clip(min, max)`", "bounds computed at run time; integer data",
              ("clip", "clip_default_min", "clip_default_max")),
    OpSupport("Sigmoid", "", "", ("sigmoid",)),
    OpSupport("Tanh", "", "", ("tanh",)),
    OpSupport("HardSigmoid", "`alpha`, `beta` (torch's 1/6, 1/2 is `hardsigmoid`)", "",
              ("hardsigmoid", "hardsigmoid_default")),
    OpSupport("HardSwish", "also HardSigmoid(1/6, 1/2)·x", "", ("hardswish",)),
    OpSupport("Mul + Sigmoid", "x·sigmoid(x) as silu", "", ()),
    OpSupport("Gelu", "`approximate` none (opset 20), and the Div/Erf/Add/Mul/Mul pattern "
              "of older exporters", "`approximate` tanh", ("gelu_default_2",)),
    OpSupport("MaxPool", "2-D; `kernel_shape`, `strides`, `pads`, `auto_pad`, `ceil_mode`; a "
              "−∞ `Pad` in front is merged",
              "`dilations` other than 1; the Indices output; pads over half the window; "
              "integer data",
              ("maxpool_2d_default", "maxpool_2d_precomputed_pads",
               "maxpool_2d_precomputed_strides", "maxpool_2d_precomputed_same_upper",
               "maxpool_2d_same_upper", "maxpool_2d_same_lower", "maxpool_2d_strides",
               "maxpool_2d_ceil", "maxpool_2d_ceil_output_size_reduce_by_one")),
    OpSupport("AveragePool", "2-D; as MaxPool, and `count_include_pad`; a zero `Pad` in front "
              "is merged", "`dilations` other than 1; pads over half the window",
              ("averagepool_2d_default", "averagepool_2d_precomputed_pads",
               "averagepool_2d_precomputed_pads_count_include_pad",
               "averagepool_2d_precomputed_strides", "averagepool_2d_precomputed_same_upper",
               "averagepool_2d_same_upper", "averagepool_2d_same_lower",
               "averagepool_2d_strides", "averagepool_2d_ceil",
               "averagepool_2d_ceil_last_window_starts_on_pad")),
    OpSupport("GlobalAveragePool", "also ReduceMean over axes 2 and 3", "",
              ("globalaveragepool", "globalaveragepool_precomputed")),
    OpSupport("GlobalMaxPool", "also ReduceMax over axes 2 and 3", "",
              ("globalmaxpool", "globalmaxpool_precomputed")),
    OpSupport("Add", "two layers of one shape (`add`); a per-channel constant after a Conv "
              "(into its bias)", "other constants (the node tests feed two inputs: none can "
              "run)", ()),
    OpSupport("Mul", "two layers of one shape, or a C×1×1 gate (`mul`); a per-channel "
              "constant after a Conv (into its weight and bias)", "other constants (the node "
              "tests feed two inputs: none can run)", ()),
    OpSupport("Concat", "`axis` 1 (channels), of layers (`concat`)",
              "other axes; constants (the node tests feed two inputs: none can run)", ()),
    OpSupport("Flatten", "`axis` 1", "other axes (they move the batch)",
              ("flatten_axis1", "flatten_default_axis", "flatten_negative_axis3")),
    OpSupport("Reshape", "to N × features or to the shape it has, with the target folded "
              "from Shape→Gather→Unsqueeze→Concat chains (its first entry the batch)",
              "any other target", ("reshape_reduced_dims",)),
    OpSupport("Squeeze", "of the 1×1 after a global pool", "other axes", ()),
    OpSupport("Gemm", "`transB`, `alpha`, `beta`; a constant B; a C of one row",
              "`transA` 1; a C that differs between rows",
              ("gemm_default_no_bias", "gemm_default_zero_bias", "gemm_default_scalar_bias",
               "gemm_default_single_elem_vector_bias", "gemm_default_vector_bias",
               "gemm_transposeB", "gemm_alpha", "gemm_beta")),
    OpSupport("MatMul", "N × features by a constant matrix, with a constant Add after it "
              "as the bias", "batched (3-D and 4-D) products", ("matmul_2d",)),
    OpSupport("Softmax", "over the features of N × features", "other axes",
              ("softmax_example", "softmax_large_number")),
    OpSupport("LogSoftmax", "over the features of N × features", "other axes",
              ("logsoftmax_example_1", "logsoftmax_large_number")),
    OpSupport("Dropout", "a `dropout` layer of its ratio: a copy at inference, masks in "
              "cnnc's training calls, whatever `training_mode` says",
              "reading the mask; a ratio computed at run time",
              ("dropout_default", "dropout_default_ratio", "dropout_random_old",
               "training_dropout_zero_ratio")),
    OpSupport("Identity", "", "", ("identity",)),
    OpSupport("Pad", "`constant` mode, height and width only, any finite value (a `pad` "
              "layer), `axes`", "other modes; padding the batch or channels",
              ("constant_pad", "constant_pad_axes", "constant_pad_negative_axes")),
    OpSupport("Resize / Upsample", "`nearest` by whole scales (from `scales` or `sizes`), "
              "`axes`; coordinate modes that make it a copy (asymmetric + floor, half_pixel "
              "+ round_prefer_floor/ceil)", "linear and cubic; downsampling; fractional "
              "scales; align_corners",
              ("resize_upsample_scales_nearest", "resize_upsample_scales_nearest_axes_2_3",
               "resize_upsample_scales_nearest_axes_3_2")),
    OpSupport("Constant, ConstantOfShape, Shape, Gather, Cast, Slice, Transpose, ...",
              "any node whose inputs are all constants is folded at import",
              "random ops (RandomNormal, Bernoulli, ...); their node tests have no "
              "network input", ()),
)

NODE_TESTS: tuple[str, ...] = tuple(f"test_{t}" for entry in SUPPORT for t in entry.tests)


def markdown() -> str:
    """The support matrix, as docs/onnx.md holds it."""
    rows = ["| ONNX op | cnnc takes | refused | node tests run |", "| --- | --- | --- | --- |"]
    for entry in SUPPORT:
        tests = ", ".join(f"`{t}`" for t in entry.tests) or "—"
        rows.append(f"| {entry.op} | {entry.takes or 'as defined'} | {entry.refuses or '—'} "
                    f"| {tests} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
