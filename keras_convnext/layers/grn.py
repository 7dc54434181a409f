"""Global Response Normalization (ConvNeXt V2, Woo et al. 2023, eqs. 1-3)."""

import keras
from keras import ops

from keras_convnext.layers.compute_dtype import in_dtype, weight_value
from keras_convnext.layers.data_format import channel_axis_for, standardize_data_format
from keras_convnext.ops import grn


@keras.saving.register_keras_serializable(package="keras_convnext")
class GRN(keras.layers.Layer):
    """Global Response Normalization.

    `y = x + gamma * (x * Nx) + beta`, with `Gx = ||x||_2` over the spatial
    axes per sample and channel, and `Nx = Gx / (mean_channels(Gx) + epsilon)`;
    defined in `keras_convnext.ops.portable.grn`, computed through
    `keras_convnext.ops.grn`.

    Input and output: `(batch, height, width, channels)` for channels_last,
    `(batch, channels, height, width)` for channels_first. `gamma` and `beta`
    have shape `(channels,)` and start at zero, so a fresh GRN is the identity.
    The norms are computed in float32 whatever the compute dtype (a float16
    sum of squares over a 56x56 map overflows); the full-size scale-and-shift
    runs in the compute dtype.
    """

    def __init__(self, epsilon=1e-6, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.data_format = standardize_data_format(data_format)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"GRN expects 4D inputs (batch, height, width, channels); got shape {input_shape}."
            )
        channels = input_shape[channel_axis_for(self.data_format)]
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="zeros")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

    def call(self, inputs):
        x = in_dtype(inputs, self.compute_dtype)
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        outputs = grn(x, weight_value(self.gamma), weight_value(self.beta), self.epsilon)
        if self.data_format == "channels_first":
            outputs = ops.transpose(outputs, (0, 3, 1, 2))
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon, "data_format": self.data_format})
        return config
