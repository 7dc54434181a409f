"""ImageNet input normalization as a model layer."""

import keras
from keras import ops

from keras_convnext.layers.data_format import channel_axis_for, standardize_data_format

# ImageNet channel statistics in pixel units ([0, 255]), RGB order.
IMAGENET_MEAN = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
IMAGENET_STD = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)


@keras.saving.register_keras_serializable(package="keras_convnext")
class ImageNormalization(keras.layers.Layer):
    """`(x - mean) / std` per channel; defaults take RGB pixels in [0, 255].

    Input: `(batch, height, width, channels)` (channels_last) or
    `(batch, channels, height, width)` (channels_first).
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, data_format=None, **kwargs):
        super().__init__(**kwargs)
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel; got {mean} and {std}.")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.data_format = standardize_data_format(data_format)

    def build(self, input_shape):
        channels = input_shape[channel_axis_for(self.data_format)]
        if channels is not None and channels != len(self.mean):
            raise ValueError(
                f"ImageNormalization has statistics for {len(self.mean)} channels but the "
                f"input has {channels} (shape {input_shape}, data_format={self.data_format})."
            )

    def call(self, inputs):
        shape = (1, 1, 1, -1) if self.data_format == "channels_last" else (1, -1, 1, 1)
        x = ops.cast(inputs, self.compute_dtype)
        mean = ops.reshape(ops.convert_to_tensor(self.mean, self.compute_dtype), shape)
        inv_std = ops.reshape(
            ops.convert_to_tensor([1.0 / s for s in self.std], self.compute_dtype), shape
        )
        return (x - mean) * inv_std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mean": list(self.mean), "std": list(self.std), "data_format": self.data_format})
        return config
