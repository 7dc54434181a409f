"""The definitions: every operation of the ConvNeXt layers, written once with `keras.ops`.

These run on every backend and are what `keras_convnext.config.set_fast_paths(False)`
computes. A backend's fast path (`ops.torch_backend`, `ops.tensorflow_backend`,
`ops.jax_backend`, `ops.xla`) is another formulation of one of these, with a
test that both agree (tests/test_ops.py). All maps are channels_last.
"""

import keras
from keras import ops


def linear(inputs, kernel, bias=None):
    """`inputs @ kernel + bias` over the last axis; kernel `(in, out)`, bias `(out,)` or None."""
    outputs = ops.matmul(inputs, kernel)
    return outputs if bias is None else outputs + bias


def linear_gelu(inputs, kernel, bias=None):
    """`gelu(inputs @ kernel + bias)`, the exact (erf) GELU: the block's widening Linear."""
    return keras.activations.gelu(linear(inputs, kernel, bias), approximate=False)


def layer_norm(inputs, gamma, beta, epsilon):
    """LayerNorm over the last axis, `keras.ops.layer_normalization`, in the input's dtype.

    Keras computes in float32 whatever the input dtype and casts back.
    """
    outputs = ops.layer_normalization(inputs, gamma, beta, axis=-1, epsilon=epsilon)
    return ops.cast(outputs, inputs.dtype)


def grn(inputs, gamma, beta, epsilon=1e-6):
    """Global Response Normalization (ConvNeXt V2, Woo et al. 2023, eqs. 1-3).

    `x + gamma * (x * Nx) + beta` on `(batch, height, width, channels)`, computed
    as `x * (1 + gamma * Nx) + beta` (`grn_scale`): the per-channel scale is
    formed on a `(batch, 1, 1, channels)` tensor, so the full-size tensor is
    read once instead of three times.
    """
    return inputs * grn_scale(inputs, gamma, epsilon) + ops.cast(beta, inputs.dtype)


def grn_scale(inputs, gamma, epsilon, sum_of_squares=None):
    """GRN's per-sample, per-channel factor `1 + gamma * Nx`, `(batch, 1, 1, channels)`, in the input's dtype.

    See `grn_scale_float32`; the small factor is cast back, so the full-size
    tensor stays in its dtype.
    """
    return ops.cast(grn_scale_float32(inputs, gamma, epsilon, sum_of_squares), inputs.dtype)


def grn_scale_float32(inputs, gamma, epsilon, sum_of_squares=None):
    """`1 + gamma * Nx` in float32: `Gx` is the L2 norm over axes 1 and 2 per sample and
    channel, and `Nx = Gx / (mean_channels(Gx) + epsilon)`.

    The statistics are computed in float32 whatever the input dtype (a float16
    sum of squares over a 56x56 map overflows). `sum_of_squares` (float32,
    `(batch, 1, 1, channels)`) may be given by a backend's own formulation.
    """
    if sum_of_squares is None:
        sum_of_squares = ops.sum(ops.square(ops.cast(inputs, "float32")), axis=(1, 2), keepdims=True)
    spatial_norm = norm_from_sum_of_squares(sum_of_squares)
    relative = spatial_norm / (ops.mean(spatial_norm, axis=-1, keepdims=True) + epsilon)
    return 1.0 + ops.cast(gamma, "float32") * relative


def norm_from_sum_of_squares(sum_of_squares):
    """`sqrt(sum_of_squares)`, with a gradient of 0 rather than NaN where the sum is 0.

    A channel that is zero at every position of a sample has norm 0, and the
    norm's gradient `x / ||x||` is then 0 / 0. The reference model's
    `torch.linalg.vector_norm` defines it as 0 there. It happens in training:
    the exact GELU returns exactly 0 far enough below zero, and at 32x32
    inputs stage 4 has one position per channel, so one such activation
    zeroes a channel's norm and, without this, turns every gradient into NaN.
    """
    positive = sum_of_squares > 0
    return ops.where(positive, ops.sqrt(ops.where(positive, sum_of_squares, 1.0)), 0.0)


def grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    """GRN, then a Linear layer: the V2 block's GRN and narrowing Linear.

    `inputs` `(batch, height, width, channels)`, `kernel` `(channels, out)`;
    returns `(batch, height, width, out)`.
    """
    return linear(grn(inputs, gamma, beta, epsilon), kernel, bias)


def patch_conv2d(inputs, kernel, bias=None):
    """A convolution whose stride is its kernel size: one output per patch.

    Args:
        inputs: `(batch, height, width, in_channels)`; rows and columns past
            the last whole patch are dropped ("valid" padding).
        kernel: `(p, p, in_channels, out_channels)`.
        bias: `(out_channels,)` or None.

    Returns:
        `(batch, height // p, width // p, out_channels)`.
    """
    size = kernel.shape[0]
    outputs = ops.conv(inputs, kernel, strides=size, padding="valid", data_format="channels_last")
    return outputs if bias is None else outputs + bias


def depthwise_conv2d(inputs, kernel, bias=None):
    """Stride-1 "same" depthwise convolution, `keras.ops.depthwise_conv`.

    Args:
        inputs: `(batch, height, width, channels)`.
        kernel: `(k, k, channels, 1)`, k odd.
        bias: `(channels,)` or None.
    """
    outputs = ops.depthwise_conv(inputs, kernel, strides=1, padding="same", data_format="channels_last")
    return outputs if bias is None else outputs + bias


def cast(inputs, dtype):
    """`ops.cast`: the definition of the rounding `ops.cast_rounded` may do faster."""
    return ops.cast(inputs, dtype)
