"""A layer's weights in its compute dtype, without Keras' cast dispatch where nothing changes."""

import keras
from keras import ops

from keras_convnext.ops import platform, torch_backend


def weight_value(variable):
    """`variable.value`; inside the model's direct layer chain on PyTorch
    (`platform.reads_weights_directly`), the same tensor read without the checks."""
    if platform.reads_weights_directly():
        return torch_backend.stored_tensor(variable)
    return variable.value


def in_compute_dtype(variable, dtype):
    """The value of a Keras variable in `dtype` (a Keras dtype name).

    Same result as `ops.cast(variable, dtype)`, which reads `variable.value`
    too (autocast and stateless scopes included) but then runs Keras'
    dispatch (symbolic-tensor checks, dtype standardization) even when the
    dtype is already right: a few microseconds of Python per weight and
    call, paid on every call in PyTorch's eager mode. In the model's direct
    layer chain (`platform.reads_weights_directly`), every layer computes in
    its variables' dtype.
    """
    if platform.reads_weights_directly():
        return torch_backend.stored_tensor(variable)
    value = variable.value
    return value if variable.dtype == dtype else ops.cast(value, dtype)


def compute_weights(layer):
    """The layer's `kernel` and `bias` (None without one) in its compute dtype."""
    if platform.reads_weights_directly():
        bias = torch_backend.stored_tensor(layer.bias) if layer.use_bias else None
        return torch_backend.stored_tensor(layer.kernel), bias
    return in_compute_dtype(layer.kernel, layer.compute_dtype), compute_bias(layer)


def compute_bias(layer):
    """The layer's `bias` in its compute dtype, None without one."""
    return in_compute_dtype(layer.bias, layer.compute_dtype) if layer.use_bias else None


def stored_value(variable):
    """The value of a Keras variable in its own dtype, not autocast to a layer's
    compute dtype (float32 weights inside a `mixed_bfloat16` layer's call)."""
    with platform.autocast_scope(None):
        return variable.value


def in_dtype(tensor, dtype):
    """`ops.cast(tensor, dtype)`, returning `tensor` itself when it already has `dtype`."""
    return tensor if keras.backend.standardize_dtype(tensor.dtype) == dtype else ops.cast(tensor, dtype)
