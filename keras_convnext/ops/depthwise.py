"""Stride-1 "same" depthwise convolution, channels_last, per-backend formulations.

XLA:CPU lowers a grouped convolution with one channel per group to a slow
generic loop (about 10x slower than the alternatives on a 7x7 kernel at
(8, 56, 56, 96)); the same result as k*k shifted multiply-adds is one fused
elementwise loop that XLA vectorizes over channels. The PyTorch backend of
Keras copies NHWC tensors to NCHW around each convolution, while PyTorch's
own channels_last kernel reads the NHWC memory as it is. Measured numbers are
in benchmarks/README.md.
"""

import functools

import keras
import numpy as np
from keras import ops

from keras_convnext.ops.rounding import cast_rounded


def portable_depthwise_conv2d(inputs, kernel, bias=None):
    """Reference formulation: `keras.ops.depthwise_conv`.

    Args:
        inputs: `(batch, height, width, channels)`.
        kernel: `(k, k, channels, 1)`, k odd.
        bias: `(channels,)` or None.
    """
    outputs = ops.depthwise_conv(inputs, kernel, strides=1, padding="same", data_format="channels_last")
    return outputs if bias is None else outputs + bias


def shifted_depthwise_conv2d(inputs, kernel, bias=None):
    """The same convolution as a sum of k*k shifted, channel-scaled copies (keras.ops only)."""
    size = kernel.shape[0]
    pad = size // 2
    height, width = ops.shape(inputs)[1], ops.shape(inputs)[2]
    padded = ops.pad(inputs, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    outputs = None
    for row in range(size):
        for col in range(size):
            term = padded[:, row : row + height, col : col + width, :] * kernel[row, col, :, 0]
            outputs = term if outputs is None else outputs + term
    return outputs if bias is None else outputs + bias


def depthwise_kernel_gradient(inputs, upstream, size):
    """Gradient of the depthwise conv's kernel: `(size, size, channels, 1)`, float32.

    `dk[i, j, c] = sum over (b, h, w) of padded[b, h + i, w + j, c] * upstream[b, h, w, c]`,
    a cross-correlation of each channel's input with its upstream gradient,
    summed over the batch. XLA:CPU runs it slowly as 49 reductions, and as
    per-channel matrix products over the kernel rows it spends most of its
    time copying. Large maps go through the Fourier domain
    (`_fft_kernel_gradient`), small ones through the products of all
    position pairs (`_pairwise_kernel_gradient`); the threshold is
    `_PAIRWISE_MAX_POSITIONS`. Runs under XLA (JAX, TensorFlow with
    `jit_compile`).
    """
    _, height, width, _ = upstream.shape  # static under XLA, where this runs
    inputs, upstream = ops.cast(inputs, "float32"), ops.cast(upstream, "float32")
    if height * width <= _PAIRWISE_MAX_POSITIONS:
        return _pairwise_kernel_gradient(inputs, upstream, size)
    return _fft_kernel_gradient(inputs, upstream, size)


# The kernel gradient alone under JAX, ms (pairwise / FFT): (16, 7, 7, 768)
# 4.5 / 20.5, (16, 8, 8, 512) 4.1 / 7.6, (16, 10, 10, 384) 8.0 / 8.7,
# (16, 12, 12, 384) 35.7 / 9.9, (16, 14, 14, 384) 69.4 / 16.8; the pairs grow
# as the square of the positions.
_PAIRWISE_MAX_POSITIONS = 100


def _pairwise_kernel_gradient(inputs, upstream, size):
    """`depthwise_kernel_gradient` for small maps, through the products of all position pairs.

    One product per channel over the batch gives `pairs[c, p, q]`, the sum
    of `inputs[b, p, c] * upstream[b, q, c]`; the tap `(i, j)` is the sum of
    the pairs whose input position `p` lies `(i - pad, j - pad)` away from
    the output position `q`, a second product with a constant 0/1 selector.
    Positions outside the map are the zero padding and have no pair.
    """
    _, height, width, channels = upstream.shape  # static under XLA, where this runs
    positions = height * width
    pairs = ops.einsum(
        "bpc,bqc->cpq",
        ops.reshape(inputs, (-1, positions, channels)),
        ops.reshape(upstream, (-1, positions, channels)),
    )
    selector = ops.convert_to_tensor(_offset_selector(size, height, width), dtype=pairs.dtype)
    taps = ops.einsum("cpq,kpq->kc", pairs, selector)
    return ops.reshape(taps, (size, size, channels, 1))


@functools.lru_cache(maxsize=None)
def _offset_selector(size, height, width):
    """`(size * size, positions, positions)`, numpy: 1 where tap `k` takes input `p` to output `q`."""
    pad = size // 2
    selector = np.zeros((size, size, height, width, height, width), dtype="float32")
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    for i in range(size):
        for j in range(size):
            source_rows, source_cols = rows + i - pad, cols + j - pad
            inside = (source_rows >= 0) & (source_rows < height) & (source_cols >= 0) & (source_cols < width)
            selector[i, j, source_rows[inside], source_cols[inside], rows[inside], cols[inside]] = 1.0
    return selector.reshape(size * size, height * width, height * width)


def _fft_kernel_gradient(inputs, upstream, size):
    pad = size // 2
    _, height, width, _ = upstream.shape  # static under XLA, where this runs
    rows, cols = _fft_length(height + 2 * pad), _fft_length(width + 2 * pad)
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        padded = jnp.pad(inputs, [[0, 0], [pad, rows - height - pad], [pad, cols - width - pad], [0, 0]])
        spectrum = jnp.fft.rfft2(padded, axes=(1, 2)) * jnp.conj(
            jnp.fft.rfft2(upstream, s=(rows, cols), axes=(1, 2))
        )
        correlation = jnp.fft.irfft2(jnp.sum(spectrum, axis=0), s=(rows, cols), axes=(0, 1))
        return correlation[:size, :size, :, None]
    import tensorflow as tf

    # tf.signal transforms the two innermost axes: channels first.
    inputs = tf.transpose(inputs, (0, 3, 1, 2))
    upstream = tf.transpose(upstream, (0, 3, 1, 2))
    padded = tf.pad(inputs, [[0, 0], [0, 0], [pad, rows - height - pad], [pad, cols - width - pad]])
    upstream = tf.pad(upstream, [[0, 0], [0, 0], [0, rows - height], [0, cols - width]])
    spectrum = tf.signal.rfft2d(padded) * tf.math.conj(tf.signal.rfft2d(upstream))
    correlation = tf.signal.irfft2d(tf.reduce_sum(spectrum, axis=0), fft_length=[rows, cols])
    return tf.transpose(correlation[:, :size, :size], (1, 2, 0))[..., None]


def _fft_length(minimum):
    """The smallest length >= `minimum` with no prime factor above 5 (fast FFT sizes)."""
    length = minimum
    while True:
        rest = length
        for factor in (2, 3, 5):
            while rest % factor == 0:
                rest //= factor
        if rest == 1:
            return length
        length += 1


def _materialized(outputs):
    """`outputs`, divided by ones that XLA cannot prove to be ones.

    XLA fuses a cheap elementwise producer into each of its consumers,
    recomputing it there, unless its last operation is expensive; a
    division is. The k*k multiply-adds of the shifted convolution would
    otherwise be recomputed inside every fused consumer: LayerNorm's mean,
    its variance, its normalized output and their gradients (eight times,
    where once is needed, in a V2 block's training step). An
    `optimization_barrier` does not help: XLA:CPU removes it before fusion.
    The ones are `1 + 0 * outputs` elementwise (a division by a broadcast
    scalar becomes a multiplication); only an infinite output changes, to NaN.
    """
    return outputs / (1.0 + 0.0 * outputs)


def _shifted_forward(inputs, kernel, bias):
    return _materialized(shifted_depthwise_conv2d(inputs, kernel, bias))


def _shifted_backward(inputs, kernel, bias, upstream):
    flipped = ops.flip(ops.flip(kernel, axis=0), axis=1)
    inputs_gradient = shifted_depthwise_conv2d(upstream, flipped)
    kernel_gradient = depthwise_kernel_gradient(inputs, upstream, kernel.shape[0])
    bias_gradient = ops.sum(ops.cast(upstream, "float32"), axis=(0, 1, 2))
    return inputs_gradient, ops.cast(kernel_gradient, kernel.dtype), ops.cast(bias_gradient, bias.dtype)


def _jax_shifted_with_fast_gradient():
    import jax

    @jax.custom_vjp
    def convolve(inputs, kernel, bias):
        return _shifted_forward(inputs, kernel, bias)

    def forward(inputs, kernel, bias):
        return _shifted_forward(inputs, kernel, bias), (inputs, kernel, bias)

    def backward(saved, upstream):
        return _shifted_backward(*saved, upstream)

    convolve.defvjp(forward, backward)
    # Jitted, so an eager call runs one compiled program per input shape,
    # not each of the k*k slices and multiply-adds as its own small program
    # (V2 Atto's first eager call at 64x64: 7.3 s). Inside a traced function
    # the nested program is inlined.
    return jax.jit(convolve)


def _tensorflow_shifted_with_fast_gradient(inputs, kernel, bias):
    import tensorflow as tf

    @tf.custom_gradient
    def convolve(inputs, kernel, bias):
        def backward(upstream):
            return _shifted_backward(inputs, kernel, bias, upstream)

        return _shifted_forward(inputs, kernel, bias), backward

    return convolve(inputs, kernel, bias)


_JAX_CONVOLVE = []


def _xla_depthwise_conv2d(inputs, kernel, bias=None):
    """Shifted multiply-adds, materialized once, whose gradient uses `depthwise_kernel_gradient`.

    16-bit inputs are computed in float32 and the result rounded once:
    XLA:CPU runs the k*k multiply-adds about 3x faster in float32 than in
    bfloat16 (V2 Tiny's stage 1 at batch 8: 8.3 against 24.1 ms), and the
    sum no longer rounds to bfloat16 after every term.
    """
    if bias is None:
        bias = ops.zeros((inputs.shape[-1],), dtype=inputs.dtype)
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if dtype in ("bfloat16", "float16"):
        outputs = _xla_depthwise_conv2d(*(ops.cast(tensor, "float32") for tensor in (inputs, kernel, bias)))
        return cast_rounded(outputs, dtype)
    if keras.backend.backend() == "jax":
        if not _JAX_CONVOLVE:
            _JAX_CONVOLVE.append(_jax_shifted_with_fast_gradient())
        return _JAX_CONVOLVE[0](inputs, kernel, bias)
    return _tensorflow_shifted_with_fast_gradient(inputs, kernel, bias)


def _torch_channels_last_depthwise_conv2d(inputs, kernel, bias=None):
    import torch.nn.functional as F

    channels = inputs.shape[-1]
    size = kernel.shape[0]
    # permute() only relabels strides: the convolution sees NCHW shapes over
    # NHWC memory and runs PyTorch's channels_last kernel without copies.
    outputs = F.conv2d(
        inputs.permute(0, 3, 1, 2), kernel.permute(2, 3, 0, 1), bias, padding=size // 2, groups=channels
    )
    return outputs.permute(0, 2, 3, 1)


def _tensorflow_in_xla():
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return False
    if tf.executing_eagerly():
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _jax_on_cpu():
    import jax

    return jax.default_backend() == "cpu"


def depthwise_conv2d(inputs, kernel, bias=None):
    """Depthwise convolution through the fastest formulation for the backend.

    JAX on the CPU, and TensorFlow inside XLA compilation, use the shifted
    multiply-adds (with a gradient of the same kind, see
    `depthwise_kernel_gradient`); PyTorch its channels_last kernel;
    TensorFlow outside XLA, and JAX on a GPU (where XLA hands the grouped
    convolution to cuDNN), the native op. All agree with
    `portable_depthwise_conv2d` up to float rounding (tests/test_ops.py).
    """
    backend = keras.backend.backend()
    if (backend == "jax" and _jax_on_cpu()) or (backend == "tensorflow" and _tensorflow_in_xla()):
        return _xla_depthwise_conv2d(inputs, kernel, bias)
    if backend == "torch":
        return _torch_channels_last_depthwise_conv2d(inputs, kernel, bias)
    return portable_depthwise_conv2d(inputs, kernel, bias)
