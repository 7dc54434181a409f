"""Layers that are Linear maps at heart: the block's 1x1 convolutions, the patch convolutions."""

import keras

from keras_convnext.layers.compute_dtype import compute_bias, compute_weights, stored_value
from keras_convnext.ops import linear, linear_gelu, patch_conv2d, platform


def _product_weights(layer):
    """`compute_weights(layer)`, with the float32 kernel as stored where `platform.reads_stored_kernel`
    (no rounded copy made only to be dropped: an eager call would run it)."""
    if platform.reads_weights_directly():  # one dtype throughout: the weights as stored
        return compute_weights(layer)
    if platform.reads_stored_kernel(layer.compute_dtype, layer.variable_dtype):
        return stored_value(layer.kernel), compute_bias(layer)
    return compute_weights(layer)


def _falls_back(layer):
    """Whether a quantized or LoRA-enabled layer must run its Keras parent's own call."""
    return layer.quantization_mode is not None or getattr(layer, "lora_enabled", False)


@keras.saving.register_keras_serializable(package="keras_convnext")
class PointwiseDense(keras.layers.Dense):
    """`keras.layers.Dense` over the last axis, through `keras_convnext.ops.linear`.

    Same weights and arguments as Dense (`kernel` `(in, out)`, `bias` `(out,)`);
    plain float layers take the backend's fastest formulation (with
    `activation="gelu"`, the exact GELU, one that may fuse it), and quantized
    or LoRA-enabled layers fall back to Dense itself.
    """

    def call(self, inputs, training=None):
        if _falls_back(self):
            return super().call(inputs, training=training)
        kernel, bias = _product_weights(self)
        if self.activation is keras.activations.gelu:
            return linear_gelu(inputs, kernel, bias)
        outputs = linear(inputs, kernel, bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    @property
    def computes_own_product(self):
        """Whether `call` runs `keras_convnext.ops` (not Dense's own call, as a quantized or
        LoRA-enabled layer does) with no activation: its product may take GRN folded in."""
        return not _falls_back(self) and self.activation is keras.activations.linear

    def product_weights(self):
        """`(kernel, bias)` as `call` hands them to `keras_convnext.ops.linear` (bias None without one)."""
        return _product_weights(self)


@keras.saving.register_keras_serializable(package="keras_convnext")
class PatchConv2D(keras.layers.Conv2D):
    """A channels_last `keras.layers.Conv2D` whose stride equals its kernel size.

    ConvNeXt's stem (4x4, stride 4) and downsampling layers (2x2, stride 2)
    cut the map into non-overlapping patches. Same weights and arguments as
    Conv2D (`kernel` `(p, p, in, out)`); the computation goes through
    `keras_convnext.ops.patch_conv2d`. Quantized or LoRA-enabled layers fall
    back to Conv2D itself.
    """

    def __init__(self, filters, kernel_size, **kwargs):
        kwargs.setdefault("strides", kernel_size)
        kwargs.setdefault("data_format", "channels_last")
        super().__init__(filters, kernel_size, **kwargs)
        if (
            self.strides != self.kernel_size
            or self.kernel_size[0] != self.kernel_size[1]
            or self.padding != "valid"
            or self.data_format != "channels_last"
            or self.dilation_rate != (1, 1)
            or self.groups != 1
        ):
            raise ValueError(
                "PatchConv2D supports square kernels with strides equal to the kernel size, "
                f"'valid' padding, channels_last, dilation 1 and one group; got {self.get_config()}."
            )

    def call(self, inputs):
        height, width = inputs.shape[1:3]
        size = self.kernel_size[0]
        if any(length is not None and length < size for length in (height, width)):
            # Otherwise an empty map, and an error from deep inside the backend.
            raise ValueError(
                f"{self.name} cuts {size}x{size} patches, but its input map is {height}x{width} "
                f"(inputs of shape {tuple(inputs.shape)}). A ConvNeXt downsamples by 32, so "
                "images must be at least 32x32 pixels."
            )
        if _falls_back(self):
            return super().call(inputs)
        kernel, bias = _product_weights(self)
        outputs = patch_conv2d(inputs, kernel, bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs
