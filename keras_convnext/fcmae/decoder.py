"""The FCMAE decoder: a light ConvNeXt V2 head that predicts masked patches."""

import numbers

import keras
from keras import ops

from keras_convnext.layers.block import ConvNeXtBlock, kernel_init
from keras_convnext.ops import linear


@keras.saving.register_keras_serializable(package="keras_convnext")
class FCMAEDecoder(keras.layers.Layer):
    """1x1 projection, mask token, ConvNeXt V2 blocks, 1x1 pixel prediction.

    Input: encoder features `(batch, gh, gw, encoder_dim)` (one position per
    patch, zero at masked patches) and the patch mask `(batch, gh, gw)`,
    1 = masked. Output: `(batch, gh, gw, patch_size**2 * channels)`, the
    predicted pixels of each patch in (row, column, channel) order.

    Sublayers are public: `proj`, `blocks` (a list), `pred`; the learned
    mask token is `mask_token`, shape `(decoder_dim,)`.
    """

    def __init__(self, decoder_dim=512, decoder_depth=1, patch_size=32, channels=3, **kwargs):
        for name, value, least in (
            ("decoder_dim", decoder_dim, 1), ("decoder_depth", decoder_depth, 0),
            ("patch_size", patch_size, 1), ("channels", channels, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be an integer of at least {least}; got {value!r}.")
        super().__init__(**kwargs)
        self.decoder_dim = int(decoder_dim)
        self.decoder_depth = int(decoder_depth)
        self.patch_size = int(patch_size)
        self.channels = int(channels)
        self.proj = keras.layers.Conv2D(
            self.decoder_dim, 1, kernel_initializer=kernel_init(), name="proj", dtype=self.dtype_policy
        )
        self.blocks = [
            ConvNeXtBlock(use_grn=True, data_format="channels_last", name=f"block{j}", dtype=self.dtype_policy)
            for j in range(self.decoder_depth)
        ]
        self.pred = keras.layers.Conv2D(
            self.patch_size**2 * self.channels, 1, kernel_initializer=kernel_init(),
            name="pred", dtype=self.dtype_policy,
        )

    def build(self, features_shape, mask_shape=None):
        self.mask_token = self.add_weight(
            name="mask_token",
            shape=(self.decoder_dim,),
            initializer=kernel_init(),
        )
        self.proj.build(features_shape)
        hidden_shape = tuple(features_shape[:-1]) + (self.decoder_dim,)
        for block in self.blocks:
            block.build(hidden_shape)
        self.pred.build(hidden_shape)

    def call(self, features, patch_mask):
        x = self._input_map(features, patch_mask)
        for block in self.blocks:
            x = block(x)
        return self._pointwise(self.pred, x)

    def predict_patches(self, features, patch_mask, positions):
        """The prediction at the given patches only, `(batch, positions.count, p*p*C)`.

        `positions` (a `keras_convnext.fcmae.masking.VisiblePositions`) lists
        the patches the loss needs, the masked ones in training. Everything up
        to the last block's GRN runs on the whole grid (the depthwise conv
        mixes neighbours and GRN's statistics cover every position); the last
        block's second Linear, its residual and the prediction, two thirds of
        the decoder's multiply-adds at decoder width 512, run on those patches
        alone. Same values as gathering `call`'s output (tested).
        """
        x = self._input_map(features, patch_mask)
        if not self.blocks:
            return self._pointwise(self.pred, positions.gather(x))
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        branch = positions.gather(last.expand(last.dwconv.call(x)))
        tokens = positions.gather(x) + last.project(branch)
        return self._pointwise(self.pred, tokens)

    def _input_map(self, features, patch_mask):
        x = self._pointwise(self.proj, features)
        masked = ops.expand_dims(ops.cast(patch_mask, x.dtype), -1)
        token = ops.cast(self.mask_token, x.dtype)
        return x * (1.0 - masked) + token * masked

    def _pointwise(self, conv, x):
        # A 1x1 convolution is a Linear layer over the channels; `linear` is
        # its fastest formulation per backend and also takes gathered tokens.
        kernel = ops.cast(conv.kernel, conv.compute_dtype)
        kernel = ops.reshape(kernel, kernel.shape[2:])
        bias = ops.cast(conv.bias, conv.compute_dtype) if conv.use_bias else None
        return linear(ops.cast(x, conv.compute_dtype), kernel, bias)

    def named_weights(self):
        """`{name: variable}` with names like `proj/kernel`, `block0/grn/gamma`, `mask_token`."""
        named = {"mask_token": self.mask_token}
        for layer in [self.proj, self.pred, *self.blocks]:
            for sublayer, variables in _layer_variables(layer):
                for variable in variables:
                    named[f"{layer.name}/{sublayer}{variable.name}"] = variable
        return named

    def compute_output_shape(self, features_shape, mask_shape=None):
        return tuple(features_shape[:-1]) + (self.patch_size**2 * self.channels,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "decoder_dim": self.decoder_dim,
                "decoder_depth": self.decoder_depth,
                "patch_size": self.patch_size,
                "channels": self.channels,
            }
        )
        return config


def _layer_variables(layer):
    if isinstance(layer, ConvNeXtBlock):
        for name in ("dwconv", "norm", "pwconv1", "grn", "pwconv2"):
            yield f"{name}/", getattr(layer, name).weights
    else:
        yield "", layer.weights
