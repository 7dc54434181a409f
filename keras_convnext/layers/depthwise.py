"""Depthwise convolution used by the ConvNeXt blocks."""

import keras

from keras_convnext.layers.compute_dtype import compute_weights
from keras_convnext.ops import depthwise_conv2d


@keras.saving.register_keras_serializable(package="keras_convnext")
class DepthwiseConv(keras.layers.DepthwiseConv2D):
    """A channels_last depthwise 2D convolution, stride 1, "same" padding.

    Same weights as `keras.layers.DepthwiseConv2D`: `kernel` of shape
    `(k, k, channels, 1)` and `bias` of shape `(channels,)`. The computation
    goes through `keras_convnext.ops.depthwise_conv2d`, the fastest
    formulation for the running backend.
    """

    def __init__(self, kernel_size=7, **kwargs):
        kwargs.setdefault("padding", "same")
        kwargs.setdefault("data_format", "channels_last")
        super().__init__(kernel_size=kernel_size, **kwargs)
        if (
            self.strides != (1, 1)
            or self.padding != "same"
            or self.data_format != "channels_last"
            or self.depth_multiplier != 1
            or self.dilation_rate != (1, 1)
            or self.kernel_size[0] != self.kernel_size[1]
            or self.kernel_size[0] % 2 == 0
        ):
            raise ValueError(
                "DepthwiseConv supports stride 1, dilation 1, 'same' padding, channels_last, "
                f"depth_multiplier 1 and odd square kernels; got strides {self.strides}, dilation "
                f"{self.dilation_rate}, padding {self.padding!r}, {self.data_format}, depth_multiplier "
                f"{self.depth_multiplier}, kernel {self.kernel_size}."
            )

    def call(self, inputs):
        kernel, bias = compute_weights(self)
        outputs = depthwise_conv2d(inputs, kernel, bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs
