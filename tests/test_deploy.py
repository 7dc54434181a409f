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
