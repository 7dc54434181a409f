import numpy as np
import pytest

import keras

import keras_convnext as kc
from keras_convnext.layers import block as block_module
from keras_convnext.models import convnext as convnext_module
from keras_convnext.models import model as model_module

# Trainable parameters of the reference implementations (timm / official), classes=1000.
REFERENCE_PARAMS = {
    "ConvNeXtV2Atto": 3_708_400,
    "ConvNeXtV2Femto": 5_233_240,
    "ConvNeXtV2Pico": 9_066_280,
    "ConvNeXtV2Nano": 15_623_800,
    "ConvNeXtV2Tiny": 28_635_496,
    "ConvNeXtV2Base": 88_717_800,
    "ConvNeXtV2Large": 197_956_840,
    "ConvNeXtV2Huge": 660_289_640,
    "ConvNeXtAtto": 3_695_520,
    "ConvNeXtFemto": 5_217_784,
    "ConvNeXtPico": 9_045_672,
    "ConvNeXtNano": 15_593_560,
    "ConvNeXtTiny": 28_589_128,
    "ConvNeXtSmall": 50_223_688,
    "ConvNeXtBase": 88_591_464,
    "ConvNeXtLarge": 197_767_336,
    "ConvNeXtXLarge": 350_196_968,
}


@pytest.fixture
def cheap_init(monkeypatch):
    """Zero initialization: counting the parameters of Huge needs no random numbers."""
    monkeypatch.setattr(block_module, "kernel_init", lambda: "zeros")
    monkeypatch.setattr(convnext_module, "kernel_init", lambda: "zeros")


def test_every_reference_variant_has_a_constructor():
    assert set(REFERENCE_PARAMS) == set(kc.CONSTRUCTORS) == set(kc.VARIANTS)
    for name in REFERENCE_PARAMS:
        assert getattr(kc, name) is kc.CONSTRUCTORS[name]


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_matches_reference(name, cheap_init):
    model = kc.CONSTRUCTORS[name](input_shape=(32, 32, 3))
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == REFERENCE_PARAMS[name]
    assert len(model.non_trainable_weights) == 0


def test_same_shaped_layers_start_with_different_weights():
    model = kc.ConvNeXt((1, 1, 2, 1), (8, 16, 24, 32), classes=3, input_shape=(32, 32, 3))
    first, second = model.get_layer("stage2_block0"), model.get_layer("stage2_block1")
    for name in ("dwconv", "pwconv1", "pwconv2"):
        a = keras.ops.convert_to_numpy(getattr(first, name).kernel)
        b = keras.ops.convert_to_numpy(getattr(second, name).kernel)
        assert not np.allclose(a, b), name
        assert 0.01 < a.std() < 0.03  # truncated normal, std 0.02


def test_generic_builder_custom_size():
    model = kc.ConvNeXt((1, 1, 2, 1), (8, 16, 24, 32), version="v1", classes=5, input_shape=(40, 56, 3))
    assert model.output_shape == (None, 5)
    assert len([l for l in model.layers if l.name.startswith("stage2_block")]) == 2
    assert model.get_layer("stage0_block0").layer_scale is not None


@pytest.mark.parametrize("height,width", [(32, 32), (45, 70), (100, 33)])
def test_stage_features_follow_pytorch_floor_sizes(height, width):
    model = kc.ConvNeXtV2Atto(include_top=False)
    features = kc.stage_features(model)
    outputs = features.predict(np.zeros((1, height, width, 3), "float32"), verbose=0)
    h, w = height // 4, width // 4
    for stage, output in enumerate(outputs):
        if stage:
            h, w = h // 2, w // 2
        assert output.shape == (1, h, w, (40, 80, 160, 320)[stage])


def test_pooling_and_top_options():
    assert kc.ConvNeXtAtto(include_top=False, pooling="avg").output_shape == (None, 320)
    assert kc.ConvNeXtAtto(include_top=False, pooling="max").output_shape == (None, 320)
    assert kc.ConvNeXtAtto(include_top=False, input_shape=(64, 96, 3)).output_shape == (None, 2, 3, 320)
    model = kc.ConvNeXtV2Atto(classes=7, classifier_activation=None)
    assert model.output_shape == (None, 7)
    assert "activation" not in [layer.name for layer in model.layers]
    with pytest.raises(ValueError, match="pooling"):
        kc.ConvNeXtV2Atto(include_top=False, pooling="mean")


def test_input_tensor_is_used():
    tensor = keras.Input((64, 64, 3))
    model = kc.ConvNeXtV2Atto(input_tensor=tensor, classes=3)
    assert model.inputs[0] is tensor


@pytest.mark.parametrize(
    "input_shape,match",
    [
        ((16, 16, 3), "at least 32x32"),
        ((64, 3), "needs 3 entries"),
        ((64, 64, 0), "positive integer or None; got 0"),
        ((64.0, 64, 3), "positive integer or None; got 64.0"),
        ((None, None, None), "leaves the number of channels unknown"),
        (5, "input_shape must be a tuple"),
    ],
)
def test_bad_input_shapes_are_named(input_shape, match):
    with pytest.raises(ValueError, match=match):
        kc.ConvNeXtV2Atto(input_shape=input_shape)


def test_channels_last_input_shape_under_channels_first_is_named():
    keras.config.set_image_data_format("channels_first")
    with pytest.raises(ValueError, match=r"channels unknown \(\(channels, height, width\) for channels_first"):
        kc.ConvNeXtV2Atto(input_shape=(None, None, 3))


@pytest.mark.parametrize(
    "tensor,match",
    [
        (lambda: keras.Input((16, 16, 3)), r"at least 32x32 pixels; got input_tensor of shape \(None, 16, 16, 3\)"),
        (lambda: keras.Input((None, None, None)), "leaves the number of channels unknown"),
        (lambda: keras.Input((64, 3)), r"batch of images, \(batch,\) \+ \(height, width, channels\)"),
        (lambda: np.zeros((1, 64, 64, 3), "float32"), "must be a Keras tensor"),
    ],
    ids=["tiny", "unknown-channels", "rank-3", "array"],
)
def test_bad_input_tensors_are_named(tensor, match):
    with pytest.raises(ValueError, match=match):
        kc.ConvNeXtV2Atto(input_tensor=tensor())


@pytest.mark.parametrize(
    "arguments,match",
    [
        (dict(classes=0), "classes must be a positive integer with include_top=True; got 0"),
        (dict(classes=-3), "classes must be a positive integer"),
        (dict(classes=2.5), "got 2.5"),
        (dict(classes="10"), "got '10'"),
        (dict(classes=True), "got True"),
        (dict(drop_path_rate=-0.1), r"drop_path_rate .* a number in \[0, 1\); got -0.1"),
        (dict(drop_path_rate=1.0), r"in \[0, 1\); got 1.0"),
        (dict(drop_path_rate=float("nan")), "got nan"),
        (dict(drop_path_rate="0.1"), "got '0.1'"),
        (dict(pooling="mean"), "pooling"),
        (dict(classifier_activation="softmaxx"), "classifier_activation must be None .*got 'softmaxx'"),
        (dict(classifier_activation=3), "classifier_activation .*got 3"),
        (dict(name=5), "name must be a string; got 5"),
    ],
)
def test_bad_constructor_arguments_are_named(arguments, match):
    with pytest.raises(ValueError, match=match):
        kc.ConvNeXtV2Atto(**arguments)


@pytest.mark.parametrize(
    "arguments,match",
    [
        (dict(stage_depths=2, stage_dims=(8, 8, 8, 8)), "stage_depths and stage_dims need four entries each; got 2 and"),
        (dict(stage_depths=None, stage_dims=(8, 8, 8, 8)), "need four entries each; got None and"),
        (dict(stage_depths=(1, 1, 1, 1), stage_dims=None), r"need four entries each; got \(1, 1, 1, 1\) and None"),
        (dict(stage_depths=(1, 1, 1, 1), stage_dims=(8, 8, 8, 8), kernel_size=6), "kernel_size must be an odd positive integer.*got 6"),
        (dict(stage_depths=(1, 1, 1, 1), stage_dims=(8, 8, 8, 8), kernel_size=7.0), "got 7.0"),
    ],
)
def test_bad_builder_arguments_are_named(arguments, match):
    with pytest.raises(ValueError, match=match):
        kc.ConvNeXt(input_shape=(32, 32, 3), **arguments)


def test_classes_are_not_checked_without_a_head():
    """As keras.applications: `classes` means nothing with include_top=False."""
    assert kc.ConvNeXtAtto(include_top=False, classes=None, pooling="avg").output_shape == (None, 320)
    assert kc.ConvNeXtAtto(classes=np.int64(5)).output_shape == (None, 5)


@pytest.fixture(scope="module")
def small_rgb_model():
    return kc.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), classes=3)  # any input size


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 24, 40, 3), r"downsamples by 32, so images must be at least 32x32 pixels; got 24x40"),
        ((1, 32, 32, 1), r"3 channels \(RGB\).*with 1 channel\. Repeat a grayscale channel .*np\.repeat"),
        ((1, 32, 32, 4), r"takes images with 3 channels \(RGB\).*got images of shape \(1, 32, 32, 4\)"),
        ((1, 3, 32, 32), "The images look channels_first"),
        ((32, 32, 3), r"batch of images.*For a single image, add a batch axis: images\[None\]"),
        ((1, 1, 32, 32, 3), r"got an array of shape \(1, 1, 32, 32, 3\)"),
    ],
    ids=["small", "grayscale", "rgba", "channels-first", "one-image", "rank-5"],
)
@pytest.mark.parametrize("how", ["call", "predict"])
def test_bad_images_are_named_before_anything_runs(small_rgb_model, shape, match, how):
    images = np.zeros(shape, "float32")
    run = small_rgb_model if how == "call" else lambda x: small_rgb_model.predict(x, verbose=0)
    with pytest.raises(ValueError, match=match):
        run(images)


def test_a_model_of_fixed_size_names_it():
    model = kc.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), classes=3, input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match=r"built for 64x64 images \(its input_shape\); got 32x32"):
        model(np.zeros((1, 32, 32, 3), "float32"))
    symbolic = keras.Input((None, None, 1))
    with pytest.raises(ValueError, match="3 channels"):
        model(symbolic)


def test_a_failed_predict_leaves_the_model_working():
    """Keras' JAX trainer detaches the weights during predict; one failure used to lose them."""
    model = kc.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), classes=3)
    images = np.random.default_rng(5).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    with pytest.raises(ValueError, match="at least 32x32"):
        model.predict(np.zeros((1, 16, 16, 3), "float32"), verbose=0)
    expected = model.predict(images, verbose=0)

    def small_batches():  # a generator's shapes cannot be checked in advance
        yield (np.zeros((1, 16, 16, 3), "float32"),)

    with pytest.raises(ValueError, match="32x32|2x2 patches"):
        model.predict(small_batches(), steps=1, verbose=0)
    np.testing.assert_array_equal(model.predict(images, verbose=0), expected)


@pytest.mark.parametrize("kind", ["arrays", "tf.data", "fcmae"])
def test_the_training_state_is_built_before_the_training_step_is_traced(kind):
    """The optimizer (and on TensorFlow the metrics) exist when `fit` first runs the step;
    on TensorFlow the step is then traced once, not again after it made them."""
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, size=(8, 64, 64, 3)).astype("float32")
    if kind == "fcmae":
        encoder = kc.ConvNeXt((1, 1, 1, 1), (8, 8, 16, 16), version="v2", include_top=False, input_shape=(64, 64, 3))
        model = kc.FCMAE(encoder, input_shape=(64, 64, 3), decoder_dim=8)
        model.compile(optimizer="adamw")
        data = {"x": images, "batch_size": 4}
    else:
        model = kc.ConvNeXt((1, 1, 1, 1), (8, 8, 16, 16), input_shape=(64, 64, 3), classes=3,
                            classifier_activation=None)
        model.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        labels = rng.integers(0, 3, 8)
        data = {"x": images, "y": labels, "batch_size": 4}
        if kind == "tf.data":
            import tensorflow as tf

            data = {"x": tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)}
    built_at_each_step = []
    step = model.train_step

    def recorded_step(*arguments):  # JAX's step takes the state first
        built_at_each_step.append(model.optimizer.built)
        return step(*arguments)

    model.train_step = recorded_step
    history = model.fit(**data, epochs=1, verbose=0)
    assert built_at_each_step and all(built_at_each_step)
    assert np.isfinite(history.history["loss"][0])
    if kind != "fcmae":
        assert 0 <= history.history["accuracy"][0] <= 1
    if keras.backend.backend() == "tensorflow":
        assert len(built_at_each_step) == 1  # traced once for both batches


def test_a_failed_fit_leaves_the_model_trainable():
    """After a first fit that fails inside Keras' step, weights and optimizer still work (TensorFlow
    refused to trace its step function again, JAX had detached every variable)."""
    model = kc.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), classes=2, classifier_activation=None)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images = np.random.default_rng(6).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    labels = np.array([0, 1])
    expected = model.predict(images, verbose=0)

    def small_batches():
        yield np.zeros((2, 16, 16, 3), "float32"), labels

    with pytest.raises(ValueError, match="32x32|2x2 patches"):
        model.fit(small_batches(), steps_per_epoch=1, epochs=1, verbose=0)
    np.testing.assert_array_equal(model.predict(images, verbose=0), expected)
    history = model.fit(images, labels, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.array_equal(model.predict(images, verbose=0), expected)


@pytest.mark.slow
def test_channels_first_equals_channels_last():
    images = np.random.default_rng(0).uniform(0, 255, size=(2, 48, 64, 3)).astype("float32")
    last = kc.ConvNeXtV2Atto(classifier_activation=None)
    expected = last.predict(images, verbose=0)
    features_last = kc.stage_features(kc.ConvNeXtV2Atto(include_top=False))
    keras.config.set_image_data_format("channels_first")
    first = kc.ConvNeXtV2Atto(classifier_activation=None)
    assert first.input_shape == (None, 3, None, None)
    first.set_weights(last.get_weights())
    nchw = np.transpose(images, (0, 3, 1, 2))
    np.testing.assert_allclose(first.predict(nchw, verbose=0), expected, atol=1e-4)
    backbone = kc.ConvNeXtV2Atto(include_top=False)
    backbone.set_weights(features_last.get_weights())
    outputs = kc.stage_features(backbone).predict(nchw, verbose=0)
    assert [o.shape for o in outputs] == [
        (2, 40, 12, 16), (2, 80, 6, 8), (2, 160, 3, 4), (2, 320, 1, 2)
    ]


def test_keras_file_roundtrip(tmp_path):
    model = kc.ConvNeXtAtto(classes=4, drop_path_rate=0.1, input_shape=(48, 48, 3))
    images = np.random.default_rng(1).uniform(0, 255, size=(2, 48, 48, 3)).astype("float32")
    expected = model.predict(images, verbose=0)
    path = tmp_path / "atto.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert type(reloaded) is kc.ConvNeXtModel
    np.testing.assert_array_equal(reloaded.predict(images, verbose=0), expected)
    assert reloaded.get_layer("stage2_block5").get_config() == model.get_layer("stage2_block5").get_config()
    assert not _unbuilt_layers(reloaded)


def _unbuilt_layers(model):
    return sorted({layer.name for layer in model._flatten_layers() if not layer.built})


@pytest.mark.parametrize(
    "build",
    [
        lambda: kc.ConvNeXt((1, 1, 1, 1), (8, 16, 16, 32), version="v1", classes=3, drop_path_rate=0.1),
        lambda: kc.ConvNeXt((1, 1, 1, 1), (8, 16, 16, 32), include_top=False, pooling="avg", drop_path_rate=0.1),
        lambda: kc.FCMAE("ConvNeXtV2Atto", input_shape=(64, 64, 3), decoder_dim=16, drop_path_rate=0.1),
    ],
    ids=["v1", "v2-features", "fcmae"],
)
def test_every_sublayer_counts_as_built_with_stochastic_depth(build):
    """Keras' JAX `predict` and `predict_on_batch` build a model one of whose
    sublayers is not built by running it eagerly, one compiled operation at a
    time, on every call (V2 Tiny, batch 8: 3.3 instead of 1.0 s per
    `predict_on_batch`); every backend's `train_on_batch` traces it symbolically
    each step. Stochastic depth has no weights and was never built."""
    assert not _unbuilt_layers(build())


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_is_finite_and_close(policy):
    images = np.random.default_rng(2).uniform(0, 255, size=(4, 64, 64, 3)).astype("float32")
    # A shallow V2 (every layer kind, fewer blocks) keeps the three compilations short.
    build = lambda: kc.ConvNeXt((1, 1, 2, 1), (16, 32, 64, 128), classes=10, classifier_activation=None)
    reference = build()
    expected = reference.predict(images, verbose=0)
    keras.config.set_dtype_policy(policy)
    model = build()
    model.set_weights(reference.get_weights())
    assert model.get_layer("stage0_block0").compute_dtype == policy.split("_")[1]
    logits = np.asarray(model.predict(images, verbose=0), "float32")
    assert np.all(np.isfinite(logits))
    spread = np.abs(expected).max()
    assert np.abs(logits - expected).max() < 0.1 * spread
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(images, np.arange(4) % 10, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_fit_with_drop_path_lowers_loss():
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, size=(8, 32, 32, 3)).astype("float32")
    labels = np.arange(8) % 2
    images[labels == 1] *= 0.2  # two easily separated classes
    model = kc.ConvNeXt((1, 1, 1, 1), (16, 32, 48, 64), classes=2, drop_path_rate=0.2)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy")
    history = model.fit(images, labels, epochs=8, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_training_survives_a_dead_channel_in_a_one_position_stage():
    """A GELU output that is exactly 0 everywhere in a channel leaves the training step finite.

    At 32x32 inputs the last stage has one position, so one GELU output of
    exactly 0 (PyTorch's GELU below about -5.9; every backend's far below)
    zeroes that channel's GRN norm, whose gradient must then be 0, as in the
    reference model, not NaN.
    """
    images = np.random.default_rng(4).uniform(0, 255, size=(4, 32, 32, 3)).astype("float32")
    model = kc.ConvNeXt((1, 1, 1, 1), (16, 32, 48, 64), classes=2, classifier_activation=None)
    pwconv1 = model.get_layer("stage3_block0").pwconv1
    bias = np.array(pwconv1.bias)
    bias[5] = -1000.0  # channel 5 of the widened map is dead for every image
    pwconv1.bias.assign(bias)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_fn)
    loss = model.train_on_batch(images, np.arange(4) % 2)
    assert np.isfinite(loss)
    assert all(np.isfinite(np.asarray(w)).all() for w in model.trainable_weights)


def test_readme_variant_table_matches_the_code():
    import pathlib
    import re

    from keras_convnext.models.variants import multiply_adds

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| `(ConvNeXt\w+)` \| [^|]+ \| (\([^|]+\)) \| (\([^|]+\)) \| ([\d.]+) \| ([\d.]+) \|$", readme, re.M)
    assert {row[0] for row in rows} == set(kc.VARIANTS)
    for name, depths, dims, params, gmacs in rows:
        variant = kc.VARIANTS[name]
        assert depths == str(variant.stage_depths) and dims == str(variant.stage_dims)
        assert params == f"{REFERENCE_PARAMS[name] / 1e6:.2f}"
        assert gmacs == f"{multiply_adds(variant.stage_depths, variant.stage_dims) / 1e9:.3f}"


@pytest.mark.slow
def test_torch_jit_compile_predicts_as_eager(monkeypatch):
    """`compile(jit_compile=True)` on PyTorch runs torch.compile over the model's fast paths.

    Eager inference uses oneDNN's internal product, which torch.compile cannot
    lower; while compiling, the model must take the plain operations instead,
    and the functional graph rather than the layer chain (whose discovery,
    traced, exceeded the recursion limit on V2 Tiny).
    """
    if keras.backend.backend() != "torch":
        pytest.skip("torch.compile is the PyTorch backend's jit_compile")
    keras.utils.set_random_seed(3)
    model = kc.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), input_shape=(32, 32, 3), classes=5,
                        classifier_activation=None, include_preprocessing=False)
    images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype("float32")
    eager = model.predict_on_batch(images)
    model.compile(jit_compile=True)

    def no_chain(*args, **kwargs):
        raise AssertionError("the layer chain ran under torch.compile")

    monkeypatch.setattr(kc.ConvNeXtModel, "call_layer_chain", no_chain)
    compiled = model.predict_on_batch(images)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)
    assert np.abs(eager).max() > 1e-3  # a real output, not zeros


def _graph_output(model, images):
    """The model's output through Keras' functional graph, every layer through `Layer.__call__`."""
    from keras.src.models.functional import Functional

    return keras.ops.convert_to_numpy(Functional.call(model, keras.ops.convert_to_tensor(images)))


@pytest.mark.parametrize(
    "version,data_format,policy",
    [
        ("v2", "channels_last", "float32"),
        ("v1", "channels_first", "float32"),
        ("v2", "channels_last", "bfloat16"),
        ("v1", "channels_last", "mixed_bfloat16"),
    ],
)
def test_layer_chain_equals_the_functional_graph(version, data_format, policy):
    keras.config.set_image_data_format(data_format)
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(4)
    layer_scale = None if version == "v2" else 0.5
    model = kc.ConvNeXt((1, 1, 2, 1), (8, 16, 24, 32), version=version, classes=5, layer_scale_init_value=layer_scale)
    shape = (2, 40, 48, 3) if data_format == "channels_last" else (2, 3, 40, 48)
    images = np.random.default_rng(4).uniform(0, 255, size=shape).astype("float32")
    chain = model.layer_chain()
    assert [layer.name for layer in chain] == [layer.name for layer in model.layers[1:]]
    expected = _graph_output(model, images)
    assert expected.shape == (2, 5) and np.std(expected) > 1e-3
    # A bfloat16 model still ends in a float32 softmax: the chain casts each
    # input as Layer.__call__ does. Under mixed_bfloat16 the head's Dense reads
    # its float32 kernel in bfloat16 only inside Keras' autocast scope.
    assert expected.dtype == np.float32
    got = keras.ops.convert_to_numpy(model.call_layer_chain(images))
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # Integer pixels reach the preprocessing layer unconverted, as through Layer.__call__.
    pixels = images.astype("uint8")
    from_pixels = keras.ops.convert_to_numpy(model.call_layer_chain(pixels))
    np.testing.assert_allclose(from_pixels, _graph_output(model, pixels), rtol=1e-6, atol=1e-7)


def _mixed_model_with_a_float32_head():
    """A `mixed_bfloat16` ConvNeXtModel (LayerNorm, pooling) ending in a float32 Dense, and its inputs."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(7)
    inputs = keras.Input((8, 8, 16))
    x = kc.layers.LayerNorm(name="norm")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, dtype="float32", name="float32_head")(x)
    features = np.random.default_rng(7).normal(size=(2, 8, 8, 16)).astype("float32")
    return kc.ConvNeXtModel(inputs, outputs), features


def test_layer_chain_enters_the_autocast_scopes_of_layer_call():
    """A float32 layer inside a mixed model reads its variables in float32, as through Layer.__call__.

    The model's own call opens a bfloat16 autocast scope around the chain;
    a float32 Dense inside it needs its own float32 scope.
    """
    from keras.src.backend import AutocastScope

    model, features = _mixed_model_with_a_float32_head()
    with AutocastScope("bfloat16"):
        got = keras.ops.convert_to_numpy(model.call_layer_chain(features))
        expected = _graph_output(model, features)
    assert got.dtype == expected.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_pytorch_inference_takes_the_layer_chain_and_training_the_graph(monkeypatch):
    if keras.backend.backend() != "torch":
        pytest.skip("only eager PyTorch calls the layer chain (TensorFlow and JAX trace a graph)")
    from keras.src.models.functional import Functional

    model = kc.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), input_shape=(32, 32, 3), classes=3)
    images = np.random.default_rng(5).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    labels = np.array([0, 2])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.train_on_batch(images, labels)  # builds the training step before the patches
    expected = model.predict_on_batch(images)
    graph_call = Functional.call

    def no_graph(*args, **kwargs):
        raise AssertionError("the functional graph ran")

    def no_chain(*args, **kwargs):
        raise AssertionError("the layer chain ran")

    monkeypatch.setattr(Functional, "call", no_graph)
    np.testing.assert_array_equal(model.predict_on_batch(images), expected)
    assert keras.ops.convert_to_numpy(model(images, training=False)).shape == (2, 3)
    with pytest.raises(AssertionError, match="graph ran"):
        model(images, training=True)
    seen = []
    hook = model.get_layer("stage0_block0").register_forward_hook(lambda *args: seen.append(args))
    with pytest.raises(AssertionError, match="graph ran"):
        model.predict_on_batch(images)  # a PyTorch hook needs Layer.__call__
    monkeypatch.setattr(Functional, "call", graph_call)
    model.predict_on_batch(images)
    assert len(seen) == 1
    hook.remove()
    monkeypatch.setattr(kc.ConvNeXtModel, "call_layer_chain", no_chain)
    assert np.isfinite(model.train_on_batch(images, labels))
    with pytest.raises(AssertionError, match="chain ran"):
        model.predict_on_batch(images)


def _any_size_logits_model():
    """A small ConvNeXt V2 for any image size, with logits out, and two 48x48 images."""
    keras.utils.set_random_seed(6)
    model = kc.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), input_shape=(None, None, 3), classes=4,
                        classifier_activation=None)
    images = np.random.default_rng(6).uniform(0, 255, size=(2, 48, 48, 3)).astype("float32")
    return model, images


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_eager_jax_call_runs_compiled_with_current_weights(policy):
    """On JAX, `model(x)` on concrete arrays runs one jitted program per input shape.

    Its output equals the functional graph run op by op; weights assigned
    after the first call are the ones used; training calls, stateless calls
    and calls inside a user's `jax.jit` keep the graph.
    """
    if keras.backend.backend() != "jax":
        pytest.skip("the compiled eager call is JAX's")
    import jax

    keras.config.set_dtype_policy(policy)
    model, images = _any_size_logits_model()
    expected = _graph_output(model, images)
    tolerance = 1e-5 if policy == "float32" else 2e-2
    # A training call keeps the graph: no program yet. (The input shape is the
    # graph run's, so its operations are already compiled one by one.)
    compiled = model.jax_compiled_inference()
    trained = keras.ops.convert_to_numpy(model(images, training=True))
    assert compiled._cache_size() == 0
    np.testing.assert_allclose(trained, expected, rtol=tolerance, atol=tolerance)
    got = keras.ops.convert_to_numpy(model(images))
    assert got.dtype == expected.dtype and np.std(expected.astype("float32")) > 1e-3
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    assert compiled._cache_size() == 1
    model(images[:, :32, :32])
    model(images)
    assert compiled._cache_size() == 2  # one program per input shape

    head = model.get_layer("predictions")
    head.bias.assign(head.bias.numpy() + 1.0)
    shifted = keras.ops.convert_to_numpy(model(images))
    np.testing.assert_allclose(shifted, got + 1.0, rtol=tolerance, atol=tolerance)

    # A new input shape inside a user's jit: the compiled path would add a program.
    jax.jit(lambda x: model(x))(images[:, :32, :40])
    assert compiled._cache_size() == 2
    # A stateless call uses the values it is given, not the variables'.
    trainable = [v.value for v in model.trainable_variables]
    bias_index = [v.path for v in model.trainable_variables].index(head.bias.path)
    trainable[bias_index] = trainable[bias_index] - 1.0
    outputs, _ = model.stateless_call(trainable, [v.value for v in model.non_trainable_variables], images)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(outputs), got, rtol=tolerance, atol=tolerance)


def _compiled_eager_programs(model):
    """How many programs the compiled eager call of `model` has traced (JAX and TensorFlow)."""
    if keras.backend.backend() == "jax":
        return model.jax_compiled_inference()._cache_size()
    return model.tensorflow_compiled_inference().experimental_get_tracing_count()


def test_eager_tensorflow_call_runs_a_traced_function_with_current_weights():
    """On TensorFlow, `model(x)` eagerly runs a `tf.function` of the model, gradients included."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the traced eager call is TensorFlow's")
    import tensorflow as tf
    from keras.src.models.functional import Functional

    model, images = _any_size_logits_model()
    expected = _graph_output(model, images)
    got = keras.ops.convert_to_numpy(model(images))
    assert np.std(expected) > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert _compiled_eager_programs(model) == 1
    model(images)
    assert _compiled_eager_programs(model) == 1

    head = model.get_layer("predictions")
    head.bias.assign(head.bias.numpy() + 1.0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images)), got + 1.0, rtol=1e-5, atol=1e-5)
    model(images[:1], training=True)  # the functional graph: no new trace
    assert _compiled_eager_programs(model) == 1

    pixels = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(pixels)
        score = tf.reduce_sum(model(pixels)[:, 0])
    gradient = tape.gradient(score, pixels).numpy()
    with tf.GradientTape() as tape:
        tape.watch(pixels)
        graph_score = tf.reduce_sum(Functional.call(model, pixels)[:, 0])
    np.testing.assert_allclose(gradient, tape.gradient(graph_score, pixels).numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(gradient).max() > 0


def test_compiled_calls_off_run_the_graph_with_the_same_result():
    """`config.compiled_calls(False)`: an eager call compiles nothing; the next call, with the
    default back, compiles one program; both give the functional graph's output."""
    if keras.backend.backend() not in ("jax", "tensorflow"):
        pytest.skip("JAX and TensorFlow compile the eager call")
    from keras_convnext import config

    model, images = _any_size_logits_model()
    expected = _graph_output(model, images)
    with config.compiled_calls(False):
        assert not config.compiled_calls_enabled()
        uncompiled = keras.ops.convert_to_numpy(model(images))
    assert _compiled_eager_programs(model) == 0
    compiled = keras.ops.convert_to_numpy(model(images))
    assert _compiled_eager_programs(model) == 1
    assert np.std(expected) > 1e-3
    np.testing.assert_allclose(uncompiled, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compiled, expected, rtol=1e-5, atol=1e-5)


def test_eager_call_equals_predict_with_a_float32_layer_in_a_mixed_model():
    """The compiled eager call is traced as `predict` is, not inside the call's autocast scope."""
    if keras.backend.backend() not in ("jax", "tensorflow"):
        pytest.skip("JAX and TensorFlow compile the eager call")
    model, features = _mixed_model_with_a_float32_head()
    got = keras.ops.convert_to_numpy(model(features))
    assert _compiled_eager_programs(model) == 1
    expected = model.predict_on_batch(features)
    assert got.dtype == expected.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, _graph_output(model, features), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "first_layer",
    # A layer type the chain does not know, and a known call path with a keyword argument.
    [lambda: keras.layers.Rescaling(2.0, name="scale"), lambda: keras.layers.RandomFlip(name="flip")],
)
def test_layer_chain_declines_other_graphs_and_quantized_layers(first_layer):
    inputs = keras.Input((32, 32, 3))
    model = kc.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), input_tensor=first_layer()(inputs), classes=3)
    assert model.layer_chain() is None
    with pytest.raises(ValueError, match="not a single chain"):
        model.call_layer_chain(np.zeros((1, 32, 32, 3), "float32"))
    images = np.random.default_rng(6).uniform(0, 255, size=(1, 32, 32, 3)).astype("float32")
    assert model.predict_on_batch(images).shape == (1, 3)
    block_inputs = keras.Input((8, 8, 16))
    always_training = kc.layers.ConvNeXtBlock(drop_path_rate=0.5)(block_inputs, training=True)
    assert kc.ConvNeXtModel(block_inputs, always_training).layer_chain() is None
    keras.config.set_dtype_policy("mixed_bfloat16")
    mixed = kc.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), classes=3)
    assert model_module._direct_calls_apply(mixed.layer_chain())
    mixed.get_layer("predictions").quantize("int8")  # Layer.__call__ runs its quantized_call
    assert mixed.layer_chain() is not None
    assert not model_module._direct_calls_apply(mixed.layer_chain())
