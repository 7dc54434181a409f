"""FCMAE: masked-autoencoder pre-training of ConvNeXt V2 (or V1) as a `keras.Model`."""

import os

import keras
import numpy as np
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
from keras_convnext.models.convnext import CONSTRUCTORS, _is_integer
from keras_convnext.models.inputs import build_training_state, check_images


def _build_encoder(encoder, input_shape, drop_path_rate):
    if isinstance(encoder, str):
        if encoder not in CONSTRUCTORS:
            names = ", ".join(CONSTRUCTORS)
            raise ValueError(f"Unknown FCMAE encoder {encoder!r}; use one of {names}, or a built model.")
        return CONSTRUCTORS[encoder](include_top=False, input_shape=input_shape, drop_path_rate=drop_path_rate)
    if isinstance(encoder, dict):
        return keras.saving.deserialize_keras_object(encoder)
    if not isinstance(encoder, keras.Model):
        raise TypeError(
            f"encoder must be a constructor name such as 'ConvNeXtV2Atto' or a built "
            f"keras_convnext ConvNeXt V1 or V2 model; got {type(encoder).__name__}."
        )
    return encoder


def _check_shapes(encoder, input_shape, patch_size, mask_ratio, channels_first):
    if patch_size != sparse.ENCODER_STRIDE:
        raise ValueError(
            f"patch_size must be {sparse.ENCODER_STRIDE}, the total stride of the ConvNeXt "
            f"encoder, so that each patch is one position of its output; got {patch_size}."
        )
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


def _check_mask_ratio(mask_ratio):
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float, np.number)):
        raise TypeError(f"mask_ratio must be a number in (0, 1); got {mask_ratio!r}.")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(
            f"mask_ratio must be in (0, 1), the fraction of patches masked per image (the official "
            f"recipe uses 0.6); got {mask_ratio}. At 0 no patch is masked and the loss is always 0; "
            "at 1 the encoder sees nothing."
        )
    return float(mask_ratio)


def _check_patch_counts(grid_shape, mask_ratio):
    """Refuses a grid and ratio that leave no visible or no masked patch."""
    num_patches = grid_shape[0] * grid_shape[1]
    visible = visible_count(num_patches, mask_ratio)
    if 0 < visible < num_patches:
        return
    which = "no patch visible to the encoder" if visible == 0 else "no patch masked, so the loss is always 0"
    raise ValueError(
        f"mask_ratio={mask_ratio} over a grid of {grid_shape[0]}x{grid_shape[1]} patches leaves {which} "
        f"(int({num_patches} * (1 - {mask_ratio})) = {visible} of {num_patches} patches visible). Use larger "
        "images (64x64 pixels or more give at least 4 patches) or another mask_ratio."
    )


def _concrete(tensor):
    """`tensor` as a numpy array when its values are known now, else None (inside a traced function)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    try:
        return ops.convert_to_numpy(tensor)
    except Exception:  # a JAX tracer or a symbolic TensorFlow tensor: values known only at run time
        return None


def _variant_of(encoder_spec, encoder):
    if encoder_spec is not None:
        return encoder_spec
    by_model_name = {name.lower(): name for name in CONSTRUCTORS}
    return by_model_name.get(encoder.name)


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
            A ConvNeXt V1 encoder (`"ConvNeXtAtto"`: layer scale, no GRN) is
            pre-trained the same way, the V1 + FCMAE model of the V2 paper's
            feature-collapse study; the decoder is the same for both.
        input_shape: `(height, width, 3)`, sides multiples of `patch_size`.
            With an encoder that has preprocessing (the default), images are
            RGB pixels in [0, 255] and the reconstruction target is the
            normalized image, as in the official recipe.
        mask_ratio: fraction of patches masked per image, in (0, 1); exactly
            `int(L * (1 - mask_ratio))` of the `L` patches stay visible,
            and at least one must be visible and one masked.
        patch_size: mask patch side in pixels; the encoder's stride, 32.
        decoder_dim, decoder_depth: width and number of the decoder's ConvNeXt V2 blocks.
        norm_pix_loss: targets are each patch standardized by its own mean
            and variance (epsilon 1e-6).
        drop_path_rate: stochastic depth of an encoder built by name.
        fast_path: run the pointwise layers on gathered visible positions
            only (same result as the dense masked path, faster).
        seed: seed of the mask generator, for reproducible runs.
        weights: `"fcmae"`, the registry's official pre-training weights
            (downloaded and cached), or the path of an official FCMAE
            checkpoint (`convnextv2_*_fcmae.pt`); both load the encoder,
            the decoder and the mask token (the official decoder has
            decoder_dim 512 and decoder_depth 1).

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
        mask_ratio = _check_mask_ratio(mask_ratio)  # before the encoder is built: a quick refusal
        if seed is not None and not _is_integer(seed):
            raise ValueError(f"seed must be an integer or None; got {seed!r}.")
        if not isinstance(input_shape, (tuple, list)):
            raise ValueError(
                "FCMAE needs a fixed input_shape, (height, width, channels) with sides multiples of the "
                f"patch size, such as (224, 224, 3); got {input_shape!r}."
            )
        self.encoder_spec = encoder if isinstance(encoder, str) else None
        self.encoder = _build_encoder(encoder, tuple(input_shape), drop_path_rate)
        self.encoder_layers = sparse.find_encoder_layers(self.encoder)
        self.image_shape = tuple(input_shape)
        self.mask_ratio = mask_ratio
        self.patch_size = int(patch_size)
        self.grid_shape = _check_shapes(
            self.encoder, self.image_shape, self.patch_size, self.mask_ratio,
            self.encoder_layers.channels_first,
        )
        _check_patch_counts(self.grid_shape, self.mask_ratio)
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
            self._load_weights_argument(weights)

    def _load_weights_argument(self, weights):
        """`weights=`: a registry tag (`"fcmae"`) or an official FCMAE checkpoint; encoder and decoder."""
        is_file = isinstance(weights, os.PathLike) or (isinstance(weights, str) and os.path.exists(weights))
        if not isinstance(weights, str) or is_file:
            return self.load_checkpoint(weights)
        from keras_convnext.weights import registry

        entry = registry.lookup(_variant_of(self.encoder_spec, self.encoder), weights)
        if not entry.encoder_only:
            raise ValueError(
                f"weights={weights!r} is a classifier release; FCMAE starts from the encoder-only "
                "pre-training weights, weights='fcmae'."
            )
        from keras_convnext.fcmae.checkpoint import load_fcmae_pretrained

        return load_fcmae_pretrained(self, entry)

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

    def check_patch_mask(self, patch_mask):
        """Raises a ValueError unless `patch_mask` is `(batch, gh, gw)` of 0/1 with `num_visible` zeros per image.

        The fast path gathers exactly `num_visible` positions per image, so
        any other count would be cut silently. Values are checked when they
        are known (eager calls); inside a traced function only the shape is.
        """
        if not hasattr(patch_mask, "shape"):
            patch_mask = np.asarray(patch_mask)
        shape = tuple(patch_mask.shape)
        if len(shape) != 3 or shape[1:] != tuple(self.grid_shape):
            raise ValueError(
                f"patch_mask must have shape (batch, {self.grid_shape[0]}, {self.grid_shape[1]}), one "
                f"value per patch of {self.patch_size} pixels; got {shape}."
            )
        values = _concrete(patch_mask)
        if values is None:
            return
        if not np.all((values == 0) | (values == 1)):
            raise ValueError("patch_mask must hold only 0 (visible) and 1 (masked).")
        visible = np.sum(values == 0, axis=(1, 2))
        wrong = np.flatnonzero(visible != self.num_visible)
        if wrong.size:
            raise ValueError(
                f"patch_mask keeps {int(visible[wrong[0]])} patches visible in image {int(wrong[0])}, but this "
                f"FCMAE model (mask_ratio={self.mask_ratio}, {self.grid_shape[0]}x{self.grid_shape[1]} patches) "
                f"encodes exactly {self.num_visible} per image. Draw masks with model.random_mask(batch_size), "
                "or build the model with the mask_ratio your masks have."
            )

    def encode(self, images, patch_mask, training=None, fast_path=None):
        """Encoder features `(batch, gh, gw, dims[-1])` of the visible patches, zero elsewhere.

        On the fast path `patch_mask` must keep exactly `num_visible`
        patches visible per image (`check_patch_mask`); the dense path
        takes any mask.
        """
        fast_path = self.fast_path if fast_path is None else fast_path
        if fast_path:
            self.check_patch_mask(patch_mask)
        return self._encode(images, patch_mask, training, fast_path)

    def _encode(self, images, patch_mask, training, fast_path):
        x = sparse.prepare_images(self.encoder_layers, images)
        if fast_path:
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
        check_images(self, images, self._expected_images())
        if patch_mask is None:
            patch_mask = self.random_mask(ops.shape(images)[0])
        else:
            if not hasattr(patch_mask, "shape"):
                patch_mask = np.asarray(patch_mask, "float32")
            self.check_patch_mask(patch_mask)
            if None not in (images.shape[0], patch_mask.shape[0]) and images.shape[0] != patch_mask.shape[0]:
                raise ValueError(
                    f"patch_mask holds masks for {patch_mask.shape[0]} images, but {images.shape[0]} images were given."
                )
        patch_mask = ops.cast(patch_mask, "float32")
        fast_path = self.fast_path if fast_path is None else fast_path
        features = self._encode(images, patch_mask, training, fast_path)
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

    def _expected_images(self):
        """`(data_format, height, width, channels, min_size)` of the images `call` takes."""
        if self.encoder_layers.channels_first:
            channels, height, width = self.image_shape
            return "channels_first", height, width, channels, self.patch_size
        height, width, channels = self.image_shape
        return "channels_last", height, width, channels, self.patch_size

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

    def fit(self, x=None, *args, **kwargs):
        # On TensorFlow, the training step is then traced once (models.inputs.build_training_state).
        build_training_state(self, x, *args, **kwargs)
        return super().fit(x, *args, **kwargs)

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
    if not isinstance(fcmae, FCMAE):
        raise TypeError(
            "transfer_encoder(fcmae, classifier) takes the pre-trained FCMAE model first and the "
            f"ConvNeXt model to fill second; got {type(fcmae).__name__} first."
        )
    if not isinstance(classifier, keras.Model):
        raise TypeError(f"transfer_encoder's second argument must be a ConvNeXt model; got {type(classifier).__name__}.")
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
