"""The PyTorch layer chain's direct weight reads against the portable graph (random, non-trivial weights)."""

import numpy as np
import pytest

import keras

import keras_convnext
from keras_convnext import config
from keras_convnext.ops import torch_backend

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="only eager PyTorch calls run the layer chain"
)


def _random_v2_atto(seed):
    """V2 Atto at 32x32 with every weight random (GRN's gamma and beta clearly nonzero), and 2 images."""
    model = keras_convnext.ConvNeXtV2Atto(input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        scale = 0.5 if "gamma" in variable.path else 0.1
        offset = 1.0 if variable.path.endswith("norm/gamma") else 0.0
        variable.assign(offset + scale * rng.standard_normal(variable.shape).astype("float32"))
    images = rng.uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    return model, images


def _count_direct_reads(monkeypatch):
    reads = []
    stored_tensor = torch_backend.stored_tensor

    def counted(variable):
        reads.append(variable.path)
        return stored_tensor(variable)

    monkeypatch.setattr(torch_backend, "stored_tensor", counted)
    return reads


def test_direct_reads_give_the_portable_logits(monkeypatch):
    model, images = _random_v2_atto(seed=11)
    with config.fast_paths(False):
        portable = keras.ops.convert_to_numpy(model.predict_on_batch(images))
    reads = _count_direct_reads(monkeypatch)
    fast = keras.ops.convert_to_numpy(model.predict_on_batch(images))
    assert len(set(reads)) > 100  # the chain read the weights directly
    assert np.abs(portable).max() > 1.0 and np.std(portable) > 0.1  # not a degenerate model
    np.testing.assert_allclose(fast, portable, rtol=1e-5, atol=1e-5 * np.abs(portable).max())
    # The weights are read live: an assignment reaches the next call.
    kernel = model.get_layer("predictions").kernel
    kernel.assign(np.zeros(kernel.shape, "float32"))
    with config.fast_paths(False):
        portable = keras.ops.convert_to_numpy(model.predict_on_batch(images))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.predict_on_batch(images)), portable,
                               rtol=1e-5, atol=1e-5)


def test_a_stateless_call_reads_the_scope_values(monkeypatch):
    """`stateless_call` reads the values it is given, not the stored ones."""
    model, images = _random_v2_atto(seed=12)
    rng = np.random.default_rng(13)
    trainable = [keras.ops.convert_to_tensor(np.asarray(keras.ops.convert_to_numpy(v))
                                             + 0.05 * rng.standard_normal(v.shape).astype("float32"))
                 for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    reads = _count_direct_reads(monkeypatch)
    got, _ = model.stateless_call(trainable, non_trainable, images, training=False)
    assert reads == []
    stored = keras.ops.convert_to_numpy(model.predict_on_batch(images))
    for variable, value in zip(model.trainable_variables, trainable):
        variable.assign(value)
    expected = keras.ops.convert_to_numpy(model.predict_on_batch(images))
    got = keras.ops.convert_to_numpy(got)
    assert np.abs(expected - stored).max() > 1e-3  # the given values change the logits
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_mixed_precision_keeps_the_scoped_chain(monkeypatch):
    """Under `mixed_bfloat16` layers read float32 weights in bfloat16: no direct reads there."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    model, images = _random_v2_atto(seed=14)
    reads = _count_direct_reads(monkeypatch)
    logits = keras.ops.convert_to_numpy(model.predict_on_batch(images))
    assert reads == [] and np.isfinite(logits).all()


@pytest.mark.parametrize("height,width", [(1, 1), (2, 2), (5, 6)])
def test_pairwise_kernel_gradient_matches_the_portable_convolution(height, width):
    """PyTorch's depthwise convolution in training on small maps (`platform.TORCH_PAIRWISE_MAX_POSITIONS`):
    outputs and the input, kernel and bias gradients of the portable definition."""
    import torch

    from keras_convnext.ops import platform, portable

    assert height * width <= platform.TORCH_PAIRWISE_MAX_POSITIONS
    rng = np.random.default_rng(height * 10 + width)
    values = [rng.standard_normal(shape).astype("float32") for shape in
              ((3, height, width, 8), (7, 7, 8, 1), (8,), (3, height, width, 8))]
    upstream = torch.from_numpy(values[3])

    def outputs_and_gradients(convolution):
        tensors = [torch.from_numpy(value).requires_grad_() for value in values[:3]]
        outputs = convolution(*tensors)
        return [outputs.detach().numpy()] + [g.numpy() for g in torch.autograd.grad(outputs, tensors, upstream)]

    fast = outputs_and_gradients(torch_backend.depthwise_conv2d)
    expected = outputs_and_gradients(portable.depthwise_conv2d)
    for name, got, want in zip(("outputs", "inputs", "kernel", "bias"), fast, expected):
        assert np.abs(want).max() > 0.1, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)
    # The pairwise gradient ran (PyTorch's own ends in a PermuteBackward node).
    inputs = torch.from_numpy(values[0]).requires_grad_()
    node = torch_backend.depthwise_conv2d(inputs, torch.from_numpy(values[1]), None).grad_fn
    assert "PairwiseGradientDepthwise" in type(node).__name__
