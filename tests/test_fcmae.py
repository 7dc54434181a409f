"""FCMAE: masking, sparse semantics, dense == fast path, training, official checkpoints."""

import numpy as np
import pytest

import keras
from keras import ops

import keras_convnext as kc
from conftest import randomize_torch_model
from naming_fixtures import hf_to_fcmae
from keras_convnext.fcmae import patchify, random_patch_mask, unpatchify, visible_count

TINY = ((1, 1, 1, 1), (8, 16, 24, 32))


def _tiny_encoder(input_shape=(64, 64, 3), depths=TINY[0], dims=TINY[1], **kwargs):
    return kc.ConvNeXt(depths, dims, version="v2", include_top=False, input_shape=input_shape, **kwargs)


def _randomize(model, seed=0):
    """Non-trivial weights (GRN on, norms away from identity) so every term matters."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if variable.path.endswith("seed_generator_state"):
            continue
        shape = tuple(variable.shape)
        noise = rng.normal(size=shape).astype("float32")
        if "/grn/" in variable.path:
            value = 0.3 * noise
        elif variable.path.endswith("gamma"):
            value = 1.0 + 0.2 * noise
        elif len(shape) <= 1:
            value = 0.05 * noise
        else:
            value = noise / np.sqrt(np.prod(shape[:-1]) if shape[-1] != 1 else np.prod(shape[:2]))
        variable.assign(value)
    return model


def _np(x):
    return ops.convert_to_numpy(x)


def _pixels(batch, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype("float32")


def test_masks_keep_exactly_the_static_count_and_are_reproducible():
    masks = _np(random_patch_mask(16, (3, 4), 0.6, seed=keras.random.SeedGenerator(3)))
    assert masks.shape == (16, 3, 4)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert visible_count(12, 0.6) == 4
    assert np.all((1 - masks).sum(axis=(1, 2)) == 4)
    assert len({m.tobytes() for m in masks}) > 1  # drawn per image
    again = _np(random_patch_mask(16, (3, 4), 0.6, seed=keras.random.SeedGenerator(3)))
    np.testing.assert_array_equal(masks, again)
    first = kc.FCMAE(_tiny_encoder(), input_shape=(64, 64, 3), decoder_dim=16, seed=7)
    second = kc.FCMAE(_tiny_encoder(), input_shape=(64, 64, 3), decoder_dim=16, seed=7)
    np.testing.assert_array_equal(_np(first.random_mask(8)), _np(second.random_mask(8)))


def test_patchify_round_trip_and_official_order():
    images = np.arange(2 * 64 * 96 * 3, dtype="float32").reshape(2, 64, 96, 3)
    patches = _np(patchify(images, 32))
    assert patches.shape == (2, 2, 3, 32 * 32 * 3)
    # (row, column, channel) inside a patch, as the official `nhwpqc` layout.
    np.testing.assert_array_equal(patches[1, 1, 2].reshape(32, 32, 3), images[1, 32:64, 64:96])
    np.testing.assert_array_equal(_np(unpatchify(patches, 32)), images)


def test_loss_is_the_official_masked_patch_mse():
    from keras_convnext.fcmae import masked_patch_loss, patch_targets

    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 64, 96, 3)).astype("float32")
    pred = rng.normal(size=(3, 2, 3, 32 * 32 * 3)).astype("float32")
    mask = np.stack([rng.permutation([1, 1, 1, 1, 0, 0]) for _ in range(3)]).reshape(3, 2, 3).astype("float32")
    # The official formula, on NCHW patches written with numpy.
    patches = images.reshape(3, 2, 32, 3, 32, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 6, -1)
    mean, var = patches.mean(-1, keepdims=True), patches.var(-1, ddof=1, keepdims=True)
    normalized = (patches - mean) / np.sqrt(var + 1e-6)
    per_patch = ((pred.reshape(3, 6, -1) - normalized) ** 2).mean(-1)
    expected = (per_patch * mask.reshape(3, 6)).sum() / mask.sum()
    loss = _np(masked_patch_loss(pred, patch_targets(images, 32, norm_pix_loss=True), mask))
    np.testing.assert_allclose(loss.mean(), expected, rtol=1e-5)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="multiples of 32"):
        kc.FCMAE(_tiny_encoder(input_shape=None), input_shape=(70, 64, 3))
    with pytest.raises(ValueError, match="mask_ratio"):
        kc.FCMAE(_tiny_encoder(), input_shape=(64, 64, 3), mask_ratio=1.0)
    with pytest.raises(ValueError, match="hierarchical ConvNeXt"):
        kc.FCMAE(kc.ConvNeXtIsotropic(1, 8, include_top=False), input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match="include_top=False"):
        kc.FCMAE(kc.ConvNeXt(*TINY, version="v2", classes=3), input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match="patch_size"):
        kc.FCMAE(_tiny_encoder(), input_shape=(64, 64, 3), patch_size=16)
    with pytest.raises(ValueError, match="Unknown FCMAE encoder"):
        kc.FCMAE("ConvNeXtV3Tiny", input_shape=(64, 64, 3))


@pytest.mark.slow
def test_masked_pixels_never_reach_visible_positions_v2_atto():
    """Submanifold sparse semantics through the real depth of ConvNeXt V2 Atto."""
    model = kc.FCMAE("ConvNeXtV2Atto", input_shape=(96, 96, 3), mask_ratio=0.6, decoder_dim=16, seed=0)
    _randomize(model.encoder, seed=1)
    images = _pixels(2, 96)
    mask = _np(model.random_mask(2))
    pixel_mask = np.repeat(np.repeat(mask, 32, axis=1), 32, axis=2)[..., None]
    altered = images + pixel_mask * np.random.default_rng(5).uniform(-200, 200, images.shape).astype("float32")
    assert np.abs(altered - images).max() > 100
    for fast_path in (False, True):
        _assert_visible_features_unchanged(model, images, altered, mask, pixel_mask, fast_path)


def _assert_visible_features_unchanged(model, images, altered, mask, pixel_mask, fast_path):
    features = _np(model.encode(images, mask, fast_path=fast_path))
    features_altered = _np(model.encode(altered, mask, fast_path=fast_path))
    visible = mask == 0
    scale = np.abs(features[visible]).max()
    assert scale > 0.1
    assert np.abs(features[visible] - features_altered[visible]).max() <= 1e-5 * scale
    assert np.all(features[~visible] == 0) and np.all(features_altered[~visible] == 0)
    if fast_path:
        return
    # The property is not vacuous: a visible pixel change does change the features.
    changed = _np(model.encode(images + (1 - pixel_mask) * 50.0, mask, fast_path=fast_path))
    assert np.abs(changed[visible] - features[visible]).max() > 1e-3 * scale


def _loss_and_gradients(model, images, mask, fast_path):
    backend = keras.backend.backend()
    variables = model.trainable_variables
    if backend == "jax":
        import jax

        trainable = [v.value for v in variables]
        frozen = [v.value for v in model.non_trainable_variables]

        def loss_fn(values):
            outputs, _ = model.stateless_call(
                values, frozen, images, training=True, patch_mask=mask, fast_path=fast_path
            )
            return ops.mean(outputs["loss"])

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = ops.mean(model(images, training=True, patch_mask=mask, fast_path=fast_path)["loss"])
        grads = tape.gradient(loss, variables)
    else:
        import torch

        loss = ops.mean(model(images, training=True, patch_mask=mask, fast_path=fast_path)["loss"])
        grads = torch.autograd.grad(loss, [v.value for v in variables])
    return float(_np(loss)), [_np(g) for g in grads]


def test_fast_path_matches_dense_masked_path_loss_and_gradients():
    model = kc.FCMAE(_tiny_encoder(), input_shape=(64, 64, 3), mask_ratio=0.5, decoder_dim=16, norm_pix_loss=True, seed=2)
    _randomize(model, seed=3)
    images = _pixels(2, 64, seed=4)
    mask = model.random_mask(2)
    dense_loss, dense_grads = _loss_and_gradients(model, images, mask, fast_path=False)
    fast_loss, fast_grads = _loss_and_gradients(model, images, mask, fast_path=True)
    assert dense_loss > 0
    assert abs(fast_loss - dense_loss) <= 1e-5 * abs(dense_loss)
    assert len(dense_grads) == len(fast_grads) == len(model.trainable_variables)
    for variable, dense, fast in zip(model.trainable_variables, dense_grads, fast_grads):
        scale = np.abs(dense).max()
        assert scale > 0, variable.path
        assert np.abs(fast - dense).max() <= 1e-5 * scale, (variable.path, np.abs(fast - dense).max(), scale)


def _tiny_v1_encoder(input_shape=(64, 64, 3)):
    return kc.ConvNeXt(*TINY, version="v1", include_top=False, input_shape=input_shape)


def test_v1_encoder_masked_paths_agree_and_equal_the_model_when_nothing_is_masked():
    """FCMAE of a V1 encoder (layer scale, no GRN), the V2 paper's V1 + FCMAE."""
    model = kc.FCMAE(_tiny_v1_encoder(), input_shape=(64, 64, 3), mask_ratio=0.5, decoder_dim=16, seed=2)
    blocks = [block for stage in model.encoder_layers.stages for block in stage]
    assert blocks and all(block.grn is None and block.layer_scale is not None for block in blocks)
    _randomize(model, seed=3)  # layer scale near 1, not its 1e-6 start, so it shows in every output
    images = _pixels(2, 64, seed=4)
    # With every patch visible the sparse semantics are the plain model's, which
    # tests/test_weights.py checks against timm's ConvNeXt.
    plain = _np(model.encoder(images))
    everything_visible = np.zeros((2, 2, 2), "float32")
    dense = _np(model.encode(images, everything_visible, fast_path=False))
    assert np.abs(plain).max() > 0.1
    assert np.abs(dense - plain).max() <= 1e-4 * np.abs(plain).max()

    mask = _np(model.random_mask(2))
    dense = _np(model.encode(images, mask, fast_path=False))
    fast = _np(model.encode(images, mask, fast_path=True))
    assert np.abs(fast - dense).max() <= 1e-5 * np.abs(dense).max()
    pixel_mask = np.repeat(np.repeat(mask, 32, axis=1), 32, axis=2)[..., None]
    altered = _np(model.encode(images + pixel_mask * 150.0, mask, fast_path=True))
    visible = mask == 0
    assert np.abs(altered[visible] - fast[visible]).max() <= 1e-5 * np.abs(fast).max()
    assert np.all(fast[~visible] == 0) and np.all(dense[~visible] == 0)


@pytest.mark.slow
def test_v1_fcmae_by_name_and_a_training_step():
    atto = kc.FCMAE("ConvNeXtAtto", input_shape=(64, 64, 3), decoder_dim=16)
    assert atto.encoder_layers.stages[0][0].grn is None and atto.encoder_layers.stages[0][0].layer_scale is not None
    model = kc.FCMAE(_tiny_v1_encoder(), input_shape=(64, 64, 3), decoder_dim=16, seed=0)
    # One step: TensorFlow's XLA compilation would cost far more than the step; JAX
    # without jit runs op by op, slower still.
    jit_compile = "auto" if keras.backend.backend() == "jax" else False
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), jit_compile=jit_compile)
    layer_scales = [v for v in model.trainable_variables if "layer_scale" in v.path]
    before = [_np(v) for v in layer_scales]
    loss = model.train_on_batch(_digits(4))
    assert np.isfinite(loss)
    assert all(np.abs(_np(v) - b).max() > 0 for v, b in zip(layer_scales, before))


def _generator(images, batch_size):
    while True:
        for start in range(0, len(images), batch_size):
            yield (images[start : start + batch_size],)  # Keras' generator protocol: (inputs,)


@pytest.mark.slow
def test_fit_on_numpy_tf_data_and_generators_with_drop_path():
    import tensorflow as tf

    encoder = _tiny_encoder(drop_path_rate=0.2)
    model = kc.FCMAE(encoder, input_shape=(64, 64, 3), decoder_dim=16, seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    images = _pixels(8, 64)
    histories = [
        model.fit(images, batch_size=4, epochs=1, verbose=0),
        model.fit(tf.data.Dataset.from_tensor_slices(images).batch(4), epochs=1, verbose=0),
        model.fit(_generator(images, 4), steps_per_epoch=2, epochs=1, verbose=0),
    ]
    for history in histories:
        assert np.isfinite(history.history["loss"]).all()
    outputs = model.predict(images, batch_size=4, verbose=0)
    assert outputs["pred"].shape == (8, 2, 2, 32 * 32 * 3) and outputs["loss"].shape == (8,)


def test_mixed_precision_training():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = kc.FCMAE(_tiny_encoder(), input_shape=(64, 64, 3), decoder_dim=16, seed=0)
    assert model.decoder.compute_dtype == "bfloat16"
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    history = model.fit(_pixels(4, 64), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(v.dtype == "float32" for v in model.trainable_variables)


def _digits(count, size=64):
    """scikit-learn's handwritten digits (bundled, offline) as RGB pixels in [0, 255]."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:count] * (255.0 / 16.0)
    scale = size // 8
    images = np.repeat(np.repeat(digits, scale, axis=1), scale, axis=2)
    return np.repeat(images[..., None], 3, axis=-1).astype("float32")


# A short run on real images must cut the masked reconstruction loss of a
# fixed evaluation batch (fixed masks) to at most this fraction of its start.
PRETRAINING_LOSS_RATIO = 0.7


@pytest.mark.slow
def test_short_pretraining_on_real_images_lowers_the_masked_loss():
    keras.utils.set_random_seed(0)
    images = _digits(256)
    model = kc.FCMAE(_tiny_encoder(), input_shape=(64, 64, 3), mask_ratio=0.5, decoder_dim=32, seed=0)
    held_out, mask = images[:32], model.random_mask(32)
    before = float(np.mean(_np(model(held_out, patch_mask=mask)["loss"])))
    model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.05))
    model.fit(images[32:], batch_size=32, epochs=6, verbose=0)
    after = float(np.mean(_np(model(held_out, patch_mask=mask)["loss"])))
    assert after <= PRETRAINING_LOSS_RATIO * before, (before, after)


def test_config_round_trip_and_keras_file(tmp_path):
    model = kc.FCMAE(_tiny_encoder(), input_shape=(64, 64, 3), decoder_dim=16, decoder_depth=2, norm_pix_loss=True, seed=4)
    _randomize(model, seed=6)
    clone = kc.FCMAE.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert len(clone.weights) == len(model.weights)
    named = kc.FCMAE("ConvNeXtV2Atto", input_shape=(64, 64, 3), mask_ratio=0.75, decoder_dim=16)
    assert kc.FCMAE.from_config(named.get_config()).get_config()["encoder"] == "ConvNeXtV2Atto"
    path = str(tmp_path / "fcmae.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images, mask = _pixels(2, 64), model.random_mask(2)
    np.testing.assert_allclose(
        _np(loaded(images, patch_mask=mask)["loss"]), _np(model(images, patch_mask=mask)["loss"]), rtol=1e-5
    )


def test_transfer_encoder_into_a_classifier():
    model = kc.FCMAE(_tiny_encoder(), input_shape=(64, 64, 3), decoder_dim=16)
    _randomize(model.encoder, seed=2)
    classifier = kc.ConvNeXt(*TINY, version="v2", classes=5, input_shape=(64, 64, 3))
    head = _np(classifier.get_layer("predictions").kernel)
    kc.transfer_encoder(model, classifier)
    encoder_out = _np(model.encoder(_pixels(2, 64)))
    trunk = keras.Model(classifier.inputs, classifier.get_layer("stage3_block0").output)
    np.testing.assert_allclose(_np(trunk(_pixels(2, 64))), encoder_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_np(classifier.get_layer("predictions").kernel), head)
    with pytest.raises(ValueError, match="nothing was copied"):
        kc.transfer_encoder(model, kc.ConvNeXtV2Atto(classes=5))


# --- Official FCMAE checkpoints -------------------------------------------------------


def _torch_decoder(encoder_dim, decoder_dim, depth, seed):
    """The official decoder from PyTorch parts: proj, mask token, V2 blocks, pred."""
    import torch
    import transformers
    from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2Layer

    torch.manual_seed(seed)
    config = transformers.ConvNextV2Config()
    parts = torch.nn.ModuleDict(
        {
            "proj": torch.nn.Conv2d(encoder_dim, decoder_dim, 1),
            "decoder": torch.nn.Sequential(*[ConvNextV2Layer(config, decoder_dim) for _ in range(depth)]),
            "pred": torch.nn.Conv2d(decoder_dim, 32 * 32 * 3, 1),
        }
    )
    randomize_torch_model(parts, seed)
    mask_token = torch.randn(1, decoder_dim, 1, 1, generator=torch.Generator().manual_seed(seed))
    official = {"mask_token": mask_token}
    renames = {"layernorm.": "norm.", "grn.weight": "grn.gamma", "grn.bias": "grn.beta"}
    for key, value in parts.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        official[key] = value.clone()
    return parts, mask_token, official


def _torch_decode(parts, mask_token, features_nhwc, patch_mask):
    import torch

    with torch.no_grad():
        x = parts["proj"](torch.from_numpy(np.ascontiguousarray(features_nhwc.transpose(0, 3, 1, 2))))
        masked = torch.from_numpy(patch_mask[:, None].astype("float32"))
        x = x * (1 - masked) + mask_token * masked
        return parts["pred"](parts["decoder"](x)).numpy().transpose(0, 2, 3, 1)


def _hf_features(reference, images_nhwc):
    import torch

    with torch.no_grad():
        pixels = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        hidden = reference.convnextv2(pixel_values=pixels).last_hidden_state
    return hidden.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def fcmae_checkpoint(hf_v2_atto, tmp_path_factory):
    import torch

    state = {k: v.detach().clone() for k, v in hf_v2_atto.state_dict().items()}
    kernel = state["convnextv2.encoder.stages.0.layers.0.dwconv.weight"][0, 0]
    assert torch.abs(kernel - kernel.T).max() > 0.1  # non-symmetric, so a transposition shows
    parts, mask_token, decoder_state = _torch_decoder(320, 24, 2, seed=11)
    path = tmp_path_factory.mktemp("fcmae") / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save({"model": {**hf_to_fcmae(state), **decoder_state}, "epoch": 799}, str(path))
    return str(path), parts, mask_token


@pytest.mark.slow
def test_official_fcmae_checkpoint_loads_encoder_and_decoder(fcmae_checkpoint, hf_v2_atto):
    path, parts, mask_token = fcmae_checkpoint
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    expected = _hf_features(hf_v2_atto, images)

    backbone = kc.ConvNeXtV2Atto(include_top=False, include_preprocessing=False, input_shape=(64, 64, 3), weights=path)
    assert np.abs(_np(backbone(images)) - expected).max() <= 1e-4

    encoder = kc.ConvNeXtV2Atto(include_top=False, include_preprocessing=False, input_shape=(64, 64, 3))
    model = kc.FCMAE(encoder, input_shape=(64, 64, 3), mask_ratio=0.25, decoder_dim=24, decoder_depth=2, weights=path)
    # The dense path takes any mask; with every patch visible it is the plain encoder.
    all_visible = np.zeros((2, 2, 2), "float32")
    features = _np(model.encode(images, all_visible, fast_path=False))
    assert np.abs(features - expected).max() <= 1e-4
    patch_mask = np.array([[[1, 0], [0, 1]], [[0, 0], [1, 0]]], "float32")
    pred = _np(model.decoder(features, patch_mask))
    reference = _torch_decode(parts, mask_token, features, patch_mask)
    assert np.abs(pred - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())


def test_fcmae_checkpoint_into_classifier_keeps_fresh_head(fcmae_checkpoint, hf_v2_atto):
    path, _, _ = fcmae_checkpoint
    classifier = kc.ConvNeXtV2Atto(include_preprocessing=False, classes=7, input_shape=(64, 64, 3), weights=path)
    images = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype("float32")
    trunk = keras.Model(classifier.inputs, classifier.get_layer("stage3_block1").output)
    assert np.abs(_np(trunk(images)) - _hf_features(hf_v2_atto, images)).max() <= 1e-4
    assert _np(classifier(images)).shape == (1, 7)


def test_fcmae_checkpoint_mismatch_loads_nothing(fcmae_checkpoint):
    import torch

    path, _, _ = fcmae_checkpoint
    state = torch.load(path, weights_only=True)["model"]
    model = kc.FCMAE("ConvNeXtV2Atto", input_shape=(64, 64, 3), decoder_dim=24, decoder_depth=1)
    before = [_np(v) for v in model.weights]
    with pytest.raises(kc.CheckpointError, match="decoder"):
        model.load_checkpoint(state)  # the checkpoint's decoder has two blocks
    assert all(np.array_equal(a, _np(v)) for a, v in zip(before, model.weights))
    with pytest.raises(kc.CheckpointError, match="not an FCMAE"):
        model.load_checkpoint({"downsample_layers.0.0.weight": np.zeros((40, 3, 4, 4), "float32")})


@pytest.mark.slow
def test_example_pretrains_on_mocked_tfds_and_writes_figures(tmp_path):
    import importlib.util
    import json
    import os

    import tensorflow_datasets as tfds
    from matplotlib import image as mpimg

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "fcmae_pretrain.py")
    spec = importlib.util.spec_from_file_location("fcmae_pretrain", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--data", "tfds:cifar10", "--epochs", "2", "--batch-size", "4", "--num-images", "8",
            "--image-size", "64", "--depths", "1,1,1,1", "--dims", "8,8,16,16", "--decoder-dim", "16",
            "--samples", "2", "--output", str(tmp_path)]
    with tfds.testing.mock_data(num_examples=8):
        result = example.main(argv)
    assert len(result["history"]) == 2 and np.isfinite(result["history"]).all()
    grid = mpimg.imread(result["files"]["reconstructions.png"])
    assert grid.ndim == 3 and grid.shape[0] > 100 and grid.std() > 0.01
    assert mpimg.imread(result["files"]["loss_curve.png"]).ndim == 3
    assert json.load(open(result["files"]["history.json"]))["loss"] == result["history"]
    assert os.path.getsize(result["files"]["encoder.weights.h5"]) > 0


@pytest.mark.slow
def test_training_step_predicts_only_masked_patches_with_the_same_values():
    encoder = _tiny_encoder(input_shape=(96, 64, 3))
    model = kc.FCMAE(encoder, input_shape=(96, 64, 3), decoder_dim=16, decoder_depth=2, seed=5)
    _randomize(model, seed=6)
    images = _pixels(3, 96, seed=7)[:, :, :64]
    mask = model.random_mask(3)
    full = model(images, training=False, patch_mask=mask)
    trained = model(images, training=True, patch_mask=mask)
    masked = _np(mask).astype(bool)
    assert 0 < masked.sum() < masked.size
    pred, full_pred = _np(trained["pred"]), _np(full["pred"])
    scale = np.abs(full_pred).max()
    assert scale > 0
    np.testing.assert_allclose(pred[masked], full_pred[masked], rtol=0, atol=1e-5 * scale)
    assert not pred[~masked].any()
    np.testing.assert_allclose(_np(trained["loss"]), _np(full["loss"]), rtol=1e-5)


def _gradient(fn, x):
    """d sum(fn(x)) / dx on the running backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return _np(jax.grad(lambda value: ops.sum(fn(value)))(ops.convert_to_tensor(x)))
    if backend == "tensorflow":
        import tensorflow as tf

        value = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(value)
            total = ops.sum(fn(value))
        return _np(tape.gradient(total, value))
    import torch

    value = torch.tensor(x, requires_grad=True)
    (grad,) = torch.autograd.grad(ops.sum(fn(value)), value)
    return _np(grad)


def test_gather_and_scatter_of_visible_cells_match_the_portable_formulation():
    from keras_convnext.fcmae import masking

    rng = np.random.default_rng(8)
    mask = random_patch_mask(3, (6, 5), 0.6, seed=11)
    count = visible_count(30, 0.6)
    positions = masking.VisiblePositions(mask, count)
    features = rng.normal(size=(3, 6, 5, 4)).astype("float32")
    tokens = rng.normal(size=(3, count, 4)).astype("float32")
    weights = rng.normal(size=(3, count, 4)).astype("float32")
    dense_weights = rng.normal(size=(3, 6, 5, 4)).astype("float32")
    order, restore = _np(positions.order), _np(positions.restore)
    visible = _np(mask).reshape(3, 30) == 0

    gathered = _np(positions.gather(features))
    expected = np.take_along_axis(features.reshape(3, 30, 4), order[:, :count, None], axis=1)
    np.testing.assert_array_equal(gathered, expected)
    np.testing.assert_array_equal(
        gathered, _np(masking.portable_take_rows(features.reshape(3, 30, 4), positions.visible))
    )
    assert visible[np.arange(3)[:, None], order[:, :count]].all()

    scattered = _np(positions.scatter(tokens)).reshape(3, 30, 4)
    padded = np.concatenate([tokens, np.zeros((3, 30 - count, 4), "float32")], axis=1)
    np.testing.assert_array_equal(scattered, np.take_along_axis(padded, restore, axis=1))
    np.testing.assert_array_equal(
        scattered, _np(masking.portable_scatter_rows(tokens, positions.restore))
    )
    assert not scattered[~visible].any()

    # Gradients: each operation's is the other one (exact, a permutation).
    gather_grad = _gradient(lambda x: positions.gather(x) * ops.convert_to_tensor(weights), features)
    np.testing.assert_allclose(gather_grad, _np(positions.scatter(weights)), rtol=1e-6)
    scatter_grad = _gradient(lambda t: positions.scatter(t) * ops.convert_to_tensor(dense_weights), tokens)
    np.testing.assert_allclose(scatter_grad, _np(positions.gather(dense_weights)), rtol=1e-6)
    assert np.abs(gather_grad).max() > 0 and np.abs(scatter_grad).max() > 0


def test_weights_fcmae_is_the_registry_tag_for_the_encoder(monkeypatch, tmp_path):
    """`weights="fcmae"` loads the registry's pre-trained encoder and decoder, not a file named "fcmae"."""
    from keras_convnext.weights import cache

    monkeypatch.chdir(tmp_path)  # no file named "fcmae" here
    published = kc.FCMAE("ConvNeXtV2Atto", input_shape=(64, 64, 3), decoder_dim=8)
    _randomize(published, seed=3)
    requested = []

    def converted_weights(entry, **kwargs):
        requested.append((entry.variant, entry.tag))
        decoder = {"decoder/" + name: v.numpy() for name, v in published.decoder.named_weights().items()}
        return {**{v.path: v.numpy() for v in published.encoder.weights}, **decoder}

    monkeypatch.setattr(cache, "converted_weights", converted_weights)
    model = kc.FCMAE("ConvNeXtV2Atto", input_shape=(64, 64, 3), decoder_dim=8, weights="fcmae")
    assert requested == [("ConvNeXtV2Atto", "fcmae")]
    mine = [*model.encoder.weights, *model.decoder.named_weights().values()]
    theirs = [*published.encoder.weights, *published.decoder.named_weights().values()]
    for ours, published_value in zip(mine, theirs):
        np.testing.assert_array_equal(_np(ours), _np(published_value))


@pytest.mark.slow
def test_patch_masks_of_model_random_mask_pass_the_check():
    model = kc.FCMAE(_tiny_encoder(), input_shape=(64, 64, 3), mask_ratio=0.5, decoder_dim=8, seed=1)
    mask = model.random_mask(3)
    model.check_patch_mask(mask)
    assert model.num_visible == 2 and _np(model(_pixels(3, 64), patch_mask=mask)["loss"]).shape == (3,)


@pytest.mark.parametrize("bad_value, phrase", [
    (np.full((3,), np.nan, "float32"), "NaN or infinite"),
    (np.array([1, 2, 3]), "int64 values"),
    (np.array(["a", "b", "c"]), "<U1 values"),
])
def test_fcmae_checkpoint_with_a_bad_decoder_tensor_loads_nothing(fcmae_checkpoint, bad_value, phrase):
    """The checks run over every tensor before the first assignment."""
    from keras_convnext.weights.files import read_checkpoint

    path, _, _ = fcmae_checkpoint
    state = read_checkpoint(path)
    state["pred.weight"] = np.resize(bad_value, state["pred.weight"].shape)
    encoder = kc.ConvNeXtV2Atto(include_top=False, include_preprocessing=False, input_shape=(64, 64, 3))
    model = kc.FCMAE(encoder, input_shape=(64, 64, 3), decoder_dim=24, decoder_depth=2)
    before = [_np(v) for v in model.weights]
    with pytest.raises(kc.CheckpointError, match=phrase):
        model.load_checkpoint(state)
    assert all(np.array_equal(a, _np(v)) for a, v in zip(before, model.weights))
