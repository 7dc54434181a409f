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
        self._check_channels(input_shape)

    def _check_channels(self, shape):
        channels = shape[channel_axis_for(self.data_format)]
        if channels is not None and channels != len(self.mean):
            raise ValueError(
                f"ImageNormalization has statistics for {len(self.mean)} channels but the "
                f"input has {channels} (shape {tuple(shape)}, data_format={self.data_format})."
            )

    @property
    def input_dtype(self):
        """The dtype the arithmetic runs in: float32 under a 16-bit compute dtype.

        Pixels in [0, 255] minus the mean, times 1 / std, computed in bfloat16,
        round three times (the input, the difference, the product); in float32
        the result rounds once to the compute dtype.
        """
        compute = keras.backend.standardize_dtype(self.compute_dtype)
        return "float32" if compute in ("bfloat16", "float16") else compute

    def call(self, inputs):
        # Checked again per call: a built layer would otherwise broadcast one
        # channel against three, or fail inside a reshape.
        self._check_channels(inputs.shape)
        dtype = self.input_dtype
        x = ops.cast(inputs, dtype)
        mean = ops.convert_to_tensor(self.mean, dtype)
        inv_std = ops.convert_to_tensor([1.0 / s for s in self.std], dtype)
        width = x.shape[2]
        if self.data_format == "channels_last" and width is not None:
            # One row per image row, the statistics repeated along it: the same
            # values, but TensorFlow's kernels broadcast a long row much faster
            # than a 3-channel one when the batch size is unknown at tracing.
            rows = ops.reshape(x, (-1, width * len(self.mean)))
            rows = (rows - ops.tile(mean, [width])) * ops.tile(inv_std, [width])
            return ops.cast(ops.reshape(rows, ops.shape(x)), self.compute_dtype)
        shape = (1, 1, 1, -1) if self.data_format == "channels_last" else (1, -1, 1, 1)
        outputs = (x - ops.reshape(mean, shape)) * ops.reshape(inv_std, shape)
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mean": list(self.mean), "std": list(self.std), "data_format": self.data_format})
        return config
