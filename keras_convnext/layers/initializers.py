"""Weight initialization drawn on the host."""

import numpy as np

import keras


@keras.saving.register_keras_serializable(package="keras_convnext")
class HostTruncatedNormal(keras.initializers.Initializer):
    """Normal values redrawn beyond two standard deviations, drawn with numpy.

    The distribution of `keras.initializers.TruncatedNormal`, drawn on the
    host and handed to the backend as one array. Under JAX the backend's own
    random ops compile one XLA program per new weight shape (about 0.25 s
    each) and keep every executable in memory for the life of the process:
    building ConvNeXt V2 Tiny compiled 17 of them, took about 4 s more, and
    left about 100 MB resident that later inference counted as its own.

    Unseeded, each call draws from numpy's global generator, which
    `keras.utils.set_random_seed` seeds; with a `seed`, every call gives the
    same values (as Keras' seeded initializers do).

    Args:
        mean: mean of the values.
        stddev: standard deviation of the normal before truncation.
        seed: optional integer seed.
    """

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean = mean
        self.stddev = stddev
        self.seed = seed

    def __call__(self, shape, dtype=None):
        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        if self.seed is None:
            generator = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        else:
            generator = np.random.default_rng(self.seed)
        values = generator.standard_normal(tuple(shape))
        outside = np.abs(values) > 2.0
        while outside.any():
            values[outside] = generator.standard_normal(int(outside.sum()))
            outside = np.abs(values) > 2.0
        values = (self.mean + self.stddev * values).astype("float32")
        return keras.ops.convert_to_tensor(values, dtype=dtype)

    def get_config(self):
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}
