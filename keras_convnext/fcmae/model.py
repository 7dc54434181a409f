"""FCMAE: masked-autoencoder pre-training of ConvNeXt V2 as a `keras.Model`."""

import keras
from keras import ops

from keras_convnext.fcmae import encoder as sparse
from keras_convnext.fcmae.decoder import FCMAEDecoder
from keras_convnext.fcmae.loss import (
    NORM_PIX_EPSILON,
    gathered_patch_loss,
    masked_patch_loss,
    patch_targets,
    patchify,
    unpatchify,
)
from keras_convnext.fcmae.masking import VisiblePositions, random_patch_mask, visible_count
from keras_convnext.models.convnext import CONSTRUCTORS


def _build_encoder(encoder, input_shape, drop_path_rate):
    if isinstance(encoder, str):
        if encoder not in CONSTRUCTORS or not encoder.startswith("ConvNeXtV2"):
            names = ", ".join(name for name in CONSTRUCTORS if name.startswith("ConvNeXtV2"))
            raise ValueError(f"Unknown FCMAE encoder {encoder!r}; use one of {names}, or a built model.")
        return CONSTRUCTORS[encoder](include_top=False, input_shape=input_shape, drop_path_rate=drop_path_rate)
    if isinstance(encoder, dict):
        return keras.saving.deserialize_keras_object(encoder)
    if not isinstance(encoder, keras.Model):
        raise TypeError(
            f"encoder must be a constructor name such as 'ConvNeXtV2Atto' or a built "
            f"keras_convnext ConvNeXt V2 model; got {type(encoder).__name__}."
        )
    return encoder


def _check_shapes(encoder, input_shape, patch_size, mask_ratio, channels_first):
    if patch_size != sparse.ENCODER_STRIDE:
        raise ValueError(
            f"patch_size must be {sparse.ENCODER_STRIDE}, the total stride of the ConvNeXt "
            f"encoder, so that each patch is one position of its output; got {patch_size}."
        )
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}.")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels); got {input_shape}.")
    height, width = (input_shape[1], input_shape[2]) if channels_first else (input_shape[0], input_shape[1])
    if height is None or width is None or height % patch_size or width % patch_size:
        raise ValueError(
            f"FCMAE masks square patches of {patch_size} pixels, so the image height and width "
            f"must be multiples of {patch_size}; got input_shape={tuple(input_shape)}. Resize or "
            f"crop the images, for example to {max(1, round((height or 224) / patch_size)) * patch_size} pixels."
        )
    fixed = tuple(encoder.input_shape[1:])
    if any(a is not None and a != b for a, b in zip(fixed, input_shape)):
        raise ValueError(
            f"The encoder '{encoder.name}' was built for inputs {fixed}, but FCMAE got "
            f"input_shape={tuple(input_shape)}; build the encoder with the same input_shape "
            "(or with input_shape=None)."
        )
    return height // patch_size, width // patch_size


@keras.saving.register_keras_serializable(package="keras_convnext")
class FCMAE(keras.Model):
    """Fully convolutional masked autoencoder (ConvNeXt V2, Woo et al. 2023).

    Each image is cut into `patch_size` x `patch_size` patches; a random
    `mask_ratio` of them is masked per image, the encoder sees only the
    visible ones (sparse-convolution semantics, see `keras_convnext.fcmae.encoder`)
    and the decoder predicts the pixels of the masked ones. Train with
    `model.compile(optimizer=...)` and `model.fit(images)`: no labels, no loss
    argument.

    Args:
        encoder: a ConvNeXt V2 constructor name (`"ConvNeXtV2Atto"`) or a
            built backbone (`keras_convnext.ConvNeXtV2Atto(include_top=False)`).
        input_shape: `(height, width, 3)`, sides multiples of `patch_size`.
            With an encoder that has preprocessing (the default), images are
            RGB pixels in [0, 255] and the reconstruction target is the
            normalized image, as in the official recipe.
        mask_ratio: fraction of patches masked per image; exactly
            `int(L * (1 - mask_ratio))` of the `L` patches stay visible.
        patch_size: mask patch side in pixels; the encoder's stride, 32.
        decoder_dim, decoder_depth: width and number of the decoder's ConvNeXt V2 blocks.
        norm_pix_loss: targets are each patch standardized by its own mean
            and variance (epsilon 1e-6).
        drop_path_rate: stochastic depth of an encoder built by name.
        fast_path: run the pointwise layers on gathered visible positions
            only (same result as the dense masked path, faster).
        seed: seed of the mask generator, for reproducible runs.
        weights: optional official FCMAE checkpoint (`convnextv2_*_fcmae.pt`)
            to load, encoder and decoder.

    Calling the model returns a dict: `loss` `(batch,)`, the per-image masked
    loss; `pred` `(batch, gh, gw, patch_size**2 * 3)`, the predicted patches
    (`keras_convnext.fcmae.unpatchify` turns them into images); `mask`
    `(batch, gh, gw)`, 1 = masked. In training on the fast path the decoder
    predicts only the masked patches, which are all the loss uses, and the
    visible ones are 0 in `pred`.
    """

    def __init__(
        self,
        encoder="ConvNeXtV2Atto",
        input_shape=(224, 224, 3),
        mask_ratio=0.6,
        patch_size=32,
        decoder_dim=512,
        decoder_depth=1,
        norm_pix_loss=False,
        drop_path_rate=0.0,
        fast_path=True,
        seed=None,
        weights=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.encoder_spec = encoder if isinstance(encoder, str) else None
        self.encoder = _build_encoder(encoder, tuple(input_shape), drop_path_rate)
        self.encoder_layers = sparse.find_encoder_layers(self.encoder)
        self.image_shape = tuple(input_shape)
        self.mask_ratio = float(mask_ratio)
        self.patch_size = int(patch_size)
        self.grid_shape = _check_shapes(
            self.encoder, self.image_shape, self.patch_size, self.mask_ratio,
            self.encoder_layers.channels_first,
        )
        self.decoder_dim = int(decoder_dim)
        self.decoder_depth = int(decoder_depth)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.drop_path_rate = float(drop_path_rate)
        self.fast_path = bool(fast_path)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        channels = self.image_shape[0] if self.encoder_layers.channels_first else self.image_shape[-1]
        self.decoder = FCMAEDecoder(
            decoder_dim, decoder_depth, patch_size, channels, name="decoder", dtype=self.dtype_policy
        )
        self.build((None,) + self.image_shape)
        if weights is not None:
            self.load_checkpoint(weights)

    @property
    def num_visible(self):
        """Visible patches per image."""
        return visible_count(self.grid_shape[0] * self.grid_shape[1], self.mask_ratio)

    def build(self, input_shape=None):
        if not self.decoder.built:
            encoder_dim = self.encoder_layers.stages[-1][-1].pwconv2.units
            self.decoder.build((None, *self.grid_shape, encoder_dim), (None, *self.grid_shape))
        self.built = True

    def random_mask(self, batch_size):
        """A fresh patch mask `(batch, gh, gw)` (1 = masked) from the model's seed generator."""
        return random_patch_mask(batch_size, self.grid_shape, self.mask_ratio, seed=self.seed_generator)

    def encode(self, images, patch_mask, training=None, fast_path=None):
        """Encoder features `(batch, gh, gw, dims[-1])` of the visible patches, zero elsewhere."""
        x = sparse.prepare_images(self.encoder_layers, images)
        if self.fast_path if fast_path is None else fast_path:
            return sparse.fast_forward(
                self.encoder_layers, x, patch_mask, self.patch_size, self.mask_ratio, training
            )
        return sparse.dense_masked_forward(self.encoder_layers, x, patch_mask, self.patch_size, training)

    def reconstruction_targets(self, images):
        """Per-patch targets `(batch, gh, gw, patch_size**2 * 3)` in float32."""
        x = ops.cast(sparse.prepare_images(self.encoder_layers, images), "float32")
        return patch_targets(x, self.patch_size, self.norm_pix_loss)

    def reconstruct(self, images, patch_mask=None):
        """Images as the encoder sees them and as the model rebuilds them.

        Returns numpy arrays: `images` and `reconstruction`, both normalized
        (the encoder's preprocessing), `(batch, H, W, 3)` channels_last, and
        `mask` `(batch, gh, gw)`. With `norm_pix_loss` the predicted patches
        are given back the mean and variance of the original patches, the
        usual way to look at such reconstructions.
        """
        outputs = self(images, patch_mask=patch_mask)
        pred = ops.cast(outputs["pred"], "float32")
        normalized = ops.cast(sparse.prepare_images(self.encoder_layers, images), "float32")
        if self.norm_pix_loss:
            patches = patchify(normalized, self.patch_size)
            mean = ops.mean(patches, axis=-1, keepdims=True)
            count = patches.shape[-1]
            variance = ops.sum(ops.square(patches - mean), axis=-1, keepdims=True) / (count - 1)
            pred = pred * ops.sqrt(variance + NORM_PIX_EPSILON) + mean
        return {
            "images": ops.convert_to_numpy(normalized),
            "reconstruction": ops.convert_to_numpy(unpatchify(pred, self.patch_size, normalized.shape[-1])),
            "mask": ops.convert_to_numpy(outputs["mask"]),
        }

    def call(self, images, training=None, patch_mask=None, fast_path=None):
        if patch_mask is None:
            patch_mask = self.random_mask(ops.shape(images)[0])
        patch_mask = ops.cast(patch_mask, "float32")
        fast_path = self.fast_path if fast_path is None else fast_path
        features = self.encode(images, patch_mask, training=training, fast_path=fast_path)
        targets = self.reconstruction_targets(images)
        num_patches = self.grid_shape[0] * self.grid_shape[1]
        if not (fast_path and training) or self.num_visible == num_patches:
            pred = self.decoder(features, patch_mask)
            return {"loss": masked_patch_loss(pred, targets, patch_mask), "pred": pred, "mask": patch_mask}
        # Training on the fast path: the loss needs the masked patches only,
        # so the decoder predicts just those; visible patches stay 0 in `pred`.
        masked = VisiblePositions(1.0 - patch_mask, num_patches - self.num_visible)
        tokens = self.decoder.predict_patches(features, patch_mask, masked)
        loss = gathered_patch_loss(tokens, masked.gather(targets))
        pred = ops.stop_gradient(masked.scatter(tokens))
        return {"loss": loss, "pred": pred, "mask": patch_mask}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The mean masked reconstruction loss (labels `y` are not used)."""
        loss = ops.mean(y_pred["loss"])
        for extra in self.losses:
            loss = loss + ops.cast(extra, loss.dtype)
        return loss

    def load_checkpoint(self, source):
        """Loads an official FCMAE checkpoint (encoder, decoder, mask token); all or nothing."""
        from keras_convnext.fcmae.checkpoint import load_fcmae_checkpoint

        return load_fcmae_checkpoint(self, source)

    def get_config(self):
        config = super().get_config()
        encoder = self.encoder_spec or keras.saving.serialize_keras_object(self.encoder)
        config.update(
            {
                "encoder": encoder,
                "input_shape": list(self.image_shape),
                "mask_ratio": self.mask_ratio,
                "patch_size": self.patch_size,
                "decoder_dim": self.decoder_dim,
                "decoder_depth": self.decoder_depth,
                "norm_pix_loss": self.norm_pix_loss,
                "drop_path_rate": self.drop_path_rate,
                "fast_path": self.fast_path,
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def transfer_encoder(fcmae, classifier):
    """Copies a pre-trained FCMAE encoder into a ConvNeXt V2 model of the same size.

    `classifier` is built by the matching constructor (for example
    `keras_convnext.ConvNeXtV2Atto(classes=10)`); its head (`head_norm`,
    `predictions`) keeps its fresh initialization, as in the official
    fine-tuning recipe. All or nothing: on any mismatch nothing is copied.
    Returns `classifier`.
    """
    source = {variable.path: variable for variable in fcmae.encoder.weights}
    target = {
        variable.path: variable
        for variable in classifier.weights
        if not variable.path.startswith(("head_norm/", "predictions/"))
    }
    missing = sorted(set(target) - set(source))
    extra = sorted(set(source) - set(target))
    shapes = [
        f"{path}: encoder {tuple(source[path].shape)}, model {tuple(target[path].shape)}"
        for path in sorted(set(source) & set(target))
        if tuple(source[path].shape) != tuple(target[path].shape)
    ]
    if missing or extra or shapes:
        raise ValueError(
            f"The FCMAE encoder '{fcmae.encoder.name}' does not match '{classifier.name}'; nothing "
            f"was copied. Missing in the encoder: {missing or 'none'}; not in the model: "
            f"{extra or 'none'}; shape mismatches: {shapes or 'none'}. Build the classifier "
            "with the same constructor as the encoder."
        )
    for path, variable in target.items():
        variable.assign(ops.cast(source[path].value, variable.dtype))
    return classifier
