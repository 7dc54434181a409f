"""TensorFlow's fast paths: formulations its graph optimizer and XLA run faster.

TensorFlow's graphs without XLA run each operation as a pass of its own over
memory, and its graph optimizer (grappler) hands a few known patterns to
oneDNN as single kernels. So the Linear is written as the 2-D
MatMul -> BiasAdd -> GELU chain that becomes one oneDNN product, GRN's scale
and shift fold into the product that follows it, and LayerNorm takes the
form that becomes oneDNN's one-pass kernel. Inside XLA (`jit_compile`) the
depthwise convolution is `ops.xla`'s shifted form. Each function here
computes what its namesake in `ops.portable` defines.
"""

import keras
from keras import ops

from keras_convnext.ops import portable, xla

# --- Depthwise convolution (inside XLA) ----------------------------------------


def depthwise_conv2d(inputs, kernel, bias=None):
    """`ops.xla`'s shifted multiply-adds, materialized once, with `xla.shifted_backward` as gradient.

    16-bit inputs are computed in float32 and the result rounded once, as on
    JAX (`jax_backend.depthwise_conv2d`).
    """
    import tensorflow as tf

    if bias is None:
        bias = ops.zeros((inputs.shape[-1],), dtype=inputs.dtype)
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if dtype in ("bfloat16", "float16"):
        outputs = depthwise_conv2d(*(ops.cast(tensor, "float32") for tensor in (inputs, kernel, bias)))
        return ops.cast(outputs, dtype)

    @tf.custom_gradient
    def convolve(inputs, kernel, bias):
        def backward(upstream):
            return xla.shifted_backward(inputs, kernel, bias, upstream, fft_kernel_gradient)

        return xla.shifted_forward(inputs, kernel, bias), backward

    return convolve(inputs, kernel, bias)


def fft_kernel_gradient(inputs, upstream, size):
    """`xla.depthwise_kernel_gradient` of a large map, through the Fourier domain (tf.signal)."""
    import tensorflow as tf

    pad = size // 2
    _, height, width, _ = upstream.shape  # static under XLA, where this runs
    rows, cols = xla.fft_length(height + 2 * pad), xla.fft_length(width + 2 * pad)
    # tf.signal transforms the two innermost axes: channels first.
    inputs = tf.transpose(inputs, (0, 3, 1, 2))
    upstream = tf.transpose(upstream, (0, 3, 1, 2))
    padded = tf.pad(inputs, [[0, 0], [0, 0], [pad, rows - height - pad], [pad, cols - width - pad]])
    upstream = tf.pad(upstream, [[0, 0], [0, 0], [0, rows - height], [0, cols - width]])
    spectrum = tf.signal.rfft2d(padded) * tf.math.conj(tf.signal.rfft2d(upstream))
    correlation = tf.signal.irfft2d(tf.reduce_sum(spectrum, axis=0), fft_length=[rows, cols])
    return tf.transpose(correlation[:, :size, :size], (1, 2, 0))[..., None]


# --- Linear layers ----------------------------------------------------------------


def linear(inputs, kernel, bias=None, gelu=False):
    """`portable.linear` (with `gelu`, `portable.linear_gelu`) as a 2-D MatMul -> BiasAdd -> GELU chain.

    TensorFlow's graph optimizer hands that chain to oneDNN as one fused
    product that applies the bias and GELU as it writes. `keras.ops.matmul`
    on a 4-D map and a separate `+ bias` do not match the pattern, and GELU
    then is a pass of its own, very slow in bfloat16.
    """
    import tensorflow as tf

    channels = inputs.shape[-1]
    outputs = tf.matmul(tf.reshape(inputs, (-1, channels)), kernel)
    if bias is not None:
        outputs = tf.nn.bias_add(outputs, bias)
    if gelu:
        outputs = tf.nn.gelu(outputs, approximate=False)
    # Static sizes stay static; unknown ones (the batch) are read at run time.
    leading = [size if size is not None else tf.shape(inputs)[axis] for axis, size in enumerate(inputs.shape[:-1])]
    return tf.reshape(outputs, leading + [kernel.shape[-1]])


def linear_gelu(inputs, kernel, bias=None):
    """`portable.linear_gelu` through `linear`'s fused chain."""
    return linear(inputs, kernel, bias, gelu=True)


# --- LayerNorm ------------------------------------------------------------------


def layer_norm(inputs, gamma, beta, epsilon):
    """`portable.layer_norm` in the pattern that grappler turns into oneDNN's one-pass `_MklLayerNorm`.

    The pattern: the rows reshaped to (1, rows, channels, 1), a training-mode
    FusedBatchNormV3 over them in NCHW with unit scale and zero offset made
    by `Fill`, reshaped back, times gamma, plus beta. Keras' own formulation
    is five passes over the map (mean, squared difference, mean, scale,
    shift). In bfloat16 the kernel keeps its statistics in float32 and
    scales by gamma and beta rounded to bfloat16. Applies where
    `platform.tensorflow_layer_norm_fuses`; elsewhere (eagerly, under XLA,
    on a GPU, without oneDNN) Keras' formulation is as fast or the only one.
    """
    import tensorflow as tf

    dtype = inputs.dtype
    channels = inputs.shape[-1]
    rows = tf.reshape(inputs, (-1, channels))
    # Grappler folds a `Fill` of static size into a constant before it looks
    # for the pattern, so the size also adds a zero read from the data
    # (`x > x` is false, NaN too), which no folding can know; a sum, so that
    # an empty batch works too.
    first = rows[:1, :1]
    size = tf.shape(rows)[:1] + tf.reduce_sum(tf.cast(first > first, tf.int32))
    empty = tf.constant([], tf.float32)
    normalized = tf.raw_ops.FusedBatchNormV3(
        x=tf.reshape(rows, (1, -1, channels, 1)),
        scale=tf.fill(size, 1.0),
        offset=tf.fill(size, 0.0),
        mean=empty,
        variance=empty,
        epsilon=epsilon,
        data_format="NCHW",
        is_training=True,
    )[0]
    outputs = tf.reshape(normalized, tf.shape(rows)) * tf.cast(gamma, dtype) + tf.cast(beta, dtype)
    outputs = tf.reshape(outputs, tf.shape(inputs))
    outputs.set_shape(inputs.shape)
    return outputs


# --- GRN --------------------------------------------------------------------------


def grn(inputs, gamma, beta, epsilon=1e-6):
    """`portable.grn`, with bfloat16 statistics summed by TensorFlow (see `_grn_scale`)."""
    return inputs * _grn_scale(inputs, gamma, epsilon) + ops.cast(beta, inputs.dtype)


def _grn_scale(inputs, gamma, epsilon):
    """`portable.grn_scale`; in bfloat16, from a sum of squares that TensorFlow accumulates
    in float32 itself.

    bfloat16 has float32's exponent range, so its squares cannot overflow,
    and TensorFlow accumulates a bfloat16 sum in float32, rounding only the
    result, below bfloat16's own resolution. So GRN's statistics need no
    full-size float32 copy of their input.
    """
    import tensorflow as tf

    sum_of_squares = None
    if inputs.dtype == tf.bfloat16:
        sum_of_squares = tf.cast(tf.reduce_sum(tf.square(inputs), axis=(1, 2), keepdims=True), tf.float32)
    return portable.grn_scale(inputs, gamma, epsilon, sum_of_squares)


def grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    """`portable.grn_linear` with GRN's scale and shift folded into the product.

    GRN's output `x * s + beta` (`s` per sample and channel) feeds the Linear
    layer alone, and `(x * s + beta) @ W + b = x @ (s * W) + (beta @ W + b)`.
    Where the map has more positions than the layer has outputs
    (`platform.grn_fold_applies`), the weight is the smaller tensor: `s`
    scales a per-sample copy of it in a batched product and `beta` joins the
    bias, instead of two passes over the map. Elsewhere `beta @ W` would read
    the larger weight once more: there GRN and `linear` run one after the other.
    """
    import tensorflow as tf

    _, height, width, channels = inputs.shape
    factor = _grn_scale(inputs, gamma, epsilon)
    folded_bias = tf.linalg.matvec(kernel, ops.cast(beta, kernel.dtype), transpose_a=True)
    folded_bias = folded_bias if bias is None else folded_bias + bias
    weights = tf.reshape(factor, (-1, channels, 1)) * kernel
    outputs = tf.matmul(tf.reshape(inputs, (-1, height * width, channels)), weights) + folded_bias
    return tf.reshape(outputs, (-1, height, width, kernel.shape[-1]))
