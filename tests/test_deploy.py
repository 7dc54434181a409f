"""Artifacts that deploy well: LayerNorm as one ONNX op; no float16 overflow in GRN or LayerNorm."""

import collections

import numpy as np
import pytest

import keras

import keras_convnext
from keras_convnext.export import sample_images
from keras_convnext.layers import GRN, ConvNeXtBlock, LayerNorm

SIZE = 64


def _atto_with_trained_looking_norms():
    """ConvNeXt V2 Atto returning logits, LayerNorm/GRN weights away from their 1/0 start.

    Norm scales near 1 and nonzero shifts keep TensorFlow from folding a
    `* gamma` of ones or `+ beta` of zeros away, so the ONNX rewrite is seen
    on the full LayerNorm pattern.
    """
    model = keras_convnext.ConvNeXtV2Atto(input_shape=(SIZE, SIZE, 3), weights=None, classifier_activation=None)
    rng = np.random.default_rng(3)
    for variable in model.weights:
        if variable.path.endswith(("gamma", "beta")):
            start = 1.0 if variable.path.endswith("gamma") and "grn" not in variable.path else 0.0
            variable.assign((start + 0.2 * rng.standard_normal(variable.shape)).astype("float32"))
    return model


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="ONNX files are converted on TensorFlow from every backend: checked in the TensorFlow run")
def test_onnx_layer_norm_is_one_op_and_matches_keras(tmp_path):
    import onnx
    import onnxruntime

    model = _atto_with_trained_looking_norms()
    path = str(tmp_path / "atto.onnx")
    keras_convnext.export(model, path, format="onnx", verbose=False)

    graph = onnx.load(path)
    opsets = {entry.domain: entry.version for entry in graph.opset_import}
    assert opsets[""] >= 17
    ops = collections.Counter(node.op_type for node in graph.graph.node)
    layer_norms = sum(isinstance(layer, LayerNorm) for layer in model._flatten_layers())
    blocks = sum(isinstance(layer, ConvNeXtBlock) for layer in model._flatten_layers())
    assert layer_norms == 17 and blocks == 12
    assert ops["LayerNormalization"] == layer_norms
    # What remains of ReduceMean is GRN's mean over the channels, one per block;
    # a decomposed LayerNorm would add two per norm (mean and variance).
    assert ops["ReduceMean"] == blocks

    images = sample_images(SIZE, SIZE)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    expected = np.asarray(model.predict(images, verbose=0))
    assert logits.shape == (4, 1000)
    assert np.max(np.abs(logits - expected)) <= 1e-4
    assert np.std(expected) > 0.1  # logits, not a near-constant output


# ---------------------------------------------------------------- mixed_float16 with large activations
#
# float16 tops out at 65504. A GPU-sized stage-1 map is 56x56 positions; with
# activations of 1e3-3e4 a float16 sum of squares (GRN's norm) or of squared
# deviations (LayerNorm's variance) is ~1e9-1e12 and would be inf.


def _large_map(rng, shape=(2, 56, 56, 96)):
    """Activations of magnitude 1e3-3e4 with random signs, float32."""
    magnitude = rng.uniform(1e3, 3e4, shape)
    return (magnitude * rng.choice([-1.0, 1.0], shape)).astype("float32")


def _reference_grn(x, gamma, beta, epsilon=1e-6):
    """GRN of the ConvNeXt V2 paper (eqs. 1-3) in float64 numpy, channels_last."""
    x = x.astype("float64")
    spatial_norm = np.sqrt(np.sum(x * x, axis=(1, 2), keepdims=True))
    relative = spatial_norm / (np.mean(spatial_norm, axis=-1, keepdims=True) + epsilon)
    return gamma * (x * relative) + beta + x


def _reference_layer_norm(x, gamma, beta, epsilon):
    x = x.astype("float64")
    centered = x - x.mean(axis=-1, keepdims=True)
    return centered / np.sqrt((centered**2).mean(axis=-1, keepdims=True) + epsilon) * gamma + beta


def test_grn_in_mixed_float16_does_not_overflow_on_large_activations():
    rng = np.random.default_rng(0)
    x = _large_map(rng)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(np.square(x[0].astype("float16")), axis=(0, 1))).any()
    layer = GRN(dtype="mixed_float16")
    layer.build(x.shape)
    gamma, beta = 0.1 * rng.standard_normal(96), 10.0 * rng.standard_normal(96)
    layer.set_weights([gamma.astype("float32"), beta.astype("float32")])
    outputs = keras.ops.convert_to_numpy(layer(x)).astype("float64")
    assert keras.backend.standardize_dtype(layer.compute_dtype) == "float16"
    assert np.isfinite(outputs).all()
    expected = _reference_grn(x, gamma, beta)
    # float16 keeps 11 significant bits: 5e-4 relative, here ~15 at 3e4.
    assert np.max(np.abs(outputs - expected) / (np.abs(expected) + 100.0)) <= 2e-3


def test_layer_norm_in_mixed_float16_does_not_overflow_on_large_activations():
    rng = np.random.default_rng(1)
    x = _large_map(rng)
    layer = LayerNorm(epsilon=1e-6, dtype="mixed_float16")
    layer.build(x.shape)
    gamma, beta = 1.0 + 0.2 * rng.standard_normal(96), 0.2 * rng.standard_normal(96)
    layer.set_weights([gamma.astype("float32"), beta.astype("float32")])
    outputs = keras.ops.convert_to_numpy(layer(x)).astype("float64")
    assert np.isfinite(outputs).all()
    expected = _reference_layer_norm(x, gamma, beta, 1e-6)
    assert np.std(expected) > 0.5
    assert np.max(np.abs(outputs - expected)) <= 1e-2


def _tiny_v2(seed):
    """A one-block-per-stage V2 whose first GRN sees activations of ~1e3 at 8x8 positions."""
    model = keras_convnext.ConvNeXt(
        (1, 1, 1, 1), (16, 16, 16, 16), input_shape=(32, 32, 3), classes=4,
        classifier_activation=None, include_preprocessing=False,
    )
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if "stage0_block0" in variable.path and "pwconv1" in variable.path and variable.path.endswith("kernel"):
            variable.assign((1e3 / 4 * rng.standard_normal(variable.shape)).astype("float32"))
        elif "grn" in variable.path:
            variable.assign((0.1 * rng.standard_normal(variable.shape)).astype("float32"))
    return model


def test_tiny_v2_in_mixed_float16_infers_and_trains_on_large_inputs():
    rng = np.random.default_rng(2)
    images = _large_map(rng, (4, 32, 32, 3))
    labels = np.array([0, 1, 2, 3])
    reference = _tiny_v2(seed=5)
    # Called directly, not through `predict`: nothing to compile for a single batch.
    expected = keras.ops.convert_to_numpy(reference(images)).astype("float64")
    weights = reference.get_weights()

    block = reference.get_layer("stage0_block0")
    block_inputs = keras.Model(reference.input, reference.get_layer("stem_norm").output)(images)
    grn_inputs = keras.ops.convert_to_numpy(block.pwconv1.call(block.norm.call(block.dwconv.call(block_inputs))))
    assert np.median(np.sum(np.square(grn_inputs), axis=(1, 2))) > 65504  # a float16 sum would be inf

    keras.config.set_dtype_policy("mixed_float16")
    model = _tiny_v2(seed=5)
    model.set_weights(weights)
    grn = model.get_layer("stage0_block0").grn
    logits = keras.ops.convert_to_numpy(model(images)).astype("float64")
    assert np.isfinite(logits).all()
    assert np.max(np.abs(logits - expected)) <= 2e-2 * np.max(np.abs(expected))

    # Loss scale 1: a step is skipped only if a gradient itself is not finite.
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1e-4), initial_scale=1.0)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gamma_before = keras.ops.convert_to_numpy(grn.gamma.value).copy()
    loss = float(model.train_on_batch(images, labels))
    assert np.isfinite(loss)
    gamma_after = keras.ops.convert_to_numpy(grn.gamma.value)
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.trainable_weights)
    assert not np.array_equal(gamma_before, gamma_after)  # the step was taken: every gradient was finite
