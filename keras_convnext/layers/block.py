"""The ConvNeXt block, V1 (layer scale) and V2 (GRN) in one layer."""

import keras
from keras import ops

from keras_convnext.layers.compute_dtype import weight_value
from keras_convnext.layers.data_format import standardize_data_format
from keras_convnext.layers.depthwise import DepthwiseConv
from keras_convnext.layers.drop_path import StochasticDepth
from keras_convnext.layers.grn import GRN
from keras_convnext.layers.initializers import HostTruncatedNormal
from keras_convnext.layers.layer_norm import LayerNorm
from keras_convnext.layers.layer_scale import LayerScale
from keras_convnext.layers.pointwise import PointwiseDense
from keras_convnext.ops import folded_grn_linear, platform


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

    `x + drop_path(scale(pwconv2(grn(gelu(pwconv1(norm(dwconv(x))))))))`
    (`call`, in two parts: `spatial_part`, then `pointwise_part`), where
    the depthwise conv is `kernel_size` x `kernel_size`, `pwconv1` widens the
    channels by `mlp_ratio` and applies the exact GELU (its `activation`), GRN
    is present when `use_grn` (ConvNeXt V2) and the layer scale when
    `layer_scale_init_value` is not None (ConvNeXt V1).

    Input and output: `(batch, height, width, channels)`, or
    `(batch, channels, height, width)` with `data_format="channels_first"`
    (computed internally in channels_last; the weights are the same).
    Sublayers are public (`dwconv`, `norm`, `pwconv1`, `grn`, `pwconv2`,
    `layer_scale`, `drop_path`); absent ones are None.

    `remat=True` (gradient checkpointing) keeps only the block's input for
    the backward pass and computes the residual branch again there, through
    `keras.remat`: `jax.checkpoint` on JAX, `tf.recompute_grad` on
    TensorFlow, `torch.utils.checkpoint` on PyTorch. Less memory in training
    for one more forward pass of each block; the same outputs and gradients.
    Stochastic depth stays outside the recomputed part, so its random draw
    is made once.
    """

    def __init__(
        self,
        use_grn=True,
        layer_scale_init_value=None,
        drop_path_rate=0.0,
        kernel_size=7,
        mlp_ratio=4,
        data_format=None,
        remat=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.remat = bool(remat)
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
            # compiled operation at a time, to build it, on every call.
            self.drop_path.build(input_shape)

    def call(self, inputs, training=None):
        x = ops.transpose(inputs, (0, 2, 3, 1)) if self.data_format == "channels_first" else inputs
        if self.remat:
            branch = self.rematerialized_branch(x)
            if self.drop_path is not None:
                branch = self.drop_path.call(branch, training=training)
        else:
            branch = self.pointwise_part(self.spatial_part(x), training)
        if self.data_format == "channels_first":
            branch = ops.transpose(branch, (0, 3, 1, 2))
        return inputs + branch

    def rematerialized_branch(self, x):
        """The residual branch before stochastic depth, recomputed in the backward pass (`keras.remat`).

        Channels last, `(batch, height, width, channels)` in and out.
        """
        scope = platform.current_autocast_scope()
        dtype = None if scope is None else scope.dtype

        def branch(x):
            # TensorFlow and PyTorch run this again during the backward pass,
            # outside the autocast scope of this call: enter the same one.
            with platform.autocast_scope(dtype):
                return self.pointwise_part(self.spatial_part(x))

        return keras.remat(branch)(x)

    # The sublayers are built in `build` and share this block's dtype policy,
    # so their `call` runs directly: `Layer.__call__` would redo per sublayer
    # what this block's own call already did (input casting, autocast scope,
    # training flag), which in PyTorch's eager mode is a noticeable part of a
    # small batch's time.

    def spatial_part(self, x, visible=None):
        """The depthwise convolution, channels_last `(batch, height, width, channels)` in and out.

        `visible` (`(batch, height, width, 1)`, 1 where visible, 0 where masked),
        if given, zeroes the masked positions of the result (FCMAE's sparse
        semantics on a dense map).
        """
        x = self.dwconv.call(x)
        return x if visible is None else x * visible

    def pointwise_part(self, x, training=None, visible=None):
        """The rest of the residual branch, per position except for GRN's statistics.

        LayerNorm, the widening Linear with the exact GELU, GRN (V2), the
        narrowing Linear, layer scale (V1) and stochastic depth. Channels last;
        GRN sums over axes 1 and 2, so a `(batch, positions, 1, channels)` map
        of gathered positions (the FCMAE fast path) gets GRN over those
        positions. `visible` (broadcastable to `x[..., :1]`, 1 where visible)
        zeroes masked positions before GRN's statistics and in the result.
        """
        x = self.norm.call(x)
        x = self.pwconv1.call(x)  # with its GELU, which a backend may apply as the product is written
        if self.grn is None:
            x = self.pwconv2.call(x)
        else:
            if visible is not None:
                x = x * visible  # GRN's norms over the visible positions only
            x = self.grn_then_pwconv2(x)
        if visible is not None:
            x = x * visible
        if self.layer_scale is not None:
            x = self.layer_scale.call(x)
        if self.drop_path is not None:
            x = self.drop_path.call(x, training=training)
        return x

    def grn_then_pwconv2(self, x):
        """`pwconv2(grn(x))`: one product with GRN folded in where the fast paths and the
        platform allow (`keras_convnext.ops.grn_linear`), else the two layers' own calls."""
        if self.pwconv2.computes_own_product and platform.grn_fold_applies(x, self.pwconv2.kernel):
            kernel, bias = self.pwconv2.product_weights()
            gamma, beta = weight_value(self.grn.gamma), weight_value(self.grn.beta)
            return folded_grn_linear(x, gamma, beta, kernel, bias, self.grn.epsilon)
        return self.pwconv2.call(self.grn.call(x))

    def expand(self, x):
        """`pointwise_part` up to GRN: LayerNorm, the widening Linear with GELU, and GRN.

        With `project`, the two halves of `pointwise_part` for a caller that
        gathers positions between GRN's statistics and the narrowing Linear
        (the FCMAE decoder's prediction at the masked patches).
        """
        x = self.pwconv1.call(self.norm.call(x))
        return x if self.grn is None else self.grn.call(x)

    def project(self, x, training=None):
        """`pointwise_part` after GRN: the narrowing Linear, layer scale and stochastic depth."""
        x = self.pwconv2.call(x)
        if self.layer_scale is not None:
            x = self.layer_scale.call(x)
        if self.drop_path is not None:
            x = self.drop_path.call(x, training=training)
        return x

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
                "remat": self.remat,
            }
        )
        return config
