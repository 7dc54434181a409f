"""keras.applications compatibility: the checks of Keras' own applications_test.py, on our constructors.

Keras' `keras/src/applications/applications_test.py` checks each application
for variable input channels (1 and 4), custom input shapes and tensors,
pooling, the classifier activation, and the preprocess / predict / decode
round trip, in both data formats. The same checks run here on the smallest
variants (V1 and V2 Atto) with small inputs and random weights (no download),
and our ImageNet helpers are compared with keras.applications' own.
"""

import numpy as np
import pytest

import keras

import keras_convnext as kc

DATA_FORMATS = ["channels_last", "channels_first"]
# (constructor, channels of the last stage)
APPLICATIONS = [(kc.ConvNeXtAtto, 320), (kc.ConvNeXtV2Atto, 320)]
APPLICATION_IDS = ["ConvNeXtAtto", "ConvNeXtV2Atto"]

# Class names of keras.applications' imagenet_class_index.json.
KERAS_CLASS_NAMES = {
    0: ("n01440764", "tench"),
    134: ("n02012849", "crane"),
    281: ("n02123045", "tabby"),
    386: ("n02504458", "African_elephant"),
    517: ("n03126707", "crane"),
    607: ("n03590841", "jack-o'-lantern"),
    639: ("n03710721", "maillot"),
    986: ("n12057211", "yellow_lady's_slipper"),
    999: ("n15075141", "toilet_tissue"),
}


def image_shape(data_format, height, width, channels):
    if data_format == "channels_first":
        return (channels, height, width)
    return (height, width, channels)


@pytest.fixture(params=DATA_FORMATS)
def data_format(request):
    keras.config.set_image_data_format(request.param)  # conftest restores channels_last
    return request.param


@pytest.mark.parametrize("app,last_dim", APPLICATIONS, ids=APPLICATION_IDS)
def test_notop_variable_input_channels(app, last_dim, data_format):
    if data_format == "channels_first":
        expected = [None, last_dim, None, None]
    else:
        expected = [None, None, None, last_dim]
    for channels in (1, 4):
        model = app(weights=None, include_top=False, input_shape=image_shape(data_format, None, None, channels))
        assert list(model.outputs[0].shape) == expected
        # The RGB statistics do not apply: the images reach the stem as given.
        assert "preprocessing" not in [layer.name for layer in model.layers]


@pytest.mark.parametrize("app,last_dim", APPLICATIONS, ids=APPLICATION_IDS)
def test_notop_custom_input_shape(app, last_dim, data_format):
    model = app(weights=None, include_top=False, input_shape=image_shape(data_format, 45, 45, 3))
    channel_axis = 1 if data_format == "channels_first" else -1
    assert model.outputs[0].shape[channel_axis] == last_dim
    assert "preprocessing" in [layer.name for layer in model.layers]


@pytest.mark.parametrize("app,last_dim", APPLICATIONS, ids=APPLICATION_IDS)
def test_notop_custom_input_tensor(app, last_dim, data_format):
    inputs = keras.Input(shape=image_shape(data_format, 64, 64, 4), name="custom_input")
    rgb = keras.layers.Conv2D(3, (2, 2), padding="valid", strides=(2, 2))(inputs)
    model = app(weights=None, include_top=False, input_tensor=rgb)
    channel_axis = 1 if data_format == "channels_first" else -1
    assert model.outputs[0].shape[channel_axis] == last_dim
    assert model.inputs[0] is inputs


@pytest.mark.parametrize("app,last_dim", APPLICATIONS, ids=APPLICATION_IDS)
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_pooling(app, last_dim, pooling, data_format):
    model = app(weights=None, include_top=False, pooling=pooling)
    assert list(model.outputs[0].shape) == [None, last_dim]


@pytest.mark.parametrize("app", [app for app, _ in APPLICATIONS], ids=APPLICATION_IDS)
def test_classifier_activation_and_classes(app):
    model = app(weights=None, include_top=True, classifier_activation="softmax")
    assert model.layers[-1].activation.__name__ == "softmax"
    assert list(model.outputs[0].shape) == [None, 1000]
    model = app(weights=None, classes=7, classifier_activation=None)
    assert list(model.outputs[0].shape) == [None, 7]
    assert model.layers[-1].name == "predictions"  # logits: no activation layer


@pytest.mark.parametrize("app", [app for app, _ in APPLICATIONS], ids=APPLICATION_IDS)
def test_preprocess_predict_decode_and_serialization(app, data_format):
    """Keras' `test_application_base`, without the download: random weights, a random photo."""
    model = app(weights=None)
    pixels = np.random.default_rng(0).uniform(0, 255, size=(1,) + image_shape(data_format, 32, 32, 3))
    pixels = pixels.astype("float32")
    inputs = kc.preprocess_input(pixels)
    assert inputs is pixels
    predictions = model.predict(inputs, verbose=0)
    decoded = kc.decode_predictions(predictions)
    assert len(decoded) == 1 and len(decoded[0]) == 5
    expected = np.argsort(-predictions[0])[:5]
    short_names = {wordnet_id: name for wordnet_id, name in _keras_style_names()}
    for (wordnet_id, name, score), index in zip(decoded[0], expected):
        assert wordnet_id == kc.imagenet_classes()[index][0]
        assert name == short_names[wordnet_id]
        assert score == predictions[0, index]

    config = keras.saving.serialize_keras_object(model)
    rebuilt = keras.saving.deserialize_keras_object(config)
    assert len(rebuilt.weights) == len(model.weights)
    assert rebuilt.input_shape == model.input_shape


def _keras_style_names():
    return [(wordnet_id, names.split(", ")[0].replace(" ", "_")) for wordnet_id, names in kc.imagenet_classes()]


def test_decode_predictions_names_and_orders_as_keras_applications(monkeypatch):
    """The same tuples as Keras' own decode_predictions, given the same class index."""
    from keras.src.applications import imagenet_utils

    decoded_names = {i: kc.decode_predictions(_one_hot(i))[0][0][:2] for i in KERAS_CLASS_NAMES}
    assert decoded_names == KERAS_CLASS_NAMES
    # Keras reads its class index from a download; give it the one its file holds.
    index = {str(i): list(pair) for i, pair in enumerate(_keras_style_names())}
    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", index)
    scores = np.random.default_rng(1).random((3, 1000)).astype("float32")
    ours = kc.decode_predictions(scores, top=4)
    theirs = keras.applications.convnext.decode_predictions(scores, top=4)
    assert ours == theirs
    assert type(ours[0][0][2]) is type(theirs[0][0][2])


def _one_hot(index):
    scores = np.zeros((1, 1000), "float32")
    scores[0, index] = 1.0
    return scores


def test_preprocess_input_is_keras_applications_pass_through():
    pixels = np.arange(2 * 4 * 4 * 3, dtype="float32").reshape(2, 4, 4, 3)
    assert kc.preprocess_input(pixels) is pixels
    assert keras.applications.convnext.preprocess_input(pixels) is pixels
    assert kc.preprocess_input(pixels, data_format="channels_first") is pixels


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.filterwarnings("ignore:This model usually expects 1 or 3 input channels")
def test_normalization_matches_keras_applications_convnext(channels):
    """The same layers as keras.applications' ConvNeXt builder for each channel count."""
    from keras.src.applications import convnext as keras_convnext

    keras_model = keras_convnext.ConvNeXt(
        depths=[1, 1, 1, 1], projection_dims=[8, 8, 8, 8], include_top=False,
        input_shape=(32, 32, channels), name="keras_convnext",
    )
    ours = kc.ConvNeXt((1, 1, 1, 1), (8, 8, 8, 8), include_top=False, input_shape=(32, 32, channels))
    keras_norms = [layer for layer in keras_model.layers if isinstance(layer, keras.layers.Normalization)]
    our_norms = [layer for layer in ours.layers if isinstance(layer, kc.layers.ImageNormalization)]
    assert len(our_norms) == len(keras_norms) == (1 if channels == 3 else 0)
    if channels == 3:
        pixels = np.random.default_rng(2).uniform(0, 255, size=(2, 8, 8, 3)).astype("float32")
        expected = keras.ops.convert_to_numpy(keras_norms[0](pixels))
        np.testing.assert_allclose(keras.ops.convert_to_numpy(our_norms[0](pixels)), expected, atol=1e-5)
        np.testing.assert_allclose(kc.normalize_imagenet(pixels), expected, atol=1e-5)
        nchw = np.transpose(pixels, (0, 3, 1, 2))
        np.testing.assert_allclose(
            kc.normalize_imagenet(nchw, data_format="channels_first"), np.transpose(expected, (0, 3, 1, 2)), atol=1e-5
        )


def test_other_channel_counts_reach_the_stem_as_given():
    """include_preprocessing=True with 1 channel builds what include_preprocessing=False builds."""
    arguments = dict(stage_depths=(1, 1, 1, 1), stage_dims=(8, 16, 24, 32), classes=3, input_shape=(32, 32, 1))
    with_flag = kc.ConvNeXt(**arguments)
    without = kc.ConvNeXt(**arguments, include_preprocessing=False)
    assert [type(layer) for layer in with_flag.layers] == [type(layer) for layer in without.layers]
    assert with_flag.get_layer("stem_conv").input.shape == (None, 32, 32, 1)
