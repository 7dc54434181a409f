"""The official ConvNeXt V2 fine-tuning recipe as reusable pieces, for every backend.

- `finetune_optimizer(model, ...)`: AdamW with a cosine schedule after a linear
  warm-up, layer-wise learning-rate decay and no weight decay on biases,
  norms, GRN and layer-scale parameters; optional EMA of the weights.
- `layer_id` / `layer_decay_multipliers`: the official "group" (and "single")
  assignment of parameters to depth levels (ConvNeXt-V2 `optim_factory.py`).
- `WarmupCosine`: the learning-rate schedule, per optimizer step.
- `augmentation_layers(...)`, `batch_mixing(...)`: RandAugment, RandomErasing,
  MixUp and CutMix from Keras core layers.
- `classification_loss(label_smoothing)`.
"""

import math
import re

import keras
from keras import ops

# The official "group" scheme divides a (3, 3, 27, 3) network into 12 groups
# of about three blocks each; the head is one level above the last group.
GROUP_LEVELS = 12

_STAGE_BLOCK = re.compile(r"^stage(\d+)_block(\d+)$")
_DOWNSAMPLE = re.compile(r"^downsample(\d+)_(norm|conv)$")
_STEM = ("stem_conv", "stem_norm")
# Parameters the official recipe never decays (besides every 0-D/1-D one):
# biases, norm scale/shift, GRN gamma/beta and layer-scale gamma.
_NO_DECAY_NAMES = ("bias", "gamma", "beta")


def _top_layer_name(path):
    return path.split("/", 1)[0]


def layer_id(path, stage_depths, scheme="group"):
    """Depth level of a ConvNeXt parameter for layer-wise learning-rate decay.

    Follows ConvNeXt-V2's `optim_factory.py`. "group": the stem is level 0;
    stages 0 and 1 (and the downsampling before stage 1 and 2) are levels
    1..3; stage 2 takes levels 3, 4, ... one per three blocks; the last
    downsampling and stage 3 are level 12; everything else (head) is 13.
    "single": one level per block, `sum(stage_depths) + 1` for the head.

    Args:
        path: Keras variable path such as `"stage2_block4/pwconv1/kernel"`.
        stage_depths: the model's four stage depths.
        scheme: `"group"` (official for every size here) or `"single"`.

    Returns:
        An int level; the head is `num_levels(stage_depths, scheme) + 1`.
    """
    name = _top_layer_name(path)
    block = _STAGE_BLOCK.match(name)
    down = _DOWNSAMPLE.match(name)
    if scheme == "single":
        if name in _STEM:
            return 1
        if down:
            return sum(stage_depths[: int(down.group(1))]) + 1
        if block:
            stage, index = int(block.group(1)), int(block.group(2))
            return sum(stage_depths[:stage]) + index + 1
        return sum(stage_depths) + 1
    if scheme != "group":
        raise ValueError(f'scheme must be "group" or "single"; got {scheme!r}.')
    if name in _STEM:
        return 0
    if down:
        stage = int(down.group(1))
        return stage + 1 if stage in (1, 2) else GROUP_LEVELS
    if block:
        stage, index = int(block.group(1)), int(block.group(2))
        if stage in (0, 1):
            return stage + 1
        if stage == 2:
            return 3 + index // 3
        return GROUP_LEVELS
    return GROUP_LEVELS + 1


def num_levels(stage_depths, scheme="group"):
    """Number of body levels (the head sits at this number + 1)."""
    return GROUP_LEVELS if scheme == "group" else sum(stage_depths)


def infer_stage_depths(model):
    """The four stage depths of a ConvNeXt model, read from its layer names."""
    depths = [0, 0, 0, 0]
    for layer in model.layers:
        match = _STAGE_BLOCK.match(layer.name)
        if match:
            stage, index = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths[stage], index + 1)
    if not all(depths):
        raise ValueError(
            f"{model.name} has no stage{{i}}_block{{j}} layers for every stage; "
            "layer-wise decay needs a ConvNeXt model from keras_convnext."
        )
    return tuple(depths)


def layer_decay_multipliers(model, layer_decay, scheme="group"):
    """Learning-rate multiplier of every trainable variable, by variable path.

    The level-`i` multiplier is `layer_decay ** (num_levels + 1 - i)`, so the
    head trains at the base rate and the stem at `layer_decay ** 13` ("group").
    """
    depths = infer_stage_depths(model)
    top = num_levels(depths, scheme) + 1
    return {
        v.path: float(layer_decay ** (top - layer_id(v.path, depths, scheme)))
        for v in model.trainable_variables
    }


def uses_weight_decay(variable):
    """False for the parameters the official recipe leaves undecayed.

    Those are every 0-D/1-D parameter and every parameter named bias, gamma
    or beta (biases, LayerNorm, GRN, layer scale); kernels are decayed.
    """
    return len(variable.shape) > 1 and variable.name not in _NO_DECAY_NAMES


@keras.saving.register_keras_serializable(package="keras_convnext")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak_learning_rate`, then cosine to `min_learning_rate`.

    Steps are optimizer steps (batches). After `total_steps` the rate stays at
    `min_learning_rate`.
    """

    def __init__(self, peak_learning_rate, total_steps, warmup_steps=0, min_learning_rate=1e-6):
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"WarmupCosine needs total_steps >= 1 and 0 <= warmup_steps <= total_steps; "
                f"got total_steps={total_steps}, warmup_steps={warmup_steps}."
            )
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_learning_rate = float(min_learning_rate)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        # Step 0 gets the rate of step 1 in the warm-up, so the first update is not empty.
        warmup = self.peak_learning_rate * (step + 1.0) / max(self.warmup_steps, 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = self.min_learning_rate + 0.5 * (self.peak_learning_rate - self.min_learning_rate) * (
            1.0 + ops.cos(math.pi * progress)
        )
        return ops.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_learning_rate": self.min_learning_rate,
        }


@keras.saving.register_keras_serializable(package="keras_convnext")
class LayerwiseAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate (and so decoupled weight decay) is scaled per variable.

    As with PyTorch parameter groups, a variable with multiplier `m` is
    updated with rate `m * lr` and decayed by `m * lr * weight_decay`, which
    is what the official recipe's `lr_scale` groups do.

    Args:
        learning_rate_multipliers: `{variable path: multiplier}`; variables
            not listed use 1.0.
        **kwargs: as `keras.optimizers.AdamW`.
    """

    def __init__(self, learning_rate_multipliers=None, **kwargs):
        super().__init__(**kwargs)
        self.learning_rate_multipliers = dict(learning_rate_multipliers or {})
        self._multiplier_by_key = {}

    def build(self, variables):
        super().build(variables)
        self._multiplier_by_key = {
            self._var_key(v): self.learning_rate_multipliers.get(v.path, 1.0) for v in variables
        }

    def multiplier(self, variable):
        """The learning-rate multiplier this optimizer applies to `variable`."""
        return self._multiplier_by_key.get(self._var_key(variable), 1.0)

    def _apply_weight_decay(self, variables):
        # Applied per variable in update_step instead, with the scaled rate.
        return

    def update_step(self, gradient, variable, learning_rate):
        scale = self.multiplier(variable)
        learning_rate = ops.cast(learning_rate, variable.dtype) * scale
        if self.weight_decay is not None and self._use_weight_decay(variable):
            decay = ops.cast(self.weight_decay, variable.dtype) * learning_rate
            self.assign_sub(variable, variable * decay)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["learning_rate_multipliers"] = dict(self.learning_rate_multipliers)
        return config


def finetune_optimizer(
    model,
    learning_rate=5e-4,
    total_steps=1000,
    warmup_steps=0,
    min_learning_rate=1e-6,
    weight_decay=0.05,
    layer_decay=0.9,
    layer_decay_scheme="group",
    use_ema=False,
    ema_momentum=0.9999,
    beta_1=0.9,
    beta_2=0.999,
    gradient_clip_norm=None,
):
    """The official ConvNeXt V2 fine-tuning optimizer for `model`.

    Args:
        model: a keras_convnext ConvNeXt (layer names decide the decay levels).
        learning_rate: peak learning rate after warm-up (the official recipe
            scales a base rate by batch size / 256 before passing it).
        total_steps: optimizer steps of the whole run (epochs x steps/epoch).
        warmup_steps: linear warm-up steps.
        min_learning_rate: floor of the cosine schedule.
        weight_decay: decoupled weight decay of kernels (0.05 official).
        layer_decay: per-level learning-rate decay; 1.0 disables it.
        layer_decay_scheme: `"group"` (official) or `"single"`.
        use_ema: keep an exponential moving average of the weights; Keras
            copies it into the model at the end of `fit`.
        ema_momentum: EMA momentum per step.

    Returns:
        A `LayerwiseAdamW` with the schedule, multipliers and exclusions set.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1]; got {layer_decay}.")
    schedule = WarmupCosine(learning_rate, total_steps, warmup_steps, min_learning_rate)
    multipliers = layer_decay_multipliers(model, layer_decay, layer_decay_scheme) if layer_decay < 1.0 else {}
    optimizer = LayerwiseAdamW(
        learning_rate_multipliers=multipliers,
        learning_rate=schedule,
        weight_decay=weight_decay,
        beta_1=beta_1,
        beta_2=beta_2,
        use_ema=use_ema,
        ema_momentum=ema_momentum,
        global_clipnorm=gradient_clip_norm,
    )
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if not uses_weight_decay(v)]
    )
    return optimizer


def classification_loss(label_smoothing=0.1):
    """Cross-entropy on one-hot (or mixed) labels and softmax outputs."""
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def augmentation_layers(rand_augment=True, random_erasing=0.25, seed=None):
    """Per-image augmentations of the recipe, as a list of Keras layers.

    Images are pixels in [0, 255], `(batch, height, width, 3)`. RandAugment
    (2 operations, magnitude 9/10 as "rand-m9-mstd0.5") then RandomErasing
    with probability `random_erasing`.
    """
    layers = []
    if rand_augment:
        rand_augment_layer = keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.9, seed=seed)
        _count_histogram_with_running_backend(rand_augment_layer.equalization)
        layers.append(rand_augment_layer)
    if random_erasing:
        layers.append(
            keras.layers.RandomErasing(factor=random_erasing, value_range=(0, 255), seed=seed)
        )
    return layers


def _count_histogram_with_running_backend(equalization):
    """Makes `keras.layers.Equalization` count its histogram with the backend it runs on.

    Keras chooses the histogram by the global backend: under JAX it unrolls
    one comparison and sum per bin (256 of them, per channel), and keeps doing
    so inside tf.data, where the layer runs TensorFlow ops and `bincount`
    works. Tracing RandAugment for a tf.data pipeline then took about 17 s
    instead of 1 s, and each batch ran about 15x slower. Bins are as in Keras:
    `(value - low) * (bins - 1) / (high - low)`, truncated and clipped.
    """
    keras_histogram = equalization._custom_histogram_fixed_width

    def histogram(values, value_range, nbins):
        if equalization.backend.name != "tensorflow":
            return keras_histogram(values, value_range, nbins)
        import tensorflow as tf

        low, high = (float(bound) for bound in value_range)
        scaled = (tf.cast(values, "float32") - low) * (nbins - 1) / (high - low)
        indices = tf.clip_by_value(tf.cast(scaled, "int32"), 0, nbins - 1)
        return tf.math.bincount(tf.reshape(indices, [-1]), minlength=nbins, maxlength=nbins)

    equalization._custom_histogram_fixed_width = histogram


def batch_mixing(mixup_alpha=0.8, cutmix_alpha=1.0, seed=None):
    """MixUp or CutMix for a batch, chosen with equal odds per batch.

    Returns `mix(images, one_hot_labels) -> (images, labels)` for use in a
    tf.data `map` after batching, or None when both alphas are 0.
    """
    mixers = []
    if mixup_alpha:
        mixers.append(keras.layers.MixUp(alpha=mixup_alpha, seed=seed))
    if cutmix_alpha:
        mixers.append(keras.layers.CutMix(factor=cutmix_alpha, seed=seed))
    if not mixers:
        return None

    def mix(images, labels):
        import tensorflow as tf

        def apply(layer):
            def run():
                out = layer({"images": images, "labels": labels}, training=True)
                return tf.cast(out["images"], images.dtype), tf.cast(out["labels"], labels.dtype)

            return run

        if len(mixers) == 1:
            return apply(mixers[0])()
        choice = tf.random.uniform((), seed=seed) < 0.5
        return tf.cond(choice, apply(mixers[0]), apply(mixers[1]))

    return mix
