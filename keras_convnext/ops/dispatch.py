"""The operations the layers call: each asks `platform` which formulation applies and runs it.

Every function here computes what its namesake in `ops.portable` defines;
with the fast paths off (`keras_convnext.config.set_fast_paths(False)`) it
runs that definition itself.
"""

import keras
from keras import ops

from keras_convnext.ops import jax_backend, platform, portable, tensorflow_backend, torch_backend


def linear(inputs, kernel, bias=None):
    """`portable.linear` through the fastest formulation here."""
    backend = platform.fast_backend()
    if backend == "torch":
        return torch_backend.linear(inputs, kernel, bias)
    if backend == "tensorflow":
        return tensorflow_backend.linear(inputs, kernel, bias)
    if backend == "jax" and platform.jax_bfloat16_on_cpu(inputs, kernel):
        return jax_backend.linear(inputs, kernel, bias)
    return portable.linear(inputs, kernel, bias)


def linear_gelu(inputs, kernel, bias=None):
    """`portable.linear_gelu` through the fastest formulation here."""
    backend = platform.fast_backend()
    if backend == "torch":
        return torch_backend.linear_gelu(inputs, kernel, bias)
    if backend == "tensorflow":
        return tensorflow_backend.linear_gelu(inputs, kernel, bias)
    if backend == "jax":
        return jax_backend.linear_gelu(inputs, kernel, bias)
    return portable.linear_gelu(inputs, kernel, bias)


def layer_norm(inputs, gamma, beta, epsilon):
    """`portable.layer_norm` through the fastest formulation here."""
    backend = platform.fast_backend()
    if backend == "torch":
        return torch_backend.layer_norm(inputs, gamma, beta, epsilon)
    if backend == "tensorflow" and platform.tensorflow_layer_norm_fuses(inputs):
        return tensorflow_backend.layer_norm(inputs, gamma, beta, epsilon)
    return portable.layer_norm(inputs, gamma, beta, epsilon)


def grn(inputs, gamma, beta, epsilon=1e-6):
    """`portable.grn` through the fastest formulation here."""
    backend = platform.fast_backend()
    if backend == "torch":
        return torch_backend.grn(inputs, gamma, beta, epsilon)
    if backend == "tensorflow":
        return tensorflow_backend.grn(inputs, gamma, beta, epsilon)
    return portable.grn(inputs, gamma, beta, epsilon)


def grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    """`portable.grn_linear`: GRN folded into the product where `platform.grn_fold_applies`,
    else `grn` and `linear` one after the other."""
    if platform.grn_fold_applies(inputs, kernel):
        return folded_grn_linear(inputs, gamma, beta, kernel, bias, epsilon)
    return linear(grn(inputs, gamma, beta, epsilon), kernel, bias)


def folded_grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    """`portable.grn_linear` with GRN folded into the product, for a caller that has checked
    `platform.grn_fold_applies` (the block, which otherwise runs its GRN layer)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return tensorflow_backend.grn_linear(inputs, gamma, beta, kernel, bias, epsilon)
    if backend == "torch":
        return torch_backend.grn_linear(inputs, gamma, beta, kernel, bias, epsilon)
    return jax_backend.grn_linear(inputs, gamma, beta, kernel, bias, epsilon)


def patch_conv2d(inputs, kernel, bias=None):
    """`portable.patch_conv2d` through the fastest formulation here.

    An output position sees its own patch alone, so the convolution is a
    Linear layer over the flattened patches (`patch_linear`), where
    `platform.patch_linear_applies`.
    """
    if platform.patch_linear_applies(inputs):
        return patch_linear(inputs, kernel, bias)
    return portable.patch_conv2d(inputs, kernel, bias)


def patch_linear(inputs, kernel, bias=None):
    """`portable.patch_conv2d` as a reshape, a transpose and `linear` over the flattened patches."""
    size = kernel.shape[0]
    _, height, width, channels = inputs.shape
    rows, cols = height // size, width // size
    x = inputs[:, : rows * size, : cols * size] if (height % size or width % size) else inputs
    x = _reshape(x, (-1, rows, size, cols, size, channels))
    # (row, column, channel) within the patch: the order of the kernel's first three axes.
    x = _reshape(ops.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, rows, cols, size * size * channels))
    return linear(x, _reshape(kernel, (size * size * channels, kernel.shape[-1])), bias)


def _reshape(x, shape):
    """`ops.reshape`; on PyTorch, the tensor's own reshape.

    Keras' `ops.reshape` searches its shape argument for symbolic tensors,
    tens of microseconds per call in PyTorch's eager mode.
    """
    return x.reshape(shape) if keras.backend.backend() == "torch" else ops.reshape(x, shape)


def depthwise_conv2d(inputs, kernel, bias=None):
    """`portable.depthwise_conv2d` through the fastest formulation here.

    JAX on the CPU and TensorFlow inside XLA take `ops.xla`'s shifted
    multiply-adds (with a gradient of the same kind); PyTorch its
    channels_last kernel; TensorFlow outside XLA, and JAX on a GPU (where XLA
    hands the grouped convolution to cuDNN), the definition.
    """
    backend = platform.fast_backend()
    if platform.xla_depthwise_applies():
        if backend == "jax":
            return jax_backend.depthwise_conv2d(inputs, kernel, bias)
        return tensorflow_backend.depthwise_conv2d(inputs, kernel, bias)
    if backend == "torch":
        return torch_backend.depthwise_conv2d(inputs, kernel, bias)
    return portable.depthwise_conv2d(inputs, kernel, bias)


def cast_rounded(inputs, dtype):
    """`portable.cast`; float32 to bfloat16 on JAX's CPU through `jax_backend.round_to_bfloat16`."""
    if (
        keras.backend.standardize_dtype(dtype) == "bfloat16"
        and keras.backend.standardize_dtype(inputs.dtype) == "float32"
        and platform.fast_backend() == "jax"
        and platform.jax_on_cpu()
    ):
        return jax_backend.round_to_bfloat16(inputs)
    return portable.cast(inputs, dtype)
