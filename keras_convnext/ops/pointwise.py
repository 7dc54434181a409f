"""Per-position (1x1) operations of the ConvNeXt block: Linear and GRN.

PyTorch's eager mode runs each operation as its own pass over memory, so on
that backend the fast paths fuse what they can: the Linear bias goes into
the matrix product (`addmm`), and GRN's scale-and-shift is one `addcmul`.
XLA (JAX, TensorFlow) fuses the portable formulations by itself.
"""

import keras
from keras import ops


def portable_linear(inputs, kernel, bias=None):
    """`inputs @ kernel + bias` over the last axis; kernel `(in, out)`."""
    outputs = ops.matmul(inputs, kernel)
    return outputs if bias is None else outputs + bias


def _torch_linear(inputs, kernel, bias=None):
    import torch

    flat = inputs.reshape(-1, inputs.shape[-1])
    outputs = torch.mm(flat, kernel) if bias is None else torch.addmm(bias, flat, kernel)
    return outputs.reshape(*inputs.shape[:-1], kernel.shape[-1])


def linear(inputs, kernel, bias=None):
    """`portable_linear` through the fastest formulation for the backend."""
    if keras.backend.backend() == "torch":
        return _torch_linear(inputs, kernel, bias)
    return portable_linear(inputs, kernel, bias)


def _relative_norm(inputs, epsilon):
    # Gx: L2 norm over the spatial axes per sample and channel; Nx = Gx / mean_c(Gx).
    spatial_norm = ops.sqrt(ops.sum(ops.square(inputs), axis=(1, 2), keepdims=True))
    return spatial_norm / (ops.mean(spatial_norm, axis=-1, keepdims=True) + epsilon)


def portable_grn(inputs, gamma, beta, epsilon=1e-6):
    """GRN on channels_last `(batch, height, width, channels)`.

    `x + gamma * (x * Nx) + beta`, computed as `x * (1 + gamma * Nx) + beta`:
    the per-channel scale is formed on a `(batch, 1, 1, channels)` tensor, so
    the full-size tensor is read once instead of three times.
    """
    return inputs * (1.0 + gamma * _relative_norm(inputs, epsilon)) + beta


def _torch_grn(inputs, gamma, beta, epsilon=1e-6):
    import torch

    return torch.addcmul(beta, inputs, 1.0 + gamma * _relative_norm(inputs, epsilon))


def grn(inputs, gamma, beta, epsilon=1e-6):
    """`portable_grn` through the fastest formulation for the backend."""
    if keras.backend.backend() == "torch":
        return _torch_grn(inputs, gamma, beta, epsilon)
    return portable_grn(inputs, gamma, beta, epsilon)
