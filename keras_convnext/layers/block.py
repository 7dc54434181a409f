"""The ConvNeXt block, V1 (layer scale) and V2 (GRN) in one layer."""

import keras
from keras import ops

from keras_convnext.layers.data_format import standardize_data_format
from keras_convnext.layers.depthwise import DepthwiseConv
from keras_convnext.layers.drop_path import StochasticDepth
from keras_convnext.layers.grn import GRN
from keras_convnext.layers.initializers import HostTruncatedNormal
from keras_convnext.layers.layer_norm import LayerNorm
from keras_convnext.layers.layer_scale import LayerScale
from keras_convnext.layers.pointwise import PointwiseDense


def kernel_init():
    """Official ConvNeXt initialization: truncated normal, std 0.02 (biases start at zero).

    Drawn on the host (see `HostTruncatedNormal`); unseeded, so every layer
    gets its own values.
    """
    return HostTruncatedNormal(stddev=0.02)


LAYER_NORM_EPSILON = 1e-6


def layer_norm(name):
    return LayerNorm(epsilon=LAYER_NORM_EPSILON, name=name)


@keras.saving.register_keras_serializable(package="keras_convnext")
class ConvNeXtBlock(keras.layers.Layer):
    """Inverted-bottleneck residual block.

    `x + drop_path(scale(pwconv2(grn(gelu(pwconv1(norm(dwconv(x))))))))`, where
    the depthwise conv is `kernel_size` x `kernel_size`, `pwconv1` widens the
    channels by `mlp_ratio` and applies the exact GELU (its `activation`), GRN
    is present when `use_grn` (ConvNeXt V2) and the layer scale when
    `layer_scale_init_value` is not None (ConvNeXt V1).

    Input and output: `(batch, height, width, channels)`, or
    `(batch, channels, height, width)` with `data_format="channels_first"`
    (computed internally in channels_last; the weights are the same).
    Sublayers are public (`dwconv`, `norm`, `pwconv1`, `grn`, `pwconv2`,
    `layer_scale`, `drop_path`); absent ones are None.
    """

    def __init__(
        self,
        use_grn=True,
        layer_scale_init_value=None,
        drop_path_rate=0.0,
        kernel_size=7,
        mlp_ratio=4,
        data_format=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.use_grn = bool(use_grn)
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = float(drop_path_rate)
        self.kernel_size = int(kernel_size)
        self.mlp_ratio = int(mlp_ratio)
        self.data_format = standardize_data_format(data_format)
        self.dwconv = DepthwiseConv(
            kernel_size=self.kernel_size,
            depthwise_initializer=kernel_init(),
            name="dwconv",
            dtype=self.dtype_policy,
        )
        self.norm = LayerNorm(epsilon=LAYER_NORM_EPSILON, name="norm", dtype=self.dtype_policy)
        self.pwconv1 = None
        self.pwconv2 = None
        self.grn = GRN(data_format="channels_last", name="grn", dtype=self.dtype_policy) if self.use_grn else None
        self.layer_scale = None
        if layer_scale_init_value is not None and layer_scale_init_value > 0:
            self.layer_scale = LayerScale(
                layer_scale_init_value,
                data_format="channels_last",
                name="layer_scale",
                dtype=self.dtype_policy,
            )
        self.drop_path = None
        if self.drop_path_rate > 0:
            self.drop_path = StochasticDepth(
                self.drop_path_rate, name="drop_path", dtype=self.dtype_policy
            )

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"ConvNeXtBlock expects 4D inputs; got shape {input_shape}.")
        if self.data_format == "channels_first":
            input_shape = (input_shape[0], input_shape[2], input_shape[3], input_shape[1])
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("ConvNeXtBlock needs a known number of channels.")
        hidden = self.mlp_ratio * channels
        # GELU belongs to pwconv1, so that a backend can apply it as the product is written.
        self.pwconv1 = PointwiseDense(
            hidden, activation="gelu", kernel_initializer=kernel_init(), name="pwconv1", dtype=self.dtype_policy
        )
        self.pwconv2 = PointwiseDense(
            channels, kernel_initializer=kernel_init(), name="pwconv2", dtype=self.dtype_policy
        )
        hidden_shape = tuple(input_shape[:-1]) + (hidden,)
        self.dwconv.build(input_shape)
        self.norm.build(input_shape)
        self.pwconv1.build(input_shape)
        if self.grn is not None:
            self.grn.build(hidden_shape)
        self.pwconv2.build(hidden_shape)
        if self.layer_scale is not None:
            self.layer_scale.build(input_shape)
        if self.drop_path is not None:
            # No weights, but it must count as built: Keras' JAX `predict` and
            # `predict_on_batch` otherwise run the whole model eagerly, one
            # compiled operation at a time, to build it, on every call
            # (benchmarks/README.md, item 35).
            self.drop_path.build(input_shape)

    def residual_branch(self, x, training=None):
        """The block without its shortcut; channels_last in and out.

        The sublayers are built in `build` and share this block's dtype policy,
        so their `call` runs directly: `Layer.__call__` would redo per sublayer
        what this block's own call already did (input casting, autocast scope,
        training flag), which in PyTorch's eager mode costs about 0.1 ms each,
        over 10% of a batch-1 forward pass of V2 Tiny.
        """
        x = self.dwconv.call(x)
        if self.grn is None:
            return self.project(self.expand(x), training)
        # GRN and pwconv2 in one call, which a backend may fold into one product.
        x = self.pwconv2.call_after_grn(self.pwconv1.call(self.norm.call(x)), self.grn)
        return self.scale_and_drop(x, training)

    def expand(self, x):
        """LayerNorm, the widening Linear, GELU and GRN: the branch after the depthwise conv.

        Per position, except for GRN's statistics, which sum over axes 1 and
        2: a `(batch, positions, 1, channels)` map of gathered positions (the
        FCMAE fast path) gets GRN over those positions.
        """
        x = self.pwconv1.call(self.norm.call(x))
        return x if self.grn is None else self.grn.call(x)

    def project(self, x, training=None):
        """The narrowing Linear, layer scale and stochastic depth: the end of the branch.

        Per position, so it takes any rank with channels last.
        """
        return self.scale_and_drop(self.pwconv2.call(x), training)

    def scale_and_drop(self, x, training=None):
        """Layer scale and stochastic depth, where present; any rank with channels last."""
        if self.layer_scale is not None:
            x = self.layer_scale.call(x)
        if self.drop_path is not None:
            x = self.drop_path.call(x, training=training)
        return x

    def call(self, inputs, training=None):
        if self.data_format == "channels_first":
            x = ops.transpose(inputs, (0, 2, 3, 1))
            return inputs + ops.transpose(self.residual_branch(x, training), (0, 3, 1, 2))
        return inputs + self.residual_branch(inputs, training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "use_grn": self.use_grn,
                "layer_scale_init_value": self.layer_scale_init_value,
                "drop_path_rate": self.drop_path_rate,
                "kernel_size": self.kernel_size,
                "mlp_ratio": self.mlp_ratio,
                "data_format": self.data_format,
            }
        )
        return config
