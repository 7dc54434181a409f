import numpy as np
import pytest

import keras
from keras import ops

from keras_convnext import ops as convnext_ops
from keras_convnext.layers import DepthwiseConv


@pytest.mark.parametrize("shape", [(2, 9, 13, 5), (1, 3, 4, 8)])
def test_depthwise_formulations_agree(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    kernel = rng.normal(size=(7, 7, shape[-1], 1)).astype("float32")  # not symmetric
    bias = rng.normal(size=shape[-1]).astype("float32")
    expected = ops.convert_to_numpy(convnext_ops.portable_depthwise_conv2d(x, kernel, bias))
    for fn in (convnext_ops.shifted_depthwise_conv2d, convnext_ops.depthwise_conv2d):
        x_t, k_t, b_t = (ops.convert_to_tensor(a) for a in (x, kernel, bias))
        np.testing.assert_allclose(ops.convert_to_numpy(fn(x_t, k_t, b_t)), expected, atol=1e-4)


def _compiled_predict(layer, x):
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, layer(inputs))
    # jit_compile exercises the XLA formulation on TensorFlow
    model.compile(jit_compile=keras.backend.backend() != "torch")
    return model.predict(x, verbose=0)


def test_depthwise_layer_matches_keras_layer_compiled():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 12, 10, 6)).astype("float32")
    reference = keras.layers.DepthwiseConv2D(7, padding="same")
    fast = DepthwiseConv(7)
    reference.build(x.shape)
    fast.build(x.shape)
    weights = [rng.normal(size=w.shape).astype("float32") for w in reference.get_weights()]
    reference.set_weights(weights)
    fast.set_weights(weights)
    np.testing.assert_allclose(_compiled_predict(fast, x), _compiled_predict(reference, x), atol=1e-4)
    with pytest.raises(ValueError, match="stride 1"):
        DepthwiseConv(7, strides=2)


def test_depthwise_gradients_agree():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, 8, 4)).astype("float32")
    kernel = rng.normal(size=(7, 7, 4, 1)).astype("float32")
    weights = rng.normal(size=(2, 8, 8, 4)).astype("float32")
    grads = [_gradient(fn, x, kernel, weights) for fn in
             (convnext_ops.portable_depthwise_conv2d, convnext_ops.depthwise_conv2d)]
    for expected, actual in zip(grads[0], grads[1]):
        np.testing.assert_allclose(actual, expected, atol=1e-4)


def _gradient(fn, x, kernel, weights):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.grad(lambda a, k: (fn(a, k) * weights).sum(), argnums=(0, 1))(x, kernel)
    if backend == "tensorflow":
        import tensorflow as tf

        a, k = tf.constant(x), tf.constant(kernel)
        with tf.GradientTape() as tape:
            tape.watch([a, k])
            loss = tf.reduce_sum(fn(a, k) * weights)
        return [g.numpy() for g in tape.gradient(loss, [a, k])]
    import torch

    a = torch.tensor(x, requires_grad=True)
    k = torch.tensor(kernel, requires_grad=True)
    (fn(a, k) * torch.from_numpy(weights)).sum().backward()
    return [a.grad.numpy(), k.grad.numpy()]
