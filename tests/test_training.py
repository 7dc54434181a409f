"""The fine-tuning recipe: layer-wise decay, weight-decay exclusions, schedule, augmentation.

The learning rate a parameter really gets is measured from one optimizer
step, not read back from our own table: on Adam's first step with a
gradient of ones the update is `lr * 1 / (1 + eps)`, so `-delta / lr` is the
applied multiplier; with a zero gradient only the decoupled weight decay
moves a parameter, by `lr * multiplier * weight_decay * value`.
"""

import math

import numpy as np
import pytest

import keras

import keras_convnext
from keras_convnext import training

# Small widths, but stage 2 deep enough (7 blocks) to span three official
# groups (3 + block // 3 = 3, 4, 5).
DEPTHS = (1, 2, 7, 1)
DIMS = (8, 8, 16, 16)
PEAK = 1e-3
DECAY = 0.8


def official_group_level(path):
    """ConvNeXt-V2 optim_factory.get_num_layer_for_convnext, restated on Keras names."""
    top = path.split("/")[0]
    if top.startswith("stem_"):
        return 0
    if top.startswith("downsample"):
        stage = int(top[len("downsample")])
        return {1: 2, 2: 3, 3: 12}[stage]
    if top.startswith("stage"):
        stage, block = int(top[5]), int(top.split("_block")[1])
        return {0: 1, 1: 2, 2: 3 + block // 3, 3: 12}[stage]
    return 13


@pytest.fixture
def model():
    keras.utils.set_random_seed(0)
    return keras_convnext.ConvNeXt(DEPTHS, DIMS, input_shape=(32, 32, 3), classes=4)


def _one_step(model, optimizer, gradient_fill):
    variables = model.trainable_variables
    optimizer.build(variables)
    before = [np.array(v.numpy()) for v in variables]
    grads = [keras.ops.full(v.shape, gradient_fill, dtype=v.dtype) for v in variables]
    optimizer.apply(grads, variables)
    return {v.path: (b, np.array(v.numpy())) for v, b in zip(variables, before)}


def test_group_levels_follow_the_official_rule_per_stage():
    paths = ["stem_conv/kernel", "downsample1_conv/kernel", "downsample2_norm/gamma", "downsample3_conv/bias",
             "head_norm/gamma", "predictions/kernel"]
    paths += [f"stage{s}_block{b}/pwconv1/kernel" for s, d in enumerate((3, 3, 27, 3)) for b in range(d)]
    for path in paths:
        assert training.layer_id(path, (3, 3, 27, 3)) == official_group_level(path), path
    # Stage 2 of ConvNeXt-Base spans levels 3..11, three blocks per level.
    levels = [training.layer_id(f"stage2_block{b}/dwconv/kernel", (3, 3, 27, 3)) for b in range(27)]
    assert levels == [3 + b // 3 for b in range(27)]
    # "single": one level per block, stem first, head last.
    assert training.layer_id("stem_conv/kernel", (2, 2, 6, 2), "single") == 1
    assert training.layer_id("stage2_block5/grn/gamma", (2, 2, 6, 2), "single") == 2 + 2 + 5 + 1
    assert training.layer_id("predictions/bias", (2, 2, 6, 2), "single") == 13


def test_applied_learning_rate_per_stage_matches_the_formula(model):
    optimizer = training.finetune_optimizer(
        model, learning_rate=PEAK, total_steps=10, warmup_steps=0, weight_decay=0.0, layer_decay=DECAY
    )
    steps = _one_step(model, optimizer, 1.0)
    levels_per_stage = {}
    for path, (before, after) in steps.items():
        applied = float(np.mean(before - after)) / PEAK
        level = official_group_level(path)
        # float32 steps near 1.0 resolve the update to ~1e-3 relative.
        np.testing.assert_allclose(applied, DECAY ** (13 - level), rtol=2e-3, err_msg=path)
        measured_level = 13 - round(math.log(applied) / math.log(DECAY))
        assert measured_level == level, path
        group = path.split("/")[0].split("_block")[0]
        levels_per_stage.setdefault(group, set()).add(measured_level)
    # One level per stage for stages 0, 1, 3; stage 2's seven blocks span three levels.
    assert levels_per_stage["stem_conv"] == levels_per_stage["stem_norm"] == {0}
    assert levels_per_stage["stage0"] == {1}
    assert levels_per_stage["stage1"] == levels_per_stage["downsample1_conv"] == {2}
    assert levels_per_stage["stage2"] == {3, 4, 5}
    assert levels_per_stage["stage3"] == levels_per_stage["downsample3_norm"] == {12}
    assert levels_per_stage["predictions"] == levels_per_stage["head_norm"] == {13}


def test_weight_decay_exclusions_by_parameter():
    keras.utils.set_random_seed(1)
    models = [
        keras_convnext.ConvNeXt((1, 1, 1, 1), (8, 8, 8, 8), input_shape=(32, 32, 3), classes=3),
        keras_convnext.ConvNeXt((1, 1, 1, 1), (8, 8, 8, 8), version="v1", input_shape=(32, 32, 3), classes=3),
    ]
    weight_decay = 0.5
    for model in models:
        rng = np.random.default_rng(0)
        for v in model.trainable_variables:  # zero-initialized GRN/biases would hide a decay
            v.assign(rng.uniform(0.5, 1.5, size=v.shape).astype("float32"))
        optimizer = training.finetune_optimizer(
            model, learning_rate=PEAK, total_steps=10, weight_decay=weight_decay, layer_decay=1.0
        )
        steps = _one_step(model, optimizer, 0.0)
        undecayed = set()
        for path, (before, after) in steps.items():
            ratio = after / before
            if np.allclose(ratio, 1.0, rtol=0, atol=1e-7):
                undecayed.add(path)
            else:
                np.testing.assert_allclose(ratio, 1.0 - PEAK * weight_decay, rtol=2e-6, err_msg=path)
        leaf = lambda path: path.rsplit("/", 1)[-1]  # noqa: E731
        for path in steps:
            parent = path.split("/")[-2]
            should_skip = leaf(path) in ("bias", "gamma", "beta") or parent in ("grn", "layer_scale", "norm")
            assert (path in undecayed) == should_skip, path
        if model.name.endswith("v1") or any("layer_scale" in p for p in steps):
            assert any("layer_scale/gamma" in p for p in undecayed)
        else:
            assert {"stage0_block0/grn/gamma", "stage0_block0/grn/beta"} <= undecayed
        assert "stage0_block0/dwconv/kernel" not in undecayed and "predictions/kernel" not in undecayed


def test_layer_decay_also_scales_weight_decay(model):
    for v in model.trainable_variables:
        v.assign(np.full(v.shape, 2.0, "float32"))
    optimizer = training.finetune_optimizer(model, learning_rate=PEAK, total_steps=10, weight_decay=0.1,
                                            layer_decay=DECAY)
    before, after = _one_step(model, optimizer, 0.0)["stem_conv/kernel"]
    # 1 - 5.5e-6: resolvable in float32 (the decay of level 0 vs level 1 differs by 1.4e-6).
    np.testing.assert_allclose(after / before, 1.0 - PEAK * DECAY ** 13 * 0.1, rtol=3e-7)


def test_warmup_cosine_schedule():
    schedule = training.WarmupCosine(1.0, total_steps=110, warmup_steps=10, min_learning_rate=0.01)
    values = {s: float(keras.ops.convert_to_numpy(schedule(s))) for s in (0, 4, 9, 10, 60, 110, 500)}
    assert values[0] == pytest.approx(0.1) and values[4] == pytest.approx(0.5) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
    assert values[110] == pytest.approx(0.01) and values[500] == pytest.approx(0.01)
    rebuilt = training.WarmupCosine.from_config(schedule.get_config())
    assert float(keras.ops.convert_to_numpy(rebuilt(60))) == pytest.approx(values[60])
    with pytest.raises(ValueError, match="warmup_steps"):
        training.WarmupCosine(1.0, total_steps=5, warmup_steps=6)


def test_optimizer_config_round_trip_and_ema(model):
    optimizer = training.finetune_optimizer(model, total_steps=20, layer_decay=0.7, use_ema=True, ema_momentum=0.5)
    config = optimizer.get_config()
    rebuilt = training.LayerwiseAdamW.from_config(config)
    assert rebuilt.learning_rate_multipliers == optimizer.learning_rate_multipliers
    assert rebuilt.use_ema and rebuilt.ema_momentum == 0.5
    with pytest.raises(ValueError, match="layer_decay"):
        training.finetune_optimizer(model, layer_decay=1.5)
    # EMA: after training steps, finalize_variable_values moves weights to the average.
    variables = model.trainable_variables
    optimizer.build(variables)
    start = np.array(variables[0].numpy())
    for _ in range(3):
        optimizer.apply([keras.ops.ones(v.shape) for v in variables], variables)
    trained = np.array(variables[0].numpy())
    optimizer.finalize_variable_values(variables)
    averaged = np.array(variables[0].numpy())
    assert not np.allclose(averaged, trained) and not np.allclose(averaged, start)


def test_augmentation_and_mixing_keep_shapes_and_mix_labels():
    import tensorflow as tf

    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32"))
    labels = tf.one_hot(tf.range(8) % 4, 4)
    augmented = images
    # RandAugment runs in the fine-tuning example's test; here the erasing layer.
    for layer in training.augmentation_layers(rand_augment=False, random_erasing=1.0, seed=3):
        augmented = layer(augmented, training=True)
    augmented = np.asarray(augmented)
    assert augmented.shape == (8, 32, 32, 3)
    assert not np.allclose(augmented, images.numpy())
    assert augmented.min() >= -1e-3 and augmented.max() <= 255.0 + 1e-3
    mixed_images, mixed_labels = training.batch_mixing(mixup_alpha=0.8, cutmix_alpha=0.0, seed=1)(images, labels)
    mixed_labels = np.asarray(mixed_labels)
    np.testing.assert_allclose(mixed_labels.sum(-1), 1.0, rtol=1e-5)
    assert (mixed_labels.max(-1) < 0.999).any()  # some labels are now mixtures
    assert mixed_images.shape == images.shape
    _, cut_labels = training.batch_mixing(mixup_alpha=0.0, cutmix_alpha=1.0, seed=1)(images, labels)
    np.testing.assert_allclose(np.asarray(cut_labels).sum(-1), 1.0, rtol=1e-5)
    assert training.batch_mixing(0.0, 0.0) is None


def test_randaugment_equalization_in_tf_data_equals_keras_own_layer():
    """Inside tf.data the recipe's Equalization counts with TensorFlow's bincount.

    On real photographs it must give exactly what a plain Keras Equalization
    layer gives in the same pipeline (on JAX, Keras' per-bin counting).
    """
    import tensorflow as tf
    from skimage import data as photos

    equalization = training.augmentation_layers(rand_augment=True, random_erasing=0.0)[0].equalization
    images = np.stack([
        tf.image.resize(photo.astype("float32"), (48, 40)).numpy()
        for photo in (photos.astronaut(), photos.coffee(), photos.chelsea())
    ])

    def in_pipeline(layer):
        return next(iter(tf.data.Dataset.from_tensors(images).map(layer))).numpy()

    ours = in_pipeline(equalization)
    assert not np.allclose(ours, images, atol=1.0)  # equalization changed the photos
    np.testing.assert_array_equal(ours, in_pipeline(keras.layers.Equalization(value_range=(0, 255))))
