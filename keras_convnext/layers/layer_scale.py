"""Per-channel learnable residual scaling (CaiT; ConvNeXt V1 blocks)."""

import keras
from keras import ops

from keras_convnext.layers.compute_dtype import in_compute_dtype
from keras_convnext.layers.data_format import channel_axis_for, standardize_data_format


@keras.saving.register_keras_serializable(package="keras_convnext")
class LayerScale(keras.layers.Layer):
    """Multiplies each channel by a learned scale `gamma`, shape `(channels,)`.

    `init_value` is the starting value of every scale (ConvNeXt V1 uses 1e-6,
    so a fresh block starts close to the identity).
    """

    def __init__(self, init_value=1e-6, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)
        self.data_format = standardize_data_format(data_format)

    def build(self, input_shape):
        channels = input_shape[channel_axis_for(self.data_format)]
        self.gamma = self.add_weight(
            name="gamma",
            shape=(channels,),
            initializer=keras.initializers.Constant(self.init_value),
        )

    def call(self, inputs):
        gamma = in_compute_dtype(self.gamma, keras.backend.standardize_dtype(inputs.dtype))
        if self.data_format == "channels_first" and len(inputs.shape) == 4:
            gamma = ops.reshape(gamma, (1, -1, 1, 1))
        return inputs * gamma

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"init_value": self.init_value, "data_format": self.data_format})
        return config
