"""Stochastic depth (Huang et al. 2016): drop whole residual branches per sample."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_convnext")
class StochasticDepth(keras.layers.Layer):
    """Zeroes the residual branch of each sample with probability `rate`.

    Kept samples are scaled by `1 / (1 - rate)` so the expected value is
    unchanged; at inference (`training=False`) the layer is the identity.
    Input: any shape whose first axis is the batch.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"StochasticDepth rate must be in [0, 1); got {rate}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep_prob = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=inputs.dtype)
        keep = ops.floor(keep_prob + noise)
        return inputs / ops.cast(keep_prob, inputs.dtype) * keep

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"rate": self.rate, "seed": self.seed})
        return config
