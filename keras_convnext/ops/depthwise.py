"""Stride-1 "same" depthwise convolution, channels_last, per-backend formulations.

XLA:CPU lowers a grouped convolution with one channel per group to a slow
generic loop (about 10x slower than the alternatives on a 7x7 kernel at
(8, 56, 56, 96)); the same result as k*k shifted multiply-adds is one fused
elementwise loop that XLA vectorizes over channels. The PyTorch backend of
Keras copies NHWC tensors to NCHW around each convolution, while PyTorch's
own channels_last kernel reads the NHWC memory as it is. Measured numbers are
in benchmarks/README.md.
"""

import keras
from keras import ops


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


def depthwise_conv2d(inputs, kernel, bias=None):
    """Depthwise convolution through the fastest formulation for the backend.

    JAX, and TensorFlow inside XLA compilation, use the shifted multiply-adds;
    PyTorch its channels_last kernel; TensorFlow outside XLA its native op.
    All agree with `portable_depthwise_conv2d` up to float rounding
    (tests/test_ops.py).
    """
    backend = keras.backend.backend()
    if backend == "jax" or (backend == "tensorflow" and _tensorflow_in_xla()):
        return shifted_depthwise_conv2d(inputs, kernel, bias)
    if backend == "torch":
        return _torch_channels_last_depthwise_conv2d(inputs, kernel, bias)
    return portable_depthwise_conv2d(inputs, kernel, bias)
