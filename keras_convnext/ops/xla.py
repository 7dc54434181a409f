"""Formulations for XLA (JAX, TensorFlow with `jit_compile`), shared by both backends.

XLA:CPU lowers a grouped convolution with one channel per group to a slow
generic loop; the same result as k*k shifted multiply-adds is one fused
elementwise loop that XLA vectorizes over the channels. Its kernel gradient,
taken as XLA differentiates the shifted form, is k*k reductions, which
XLA:CPU also runs slowly: `depthwise_kernel_gradient` computes it as products
instead. Each backend wraps these in its own custom gradient
(`jax_backend.depthwise_conv2d`, `tensorflow_backend.depthwise_conv2d`).
"""

import functools

import numpy as np
from keras import ops

from keras_convnext.ops import platform


def shifted_depthwise_conv2d(inputs, kernel, bias=None):
    """`portable.depthwise_conv2d` as a sum of k*k shifted, channel-scaled copies (keras.ops only)."""
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


def materialized(outputs):
    """`outputs`, divided by ones that XLA cannot prove to be ones.

    XLA fuses a cheap elementwise producer into each of its consumers,
    recomputing it there, unless its last operation is expensive; a
    division is. The k*k multiply-adds of the shifted convolution would
    otherwise be recomputed inside every fused consumer: LayerNorm's mean,
    its variance, its normalized output and their gradients. An
    `optimization_barrier` does not help: XLA:CPU removes it before fusion.
    The ones are `1 + 0 * outputs` elementwise (a division by a broadcast
    scalar becomes a multiplication); only an infinite output changes, to NaN.
    """
    return outputs / (1.0 + 0.0 * outputs)


def shifted_forward(inputs, kernel, bias):
    """The forward pass of the backends' custom-gradient depthwise convolution."""
    return materialized(shifted_depthwise_conv2d(inputs, kernel, bias))


def shifted_backward(inputs, kernel, bias, upstream, fft_kernel_gradient):
    """Gradients `(inputs, kernel, bias)` of `shifted_forward` for the `upstream` gradient.

    `fft_kernel_gradient(inputs, upstream, size)` is the backend's Fourier-domain
    kernel gradient (see `depthwise_kernel_gradient`).
    """
    flipped = ops.flip(ops.flip(kernel, axis=0), axis=1)
    inputs_gradient = shifted_depthwise_conv2d(upstream, flipped)
    kernel_gradient = depthwise_kernel_gradient(inputs, upstream, kernel.shape[0], fft_kernel_gradient)
    bias_gradient = ops.sum(ops.cast(upstream, "float32"), axis=(0, 1, 2))
    return inputs_gradient, ops.cast(kernel_gradient, kernel.dtype), ops.cast(bias_gradient, bias.dtype)


def depthwise_kernel_gradient(inputs, upstream, size, fft_kernel_gradient):
    """Gradient of the depthwise conv's kernel: `(size, size, channels, 1)`, float32.

    `dk[i, j, c] = sum over (b, h, w) of padded[b, h + i, w + j, c] * upstream[b, h, w, c]`,
    a cross-correlation of each channel's input with its upstream gradient,
    summed over the batch. XLA:CPU runs it slowly as k*k reductions, and as
    per-channel matrix products over the kernel rows it spends most of its
    time copying. Maps of up to `platform.PAIRWISE_MAX_POSITIONS` positions go
    through the products of all position pairs (`pairwise_kernel_gradient`),
    larger ones through the Fourier domain (the backend's `fft_kernel_gradient`).
    """
    _, height, width, _ = upstream.shape  # static under XLA, where this runs
    inputs, upstream = ops.cast(inputs, "float32"), ops.cast(upstream, "float32")
    if height * width <= platform.PAIRWISE_MAX_POSITIONS:
        return pairwise_kernel_gradient(inputs, upstream, size)
    return fft_kernel_gradient(inputs, upstream, size)


def pairwise_kernel_gradient(inputs, upstream, size):
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


def fft_length(minimum):
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
