"""ConvNeXt as keras-hub's image encoder: pyramid_outputs, RetinaNet and DeepLabV3."""

import numpy as np
import pytest

import keras

import keras_convnext
from keras_convnext import hub
from keras_convnext.models import convnext as builder
from keras_convnext.models.pyramid import PYRAMID_LEVELS

SIZE = 64


def _keras_hub():
    return pytest.importorskip("keras_hub", reason='needs keras-hub: pip install "keras-convnext[hub]"')


def _images(count=2, seed=0, data_format="channels_last"):
    shape = (count, SIZE, SIZE, 3) if data_format == "channels_last" else (count, 3, SIZE, SIZE)
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


def _encoder(name):
    return keras_convnext.CONSTRUCTORS[name](include_top=False, input_shape=(SIZE, SIZE, 3))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_pyramid_outputs_have_strides_4_to_32(data_format):
    keras.config.set_image_data_format(data_format)
    input_shape = (SIZE, SIZE, 3) if data_format == "channels_last" else (3, SIZE, SIZE)
    model = keras_convnext.ConvNeXtV2Atto(include_top=False, input_shape=input_shape)
    dims = keras_convnext.VARIANTS["ConvNeXtV2Atto"].stage_dims
    assert list(model.pyramid_outputs) == list(PYRAMID_LEVELS)
    for level, dim in zip(PYRAMID_LEVELS, dims):
        side = SIZE // 2 ** int(level[1])
        expected = (None, side, side, dim) if data_format == "channels_last" else (None, dim, side, side)
        assert tuple(model.pyramid_outputs[level].shape) == expected, level
    # The pyramid is the model's own graph: P5 is the backbone's output.
    pyramid = keras.Model(model.inputs, model.pyramid_outputs)
    images = _images(data_format=data_format)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(pyramid(images)["P5"]),
        keras.ops.convert_to_numpy(model.predict(images, verbose=0)),
        atol=1e-5,
    )


def test_every_constructor_has_pyramid_outputs(monkeypatch):
    """Each named constructor goes through the builder, whose model has the pyramid.

    The variants' own depths and widths are replaced by tiny ones, so the
    large models are not allocated; the tiny ones are built as they are below.
    """
    built = []
    real_builder = builder.ConvNeXt

    def tiny_builder(stage_depths, stage_dims, **kwargs):
        built.append(kwargs["variant_name"])
        return real_builder((1, 1, 1, 1), (8, 8, 8, 8), **kwargs)

    monkeypatch.setattr(builder, "ConvNeXt", tiny_builder)
    for name, constructor in keras_convnext.CONSTRUCTORS.items():
        model = constructor(include_top=True, input_shape=(32, 32, 3))
        assert list(model.pyramid_outputs) == list(PYRAMID_LEVELS), name
        assert model.pyramid_outputs["P5"].shape[1:3] == (1, 1), name
    assert built == list(keras_convnext.CONSTRUCTORS)


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax",
                    reason="building the task backbones' graphs does not depend on the backend: checked in the JAX run")
def test_keras_hub_backbones_accept_every_constructor(monkeypatch):
    """RetinaNet's and DeepLabV3's backbones built on each named constructor (at tiny sizes, as above)."""
    keras_hub = _keras_hub()
    real_builder = builder.ConvNeXt
    monkeypatch.setattr(builder, "ConvNeXt", lambda depths, dims, **kwargs: real_builder((1, 1, 1, 1), (8, 8, 8, 8), **kwargs))
    for name, constructor in keras_convnext.CONSTRUCTORS.items():
        encoder = constructor(include_top=False, input_shape=(SIZE, SIZE, 3))
        retinanet = keras_hub.models.RetinaNetBackbone(
            image_encoder=encoder, min_level=3, max_level=7, use_p5=False, image_shape=(SIZE, SIZE, 3)
        )
        sides = sorted((tuple(output.shape[1:3]) for output in retinanet.outputs), reverse=True)
        assert sides == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], name
        deeplab = keras_hub.models.DeepLabV3Backbone(
            image_encoder=encoder, spatial_pyramid_pooling_key="P5", upsampling_size=8,
            dilation_rates=[1, 2], low_level_feature_key="P2", image_shape=(SIZE, SIZE, 3),
        )
        assert tuple(deeplab.output.shape[1:3]) == (SIZE, SIZE), name


def test_pyramid_outputs_survive_from_config():
    """A rebuilt model (`from_config`, as `.keras` loading does) derives its pyramid again."""
    model = keras_convnext.ConvNeXtAtto(include_top=True, input_shape=(SIZE, SIZE, 3))
    rebuilt = keras_convnext.ConvNeXtModel.from_config(model.get_config())
    assert rebuilt.pyramid_outputs is not model.pyramid_outputs
    assert {level: tuple(t.shape) for level, t in rebuilt.pyramid_outputs.items()} == {
        level: tuple(t.shape) for level, t in model.pyramid_outputs.items()
    }
    outputs = [layer.output for layer in rebuilt.layers]
    assert all(any(rebuilt.pyramid_outputs[level] is output for output in outputs) for level in PYRAMID_LEVELS)


def test_missing_keras_hub_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "keras_hub", None)
    with pytest.raises(ImportError, match=r'pip install "keras-convnext\[hub\]"'):
        hub.retinanet_detector(_encoder("ConvNeXtV2Atto"), num_classes=2)


def _assert_keras_file_round_trip(model, images, tmp_path):
    """Saves `model` as `.keras`, loads it with safe_mode=True and compares the raw outputs."""
    path = str(tmp_path / "task.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    expected = keras.tree.map_structure(keras.ops.convert_to_numpy, model(images))
    actual = keras.tree.map_structure(keras.ops.convert_to_numpy, loaded(images))
    keras.tree.map_structure(lambda a, e: np.testing.assert_allclose(a, e, atol=1e-5), actual, expected)


def _assert_detector_outputs(outputs, num_classes):
    # 9 anchors (3 scales x 3 aspect ratios) per position of levels 3-7: 8x8, 4x4, 2x2, 1x1, 1x1.
    anchors = 9 * (64 + 16 + 4 + 1 + 1)
    assert tuple(outputs["cls_logits"].shape) == (2, anchors, num_classes)
    assert tuple(outputs["bbox_regression"].shape) == (2, anchors, 4)


# Training compiles the whole task model, the slow part on CPU: each task
# trains on one ConvNeXt version and is called and saved on the other.
@pytest.mark.slow
def test_retinanet_on_convnext_v2_trains():
    _keras_hub()
    encoder = _encoder("ConvNeXtV2Atto")
    # One 3x3 convolution per head (keras-hub's default is four): a smaller step to compile.
    detector = hub.retinanet_detector(encoder, num_classes=3, pre_logits_num_conv_layers=1)
    assert detector.backbone.min_level == 3 and detector.backbone.max_level == 7
    _assert_detector_outputs(detector(_images()), 3)
    before = keras.ops.convert_to_numpy(encoder.get_layer("stem_conv").weights[0]).copy()
    detector.compile(optimizer=keras.optimizers.SGD(0.01))
    boxes = np.array([[[4, 4, 30, 30], [10, 20, 50, 60]]] * 2, "float32")
    labels = np.array([[0, 2]] * 2, "int32")
    history = detector.fit(_images(), {"boxes": boxes, "labels": labels}, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # The encoder is shared, not copied: training the detector trains it.
    after = keras.ops.convert_to_numpy(encoder.get_layer("stem_conv").weights[0])
    assert not np.allclose(before, after)


def test_retinanet_on_convnext_v1_round_trips_keras_file(tmp_path):
    _keras_hub()
    detector = hub.retinanet_detector(_encoder("ConvNeXtAtto"), num_classes=2)
    _assert_detector_outputs(detector(_images()), 2)
    _assert_keras_file_round_trip(detector, _images(seed=1), tmp_path)


@pytest.mark.slow
def test_deeplabv3_on_convnext_v1_trains():
    _keras_hub()
    encoder = _encoder("ConvNeXtAtto")
    segmenter = hub.deeplabv3_segmenter(encoder, num_classes=3, dilation_rates=(1, 2))
    assert tuple(segmenter(_images()).shape) == (2, SIZE, SIZE, 3)
    before = keras.ops.convert_to_numpy(encoder.get_layer("stem_conv").weights[0]).copy()
    segmenter.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    masks = np.random.default_rng(1).integers(0, 3, (2, SIZE, SIZE, 1))
    history = segmenter.fit(_images(), masks, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = keras.ops.convert_to_numpy(encoder.get_layer("stem_conv").weights[0])
    assert not np.allclose(before, after)


def test_deeplabv3_on_convnext_v2_round_trips_keras_file(tmp_path):
    _keras_hub()
    segmenter = hub.deeplabv3_segmenter(_encoder("ConvNeXtV2Atto"), num_classes=2, dilation_rates=(1, 2))
    assert tuple(segmenter(_images()).shape) == (2, SIZE, SIZE, 2)
    _assert_keras_file_round_trip(segmenter, _images(seed=1), tmp_path)


def _tensorflow_on_cpu_only():
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU")


def test_tasks_on_channels_first_convnext():
    _keras_hub()
    if _tensorflow_on_cpu_only():
        pytest.skip(
            "keras-hub's heads convolve in the image data format, and TensorFlow's CPU Conv2D "
            "has no channels_first (NCHW) kernel; ConvNeXt itself permutes once and runs there."
        )
    keras.config.set_image_data_format("channels_first")
    images = _images(data_format="channels_first")
    encoder = keras_convnext.ConvNeXtAtto(include_top=False, input_shape=(3, SIZE, SIZE))
    segmenter = hub.deeplabv3_segmenter(encoder, num_classes=2, dilation_rates=(1, 2))
    assert tuple(segmenter(images).shape) == (2, 2, SIZE, SIZE)
    detector = hub.retinanet_detector(encoder, num_classes=2)
    _assert_detector_outputs(detector(images), 2)


# ---------------------------------------------------------------- ConvNeXt as a keras-hub Backbone


def test_import_keras_convnext_does_not_import_keras_hub():
    import subprocess
    import sys

    code = "import sys, keras_convnext, keras_convnext.hub; print('keras_hub' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_preset_names_follow_the_registry():
    from keras_convnext.weights import registry

    names = hub.presets()
    assert names["convnext_v2_atto_imagenet"] is registry.lookup("ConvNeXtV2Atto", "imagenet")
    assert names["convnext_xlarge_imagenet22k_ft_1k_384"] is registry.lookup("ConvNeXtXLarge", "imagenet22k-ft-1k-384")
    assert not any("isotropic" in name for name in names)  # no feature pyramid, no backbone


@pytest.fixture
def registry_on_local_server(hf_v2_atto, tmp_path, monkeypatch):
    """`("ConvNeXtV2Atto", "imagenet")` served from 127.0.0.1: an official-format file of the HF reference."""
    import io

    import torch

    from keras_convnext.weights import cache, download, registry
    from local_server import LocalServer
    from naming_fixtures import hf_to_official

    buffer = io.BytesIO()
    torch.save({"model": hf_to_official({k: v.detach().clone() for k, v in hf_v2_atto.state_dict().items()})}, buffer)
    server = LocalServer()
    entry = registry.lookup("ConvNeXtV2Atto", "imagenet")
    server.files[entry.filename] = buffer.getvalue()
    monkeypatch.setitem(registry.REGISTRY, (entry.variant, entry.tag), entry._replace(url=server.url(entry.filename)))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(download.WEIGHTS_DIR_ENV, raising=False)
    yield server
    server.close()


def test_classifier_from_preset_matches_the_reference_and_round_trips(registry_on_local_server, hf_v2_atto, tmp_path):
    _keras_hub()
    from conftest import torch_logits

    classifier = hub.ConvNeXtImageClassifier.from_preset("convnext_v2_atto_imagenet", image_shape=(SIZE, SIZE, 3))
    assert isinstance(classifier.backbone, hub.ConvNeXtBackbone)
    assert len(registry_on_local_server.requests) == 1
    pixels = _images(3, seed=4)
    logits = keras.ops.convert_to_numpy(classifier(pixels))
    expected = torch_logits(hf_v2_atto, keras_convnext.normalize_imagenet(pixels))
    assert logits.shape == (3, 1000)
    assert np.abs(logits - expected).max() <= 1e-4

    # From the verified cache, without a request: a backbone whose pyramid feeds keras-hub's tasks,
    # and a 7-class classifier (fresh Dense, pretrained backbone and head LayerNorm).
    backbone = hub.ConvNeXtBackbone.from_preset("convnext_v2_atto_imagenet", image_shape=(SIZE, SIZE, 3))
    assert list(backbone.pyramid_outputs) == ["P2", "P3", "P4", "P5"]
    finetune = hub.ConvNeXtImageClassifier.from_preset("convnext_v2_atto_imagenet", num_classes=7,
                                                       image_shape=(SIZE, SIZE, 3))
    assert len(registry_on_local_server.requests) == 1
    assert tuple(finetune.output_dense.kernel.shape) == (320, 7)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(finetune.head_norm.gamma), keras.ops.convert_to_numpy(classifier.head_norm.gamma)
    )
    _assert_keras_file_round_trip(classifier, pixels, tmp_path)


def test_backbone_config_round_trip_and_task_on_it(tmp_path):
    _keras_hub()
    backbone = hub.ConvNeXtBackbone((1, 1, 1, 1), (8, 8, 16, 16), version="v1", image_shape=(SIZE, SIZE, 3))
    rebuilt = hub.ConvNeXtBackbone.from_config(backbone.get_config())
    assert rebuilt.get_config() == backbone.get_config()
    assert [tuple(w.shape) for w in rebuilt.weights] == [tuple(w.shape) for w in backbone.weights]
    assert tuple(backbone.output.shape) == (None, 2, 2, 16)
    # keras-hub's own preset folder format: save_to_preset, then from_preset of the folder.
    backbone.save_to_preset(str(tmp_path / "preset"))
    loaded = hub.ConvNeXtBackbone.from_preset(str(tmp_path / "preset"))
    images = _images()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(images)), keras.ops.convert_to_numpy(backbone(images)), atol=1e-5
    )
    segmenter = hub.deeplabv3_segmenter(backbone, num_classes=2, dilation_rates=(1, 2))
    assert tuple(segmenter(images).shape) == (2, SIZE, SIZE, 2)


def test_encoder_only_preset_needs_num_classes():
    _keras_hub()
    with pytest.raises(ValueError, match="pass num_classes="):
        hub.ConvNeXtImageClassifier.from_preset("convnext_v2_atto_fcmae")
