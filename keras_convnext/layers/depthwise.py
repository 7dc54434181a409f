"""Depthwise convolution used by the ConvNeXt blocks."""

import keras


@keras.saving.register_keras_serializable(package="keras_convnext")
class DepthwiseConv(keras.layers.DepthwiseConv2D):
    """A channels_last depthwise 2D convolution, stride 1, "same" padding.

    Same weights as `keras.layers.DepthwiseConv2D`: `kernel` of shape
    `(k, k, channels, 1)` and `bias` of shape `(channels,)`.
    """

    def __init__(self, kernel_size=7, **kwargs):
        kwargs.setdefault("padding", "same")
        kwargs.setdefault("data_format", "channels_last")
        super().__init__(kernel_size=kernel_size, **kwargs)
