import re

import numpy as np
import pytest

import keras
from keras import ops

from conftest import assert_speed_up_kept

from keras_convnext import config
from keras_convnext import ops as convnext_ops
from keras_convnext.ops import platform, torch_backend
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


# Under XLA, maps of up to 100 positions take the pairwise kernel gradient,
# larger ones the FFT: both, and a map smaller than the kernel.
@pytest.mark.parametrize("shape", [(2, 8, 11, 4), (3, 2, 3, 5), (2, 13, 12, 3)])
def test_depthwise_gradients_agree(shape):
    rng = np.random.default_rng(2)
    x = rng.normal(size=shape).astype("float32")
    kernel = rng.normal(size=(7, 7, shape[-1], 1)).astype("float32")
    bias = rng.normal(size=shape[-1]).astype("float32")
    weights = rng.normal(size=shape).astype("float32")
    grads = [_gradient(fn, x, kernel, bias, weights) for fn in
             (convnext_ops.portable_depthwise_conv2d, convnext_ops.depthwise_conv2d)]
    assert len(grads[1]) == 3
    for expected, actual in zip(grads[0], grads[1]):
        np.testing.assert_allclose(actual, expected, atol=1e-4)


def _gradient(fn, *arrays, tensorflow_graph=False):
    """Gradients of `sum(fn(*inputs) * weights)` for every input; `arrays` is `(*inputs, weights)`.

    On TensorFlow in an XLA-compiled function, or with `tensorflow_graph` in a
    plain graph (as `fit` runs without `jit_compile`).
    """
    *inputs, weights = arrays
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.grad(lambda *a: (fn(*a) * weights).sum(), argnums=tuple(range(len(inputs))))(*inputs)
    if backend == "tensorflow":
        import tensorflow as tf

        def gradients(*a):
            with tf.GradientTape() as tape:
                tape.watch(a)
                loss = tf.reduce_sum(fn(*a) * weights)
            return tape.gradient(loss, a)

        # under XLA, depthwise_conv2d takes the shifted path and its custom gradient
        jit_compile = fn is not convnext_ops.portable_depthwise_conv2d and not tensorflow_graph
        compiled = tf.function(gradients, jit_compile=jit_compile)
        return [g.numpy() for g in compiled(*(tf.constant(a) for a in inputs))]
    import torch

    tensors = [torch.tensor(a, requires_grad=True) for a in inputs]
    (fn(*tensors) * torch.from_numpy(weights)).sum().backward()
    return [t.grad.numpy() for t in tensors]


@pytest.mark.perf_contract
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA:CPU fusion of the JAX formulation")
def test_jax_depthwise_output_is_computed_once_per_pass():
    """The shifted multiply-adds run once forward and once for the input gradient.

    Without `_materialized`, XLA fused them into each consumer: LayerNorm's
    mean, variance and output and their gradients, five more copies here.
    """
    import jax
    import jax.numpy as jnp

    from keras_convnext.ops import platform

    if not platform.jax_on_cpu():
        pytest.skip("the shifted formulation runs on XLA:CPU only")
    rng = np.random.default_rng(4)
    x, weights = rng.normal(size=(2, 2, 14, 14, 16)).astype("float32")
    kernel = rng.normal(size=(7, 7, 16, 1)).astype("float32")
    bias = rng.normal(size=16).astype("float32")

    def loss(a, k, b):
        y = convnext_ops.depthwise_conv2d(a, k, b)
        mean = jnp.mean(y, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
        return jnp.sum((y - mean) * jax.lax.rsqrt(variance + 1e-6) * weights)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, kernel, bias).compile().as_text()
    entry = text[text.index("\nENTRY"):].splitlines()
    kernel_name = next(re.match(r"\s*(%\S+) = ", line).group(1) for line in entry if " parameter(1)" in line)
    reads_kernel = re.compile(re.escape(kernel_name) + r"[,)]")
    readers = [line for line in entry if " fusion(" in line and reads_kernel.search(line)]
    assert_speed_up_kept(1 <= len(readers) <= 2, f"XLA fused the depthwise multiply-adds into {readers}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_materialized_is_the_identity(dtype):
    from keras_convnext.ops import xla

    values = np.array([0.0, -0.0, 1e-30, -3.5, 7e30, 1.0 / 3.0], dtype="float32")
    x = ops.cast(ops.convert_to_tensor(values), dtype)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ops.cast(xla.materialized(x), "float32")),
        ops.convert_to_numpy(ops.cast(x, "float32")),
    )


def test_pointwise_fast_paths_agree_with_portable():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 6, 8)).astype("float32")
    kernel = rng.normal(size=(8, 12)).astype("float32")
    bias = rng.normal(size=12).astype("float32")
    gamma, beta = rng.normal(size=(2, 8)).astype("float32")
    x_t, k_t, b_t, g_t, be_t = (ops.convert_to_tensor(a) for a in (x, kernel, bias, gamma, beta))
    np.testing.assert_allclose(
        ops.convert_to_numpy(convnext_ops.linear(x_t, k_t, b_t)),
        ops.convert_to_numpy(convnext_ops.portable_linear(x_t, k_t, b_t)),
        atol=1e-5,
    )
    # GRN as written in the paper, in numpy
    norm = np.sqrt((x.astype("float64") ** 2).sum(axis=(1, 2), keepdims=True))
    expected = x + gamma * (x * norm / (norm.mean(-1, keepdims=True) + 1e-6)) + beta
    for fn in (convnext_ops.grn, convnext_ops.portable_grn):
        np.testing.assert_allclose(ops.convert_to_numpy(fn(x_t, g_t, be_t)), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_grn_statistics_in_chunks_at_inference(dtype, monkeypatch):
    """At inference PyTorch sums the squares of a large map a few samples at a time."""
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch-only formulation")
    import torch


    rng = np.random.default_rng(21)
    x = rng.normal(size=(5, 4, 3, 6)).astype("float32")
    x[3] *= 30.0  # one sample far larger, so that mixing samples up shows
    gamma, beta = rng.normal(size=(2, 6)).astype("float32")
    x_t = ops.cast(ops.convert_to_tensor(x), dtype)
    whole = ops.convert_to_numpy(ops.cast(torch_backend._sum_of_squares(x_t), "float32"))
    calls = []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda tensors, *args: calls.append(len(tensors)) or cat(tensors, *args))
    monkeypatch.setattr(platform, "TORCH_CHUNK_BYTES", 2 * 4 * 3 * 6 * 4)  # two samples' float32 squares
    with torch.no_grad():
        chunked = ops.convert_to_numpy(torch_backend._sum_of_squares(x_t))
        actual = ops.convert_to_numpy(ops.cast(convnext_ops.grn(x_t, gamma, beta), "float32"))
    assert calls and calls[0] == 3  # samples (0, 1), (2, 3), (4)
    assert chunked.shape == (5, 1, 1, 6) and chunked.dtype == np.float32
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    expected = ops.convert_to_numpy(ops.cast(convnext_ops.portable_grn(x_t, gamma, beta), "float32"))
    tolerance = 1e-5 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


def test_torch_off_the_cpu_takes_the_reference_products(monkeypatch):
    """Off the CPU (a GPU), every Linear is `addmm` and GRN's squares are summed in one pass.

    PyTorch's "meta" device stands in for a GPU: tensors with shapes and no
    data, on a device that is not the CPU. The same calls on the CPU take the
    1x1 convolution and the chunks, so the recorders below can see them.
    """
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch-only formulation")
    import torch
    import torch.nn.functional as F


    convolutions, concatenations = [], []
    conv2d, cat = F.conv2d, torch.cat
    monkeypatch.setattr(F, "conv2d", lambda *args, **kwargs: convolutions.append(1) or conv2d(*args, **kwargs))
    monkeypatch.setattr(torch, "cat", lambda *args, **kwargs: concatenations.append(1) or cat(*args, **kwargs))
    monkeypatch.setattr(platform, "TORCH_CHUNK_BYTES", 4 * 64 * 64 * 8)  # one sample's float32 squares
    for device in ("meta", "cpu"):
        convolutions.clear()
        concatenations.clear()
        x = torch.ones(2, 64, 64, 8, device=device)  # 8192 positions: over `platform.TORCH_CONV_MIN_POSITIONS`
        kernel, bias = torch.ones(8, 12, device=device), torch.ones(12, device=device)
        for training in (True, False):
            with torch.set_grad_enabled(training):
                outputs = torch_backend.linear(x, kernel, bias, gelu=True)
                sums = torch_backend._sum_of_squares(x)
            assert outputs.shape == (2, 64, 64, 12) and outputs.device.type == device
            assert sums.shape == (2, 1, 1, 8) and sums.dtype == torch.float32
        if device == "meta":
            assert not convolutions and not concatenations
        else:
            assert convolutions and concatenations  # training's product; inference's chunked squares
            np.testing.assert_allclose(outputs.numpy(), F.gelu(torch.full((2, 64, 64, 12), 9.0)).numpy())
            np.testing.assert_allclose(sums.numpy(), np.full((2, 1, 1, 8), 64.0 * 64.0))


def test_grn_in_bfloat16_agrees_with_float32_statistics():
    """PyTorch sums bfloat16 squares into float32; the portable GRN casts to float32 first."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 9, 11, 16)).astype("float32")
    x[0, :, :, 3] *= 300.0  # squares far beyond float16's range, and uneven channel norms
    gamma, beta = rng.normal(size=(2, 16)).astype("float32")
    x_bf16 = ops.cast(ops.convert_to_tensor(x), "bfloat16")
    expected = ops.convert_to_numpy(ops.cast(convnext_ops.portable_grn(x_bf16, gamma, beta), "float32"))
    actual = ops.convert_to_numpy(ops.cast(convnext_ops.grn(x_bf16, gamma, beta), "float32"))
    # one bfloat16 rounding of the output apart, at most
    np.testing.assert_allclose(actual, expected, rtol=1e-2, atol=1e-2)
    assert not np.allclose(expected, ops.convert_to_numpy(ops.cast(x_bf16, "float32")), atol=1e-1)


# Under PyTorch, in training, (2, 24, 24, 8) (1152 positions) and (4, 300, 8) (1200 gathered
# tokens) take the 1x1 convolution, (2, 5, 6, 8) and (3, 7, 8) `addmm`; at inference all take
# oneDNN's product, or in float32 `addmm` where it wins (both are checked on any processor).
@pytest.mark.parametrize("shape", [(2, 24, 24, 8), (4, 300, 8), (2, 5, 6, 8), (3, 7, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_fast_path_gradients_agree(shape, with_bias, monkeypatch):
    """Every formulation of `linear` (a 1x1 convolution on 4-D maps under PyTorch) and its gradients."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape).astype("float32")
    kernel = rng.normal(size=(8, 12)).astype("float32")
    bias = rng.normal(size=12).astype("float32") if with_bias else None
    weights = rng.normal(size=shape[:-1] + (12,)).astype("float32")

    def make(fn):
        return lambda a, k: fn(a, k, None if bias is None else ops.convert_to_tensor(bias))

    expected = _gradient(make(convnext_ops.portable_linear), x, kernel, weights)
    actual = _gradient(make(convnext_ops.linear), x, kernel, weights)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4)
    for _ in _each_inference_product(monkeypatch):
        with _inference():
            x_t, k_t = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
            np.testing.assert_allclose(
                ops.convert_to_numpy(make(convnext_ops.linear)(x_t, k_t)),
                ops.convert_to_numpy(make(convnext_ops.portable_linear)(x_t, k_t)),
                rtol=1e-5, atol=1e-4,
            )


def _each_inference_product(monkeypatch, dtype="float32"):
    """Under PyTorch, yields once with each product a Linear can take at inference in `dtype`
    (oneDNN's where this processor has it, then `addmm`, whichever this processor would pick),
    then restores the processor's choice; once elsewhere."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch


    own_choice = torch_backend.onednn_product_wins
    onednn = torch_backend.onednn_linear_works(getattr(torch, dtype))
    for wins in (True, False) if onednn else (False,):
        monkeypatch.setattr(torch_backend, "onednn_product_wins", lambda dtype, wins=wins: wins)
        yield
    monkeypatch.setattr(torch_backend, "onednn_product_wins", own_choice)


@pytest.mark.parametrize(
    "vendor, capability, mkl, addmm",
    [
        ("GenuineIntel", "AVX512", True, True),  # MKL's AVX-512 path
        ("AuthenticAMD", "AVX512", True, False),  # MKL without AVX-512, oneDNN with it
        ("AuthenticAMD", "AVX2", True, True),  # the same instructions in both
        ("GenuineIntel", "AVX2", True, True),
        ("AuthenticAMD", "AVX2", False, False),  # no MKL: oneDNN's product
        ("", "DEFAULT", False, False),
    ],
)
def test_float32_inference_product_follows_the_processor(vendor, capability, mkl, addmm):
    from keras_convnext.ops import platform

    assert platform.addmm_wins_on(vendor, capability, mkl) is addmm


def test_pointwise_dense_equals_dense():
    from keras_convnext.layers import PointwiseDense

    x = np.random.default_rng(4).normal(size=(2, 3, 3, 8)).astype("float32")
    dense, fast = keras.layers.Dense(5), PointwiseDense(5)
    dense.build(x.shape)
    fast.build(x.shape)
    fast.set_weights(dense.get_weights())
    np.testing.assert_allclose(ops.convert_to_numpy(fast(x)), ops.convert_to_numpy(dense(x)), atol=1e-5)


# (2, 9, 10, 5) with 2x2 patches drops a row, as a "valid" strided conv does;
# 4x4 patches of a 3-channel map are the stem's shape.
@pytest.mark.parametrize("shape, size", [((2, 8, 6, 5), 2), ((2, 9, 10, 5), 2), ((1, 16, 12, 3), 4)])
def test_patch_conv_as_linear_agrees_with_strided_conv(shape, size):
    """Patches through `linear` (PyTorch, JAX) and the strided conv: values and gradients."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=shape).astype("float32")
    kernel = rng.normal(size=(size, size, shape[-1], 7)).astype("float32")  # not symmetric
    bias = ops.convert_to_tensor(rng.normal(size=7).astype("float32"))
    weights = rng.normal(size=(shape[0], shape[1] // size, shape[2] // size, 7)).astype("float32")

    expected = _gradient(lambda a, k: convnext_ops.portable_patch_conv2d(a, k, bias), x, kernel, weights)
    values = ops.convert_to_numpy(convnext_ops.portable_patch_conv2d(x, kernel, bias))
    for fn in (convnext_ops.patch_linear, convnext_ops.patch_conv2d):
        np.testing.assert_allclose(ops.convert_to_numpy(fn(x, kernel, bias)), values, rtol=1e-5, atol=1e-4)
        actual = _gradient(lambda a, k: fn(a, k, bias), x, kernel, weights)
        for e, a in zip(expected, actual):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4)


def test_patch_conv_layer_equals_conv2d():
    from keras_convnext.layers import PatchConv2D

    x = np.random.default_rng(7).normal(size=(2, 8, 8, 6)).astype("float32")
    conv, fast = keras.layers.Conv2D(5, 2, strides=2), PatchConv2D(5, 2)
    conv.build(x.shape)
    fast.build(x.shape)
    fast.set_weights([w + 0.5 for w in conv.get_weights()])  # a nonzero bias
    conv.set_weights(fast.get_weights())
    np.testing.assert_allclose(ops.convert_to_numpy(fast(x)), ops.convert_to_numpy(conv(x)), atol=1e-5)
    with pytest.raises(ValueError, match="strides equal to the kernel size"):
        PatchConv2D(5, 2, strides=1)


def test_tensorflow_xla_context_is_detected():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow-only dispatch")
    import tensorflow as tf

    from keras_convnext.ops.platform import tensorflow_in_xla

    seen = {}

    def probe(x):
        seen[len(seen)] = tensorflow_in_xla()
        return x

    tf.function(probe, jit_compile=True)(tf.ones(1))
    tf.function(probe, jit_compile=False)(tf.ones(1))
    assert seen == {0: True, 1: False}
    assert not tensorflow_in_xla()


def test_jax_depthwise_dispatch_follows_the_device(monkeypatch):
    """Shifted multiply-adds on XLA:CPU; on a GPU the grouped convolution that XLA gives cuDNN."""
    if keras.backend.backend() != "jax":
        pytest.skip("JAX-only dispatch")
    import jax

    from keras_convnext.ops import platform

    x, kernel = np.ones((1, 9, 9, 4), "float32"), np.full((7, 7, 4, 1), 0.5, "float32")

    def primitives():
        # a new function each time: JAX caches traces by function
        jaxpr = jax.make_jaxpr(lambda a, k: convnext_ops.depthwise_conv2d(a, k))(x, kernel)
        return {equation.primitive.name for equation in jaxpr.jaxpr.eqns}

    assert jax.default_backend() == "cpu"
    assert "conv_general_dilated" not in primitives()
    monkeypatch.setattr(platform, "jax_on_cpu", lambda: False)
    assert "conv_general_dilated" in primitives()
    np.testing.assert_allclose(
        ops.convert_to_numpy(convnext_ops.depthwise_conv2d(x, kernel)),
        ops.convert_to_numpy(convnext_ops.shifted_depthwise_conv2d(x, kernel)), rtol=1e-5,
    )


@pytest.mark.parametrize("shape", [(2, 5, 6, 8), (3, 8)])
def test_layer_norm_fast_path_agrees_with_keras(shape):
    """`layer_norm` (PyTorch's kernel on PyTorch) against Keras' op: values, gradients, bfloat16."""
    rng = np.random.default_rng(9)
    x = (rng.normal(size=shape) * 3 + 1).astype("float32")
    gamma, beta = (rng.normal(size=(2, 8)) + 1).astype("float32")
    weights = rng.normal(size=shape).astype("float32")

    def make(fn):
        return lambda a, g: fn(a, g, ops.convert_to_tensor(beta), 1e-6)

    expected = _gradient(make(convnext_ops.portable_layer_norm), x, gamma, weights)
    actual = _gradient(make(convnext_ops.layer_norm), x, gamma, weights)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)
    _assert_bfloat16_layer_norm_matches_keras(ops.cast(ops.convert_to_tensor(x), "bfloat16"), gamma, beta)


def _assert_bfloat16_layer_norm_matches_keras(x_bf16, gamma, beta):
    outputs = convnext_ops.layer_norm(x_bf16, gamma, beta, 1e-6)
    assert ops.dtype(outputs) == "bfloat16"
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(outputs, "float32")),
        ops.convert_to_numpy(ops.cast(convnext_ops.portable_layer_norm(x_bf16, gamma, beta, 1e-6), "float32")),
        rtol=2e-2, atol=2e-2,
    )


def test_torch_layer_norm_on_a_device_that_wants_one_dtype(monkeypatch):
    """Off the CPU (CUDA), PyTorch's kernel refuses bfloat16 inputs with float32 weights."""
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch-only formulation")
    import torch.nn.functional as F


    layer_norm = F.layer_norm

    def one_dtype_only(inputs, shape, weight, bias, epsilon):
        if inputs.dtype != weight.dtype:
            raise RuntimeError("expected scalar type BFloat16 but found Float")
        return layer_norm(inputs, shape, weight, bias, epsilon)

    monkeypatch.setattr(F, "layer_norm", one_dtype_only)
    monkeypatch.setattr(torch_backend, "layer_norm_takes_mixed_dtypes", lambda device: False)
    rng = np.random.default_rng(11)
    x = ops.cast(ops.convert_to_tensor((rng.normal(size=(2, 3, 3, 8)) * 3 + 1).astype("float32")), "bfloat16")
    gamma, beta = (rng.normal(size=(2, 8)) + 1).astype("float32")
    _assert_bfloat16_layer_norm_matches_keras(x, gamma, beta)


def test_layer_norm_layer_equals_keras_layer_norm():
    from keras_convnext.layers import LayerNorm

    x = np.random.default_rng(10).normal(size=(2, 4, 4, 6)).astype("float32")
    reference, fast = keras.layers.LayerNormalization(epsilon=1e-6), LayerNorm(epsilon=1e-6)
    reference.build(x.shape)
    fast.build(x.shape)
    fast.set_weights([w + 0.5 for w in reference.get_weights()])  # nonzero beta, gamma not 1
    reference.set_weights(fast.get_weights())
    np.testing.assert_allclose(ops.convert_to_numpy(fast(x)), ops.convert_to_numpy(reference(x)), atol=1e-5)
    other_axes = LayerNorm(axis=[1, 2, 3], epsilon=1e-6)  # falls back to Keras' own computation
    np.testing.assert_allclose(
        ops.convert_to_numpy(other_axes(x)),
        ops.convert_to_numpy(keras.layers.LayerNormalization(axis=[1, 2, 3], epsilon=1e-6)(x)),
        atol=1e-5,
    )


@pytest.mark.perf_contract
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA's common-subexpression elimination")
def test_jax_gelu_backward_computes_its_own_erf():
    """The backward pass's `erf` is not the forward pass's, kept alive until the backward.

    Sharing it would keep a map of the block's widest size per block in
    XLA's training temporary (V2 Tiny at batch 16: 2798 -> 3321 MB).
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(19)
    x, kernel = rng.normal(size=(2, 8, 8, 16)).astype("float32"), rng.normal(size=(16, 32)).astype("float32")
    step = jax.jit(jax.value_and_grad(lambda a, k: jnp.sum(convnext_ops.linear_gelu(a, k) ** 2), argnums=(0, 1)))
    erfs = len(re.findall(r" erf\(", step.lower(x, kernel).compile().as_text()))
    assert_speed_up_kept(erfs == 2, f"the compiled training step has {erfs} erf operations, not 2")


# At inference PyTorch fuses GELU into oneDNN's product (in float32, where `addmm` wins, `addmm`
# and GELU); in training (2, 24, 24, 8), 1152 positions, takes the 1x1 convolution and
# (2, 5, 6, 8) `addmm`.
@pytest.mark.parametrize("shape", [(2, 24, 24, 8), (2, 5, 6, 8), (4, 300, 8)])
def test_linear_gelu_agrees_with_portable(shape, monkeypatch):
    """`linear_gelu` against GELU after the portable Linear: inference, gradients, bfloat16."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=shape).astype("float32")
    kernel = rng.normal(size=(8, 12)).astype("float32")
    bias = ops.convert_to_tensor(rng.normal(size=12).astype("float32"))
    expected = ops.convert_to_numpy(convnext_ops.portable_linear_gelu(x, kernel, bias))
    assert expected.min() < -0.1  # GELU's negative lobe is exercised
    if keras.backend.backend() == "torch":
        import torch

        assert torch_backend.onednn_linear_works(torch.float32), "the fused path would go untested on this PyTorch"
    for _ in _each_inference_product(monkeypatch):
        with _inference():
            actual = convnext_ops.linear_gelu(ops.convert_to_tensor(x), ops.convert_to_tensor(kernel), bias)
            np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5, atol=1e-4)
    x_bf16, kernel_bf16, bias_bf16 = (ops.cast(ops.convert_to_tensor(a), "bfloat16") for a in (x, kernel, bias))
    for _ in _each_inference_product(monkeypatch, "bfloat16"):
        with _inference():
            actual_bf16 = ops.cast(convnext_ops.linear_gelu(x_bf16, kernel_bf16, bias_bf16), "float32")
            np.testing.assert_allclose(ops.convert_to_numpy(actual_bf16), expected, rtol=5e-2, atol=1e-1)
    weights = rng.normal(size=shape[:-1] + (12,)).astype("float32")
    expected_gradients = _gradient(lambda a, k: convnext_ops.portable_linear_gelu(a, k, bias), x, kernel, weights)
    gradients = _gradient(lambda a, k: convnext_ops.linear_gelu(a, k, bias), x, kernel, weights)
    for e, a in zip(expected_gradients, gradients):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4)


# (2, 6, 5, 16) -> 4 outputs: more positions than outputs (TensorFlow, and PyTorch at inference:
# per-sample weights in a batched product); (3, 2, 2, 16) -> 4 outputs: as many (GRN's scale on
# the map).
@pytest.mark.parametrize("shape", [(2, 6, 5, 16), (3, 2, 2, 16)])
def test_grn_linear_agrees_with_portable(shape):
    """GRN then the narrowing Linear, against GRN written out in numpy: values, bfloat16, gradients."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=shape).astype("float32")
    x[0, ..., 3] *= 20.0  # uneven channel norms, so that GRN's factor differs per channel
    gamma, beta = rng.normal(size=(2, 16)).astype("float32")
    kernel = rng.normal(size=(16, 4)).astype("float32")
    bias = rng.normal(size=4).astype("float32")
    norm = np.sqrt((x.astype("float64") ** 2).sum(axis=(1, 2), keepdims=True))
    expected = (x + gamma * (x * norm / (norm.mean(-1, keepdims=True) + 1e-6)) + beta) @ kernel + bias
    tensors = [ops.convert_to_tensor(a) for a in (x, gamma, beta, kernel, bias)]
    for fn in (convnext_ops.grn_linear, convnext_ops.portable_grn_linear):
        np.testing.assert_allclose(ops.convert_to_numpy(fn(*tensors)), expected, rtol=1e-5, atol=1e-4)
    with _inference():  # PyTorch folds GRN into the product at inference only
        np.testing.assert_allclose(
            ops.convert_to_numpy(convnext_ops.grn_linear(*tensors)), expected, rtol=1e-5, atol=1e-4
        )
        x_bf16, kernel_bf16, bias_bf16 = (ops.cast(tensors[i], "bfloat16") for i in (0, 3, 4))
        actual = convnext_ops.grn_linear(x_bf16, tensors[1], tensors[2], kernel_bf16, bias_bf16)
        np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(actual, "float32")), expected, rtol=5e-2, atol=0.5)
    weights = rng.normal(size=shape[:-1] + (4,)).astype("float32")

    def make(fn):
        return lambda a, g, b, k: fn(a, g, b, k, tensors[4])

    expected_gradients = _gradient(make(convnext_ops.portable_grn_linear), x, gamma, beta, kernel, weights)
    gradients = _gradient(make(convnext_ops.grn_linear), x, gamma, beta, kernel, weights)
    for e, a in zip(expected_gradients, gradients):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-3)
    if keras.backend.backend() == "tensorflow":  # and TensorFlow's own kernels, outside XLA
        gradients = _gradient(make(convnext_ops.grn_linear), x, gamma, beta, kernel, weights, tensorflow_graph=True)
        for e, a in zip(expected_gradients, gradients):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-3)
        grn_weights = rng.normal(size=x.shape).astype("float32")
        expected_gradients = _gradient(convnext_ops.portable_grn, x, gamma, beta, grn_weights)
        gradients = _gradient(convnext_ops.grn, x, gamma, beta, grn_weights, tensorflow_graph=True)
        for e, a in zip(expected_gradients, gradients):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's bfloat16 fold")
@pytest.mark.parametrize("shape,folds", [((2, 6, 5, 16), True), ((3, 2, 2, 16), False)])
@pytest.mark.parametrize("kernel_dtype", ["float32", "bfloat16"])
def test_jax_bfloat16_grn_linear_agrees_with_float32(shape, folds, kernel_dtype):
    """On JAX's CPU a bfloat16 GRN folds into the narrowing Linear where the map has
    more positions than the layer has outputs, from the float32 kernel as the layers
    hand it over or a bfloat16 one: values and gradients against float32 arithmetic
    on the same values, a channel of zeros included (its gradients stay finite)."""
    import jax
    import jax.numpy as jnp

    from keras_convnext.ops import platform

    rng = np.random.default_rng(31)
    x = rng.normal(size=shape).astype("float32")
    x[0, ..., 3] *= 20.0
    x[1, ..., 5] = 0.0  # a channel with norm 0
    gamma, beta = rng.normal(size=(2, 16)).astype("float32")
    kernel = (rng.normal(size=(16, 4)) * 0.5).astype("float32")
    bias = rng.normal(size=4).astype("float32")
    x, kernel = (np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)) for a in (x, kernel))
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    stored = jnp.asarray(kernel, kernel_dtype)
    assert platform.grn_fold_applies(x_bf16, stored) == (folds and platform.jax_on_cpu())
    bias_value = np.asarray(jnp.asarray(bias, jnp.bfloat16).astype(jnp.float32))

    def ours(a, g, b, k):
        return convnext_ops.grn_linear(a.astype(jnp.bfloat16), g, b, k, bias_value).astype(jnp.float32)

    def reference(a, g, b, k):
        return convnext_ops.portable_grn_linear(a, g, b, k.astype(jnp.float32), bias_value)

    actual, expected = ours(x_bf16, gamma, beta, stored), reference(x, gamma, beta, stored)
    scale = np.abs(np.asarray(expected)).max()
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=2e-2 * scale)
    weights = rng.normal(size=shape[:-1] + (4,)).astype("float32")

    def gradients(fn, a):
        return jax.grad(lambda *v: jnp.sum(fn(*v) * weights), argnums=(0, 1, 2, 3))(a, gamma, beta, stored)

    for a, e in zip(gradients(ours, x_bf16), gradients(reference, x)):
        a, e = np.asarray(a, "float32"), np.asarray(e, "float32")
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, e, atol=3e-2 * np.abs(e).max())


@pytest.mark.parametrize("name", ["grn", "portable_grn", "grn_linear"])
def test_grn_gradients_where_a_channel_is_zero_match_the_reference(name):
    """A channel that is zero at every position (norm 0): HF's GRN gives finite gradients, and so must we.

    The norm's gradient there is 0 / 0; `torch.linalg.vector_norm`, which
    the reference model uses, defines it as 0. Sums over the channel norms
    carry it to every input of the sample, so a NaN here ends a training run.
    """
    import torch
    from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2GRN

    rng = np.random.default_rng(22)
    x = rng.normal(size=(2, 3, 3, 8)).astype("float32")
    x[0, ..., 2] = 0.0
    x[1, ..., 5] = 0.0
    gamma, beta = (rng.normal(size=(2, 8)) + 1.0).astype("float32")
    kernel, bias = rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=4).astype("float32")
    projected = name == "grn_linear"
    weights = rng.normal(size=x.shape[:-1] + ((4,) if projected else (8,))).astype("float32")

    reference = ConvNextV2GRN(8)
    reference.weight.data = torch.from_numpy(gamma).reshape(1, 1, 1, 8)
    reference.bias.data = torch.from_numpy(beta).reshape(1, 1, 1, 8)
    x_t = torch.tensor(x, requires_grad=True)
    outputs = reference(x_t)
    if projected:
        outputs = outputs @ torch.from_numpy(kernel) + torch.from_numpy(bias)
    (outputs * torch.from_numpy(weights)).sum().backward()
    expected = [x_t.grad.numpy(), reference.weight.grad.reshape(8).numpy(), reference.bias.grad.reshape(8).numpy()]
    assert all(np.isfinite(e).all() for e in expected)

    fn = getattr(convnext_ops, name)

    def ours(a, g, b):
        return fn(a, g, b, kernel, bias, 1e-6) if projected else fn(a, g, b, 1e-6)

    runs = [_gradient(ours, x, gamma, beta, weights)]
    if keras.backend.backend() == "tensorflow":  # and TensorFlow's own kernels, outside XLA
        runs.append(_gradient(ours, x, gamma, beta, weights, tensorflow_graph=True))
    for gradients in runs:
        for e, a in zip(expected, gradients):
            np.testing.assert_allclose(np.asarray(a), e, rtol=1e-4, atol=1e-4)


@pytest.mark.perf_contract
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow graphs")
def test_tensorflow_linear_graph_has_the_fusable_chain():
    """MatMul -> BiasAdd -> GELU in the traced graph, the chain oneDNN runs as one product.

    Also with an unknown batch size, and GRN folded into the product without XLA.
    """
    import tensorflow as tf

    rng = np.random.default_rng(13)
    x = rng.normal(size=(3, 6, 5, 8)).astype("float32")
    kernel, bias = rng.normal(size=(8, 12)).astype("float32"), rng.normal(size=12).astype("float32")
    spec = tf.TensorSpec((None, 6, 5, 8), tf.float32)
    traced = tf.function(lambda a: convnext_ops.linear_gelu(a, kernel, bias), input_signature=[spec])
    graph = traced.get_concrete_function().graph
    bias_add = [op for op in graph.get_operations() if op.type == "BiasAdd"]
    assert_speed_up_kept(
        len(bias_add) == 1 and bias_add[0].inputs[0].op.type == "MatMul", "no MatMul -> BiasAdd in the graph"
    )
    consumers = {consumer.type for consumer in _consumers_of(bias_add[0], depth=3)}
    assert_speed_up_kept({"Erfc", "Erf"} & consumers, f"no GELU after the BiasAdd: {consumers}")
    np.testing.assert_allclose(
        traced(x).numpy(), ops.convert_to_numpy(convnext_ops.portable_linear_gelu(x, kernel, bias)), rtol=1e-5, atol=1e-5
    )
    assert traced(x).shape == (3, 6, 5, 12) and traced.get_concrete_function().output_shapes == (None, 6, 5, 12)
    gamma, beta = rng.normal(size=(2, 8)).astype("float32")
    folded = tf.function(lambda a: convnext_ops.grn_linear(a, gamma, beta, kernel, bias), input_signature=[spec])
    np.testing.assert_allclose(
        folded(x).numpy(),
        ops.convert_to_numpy(convnext_ops.portable_grn_linear(x, gamma, beta, kernel, bias)),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.mark.perf_contract
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow graphs")
@pytest.mark.parametrize("batch", [3, None])
def test_tensorflow_layer_norm_is_one_fused_kernel(batch, monkeypatch):
    """oneDNN's single-pass LayerNorm after TensorFlow's graph optimizer, with a static batch too.

    Values and gradients (outside XLA, as in `fit`) against Keras' formulation,
    in float32 and bfloat16; Keras' formulation under XLA, while tracing for
    export, and where the fused kernel is not available.
    """
    import tensorflow as tf


    if not platform.tensorflow_fuses_layer_norm():
        pytest.skip("TensorFlow without oneDNN's graph rewrites, or with a GPU")
    rng = np.random.default_rng(17)
    x = (rng.normal(size=(3, 5, 6, 8)) * 3 + 1).astype("float32")
    gamma, beta = (rng.normal(size=(2, 8)) + 1).astype("float32")
    weights = rng.normal(size=x.shape).astype("float32")
    spec = tf.TensorSpec((batch, 5, 6, 8), tf.float32)

    def traced(fn, **kwargs):
        return tf.function(lambda a: fn(a, gamma, beta, 1e-6), input_signature=[spec], **kwargs)

    fused = traced(convnext_ops.layer_norm)
    assert_speed_up_kept("_MklLayerNorm" in _optimized_op_types(fused), "grappler no longer fuses LayerNorm")
    assert fused.get_concrete_function().output_shapes == (batch, 5, 6, 8)
    expected = ops.convert_to_numpy(convnext_ops.portable_layer_norm(x, gamma, beta, 1e-6))
    np.testing.assert_allclose(fused(x).numpy(), expected, rtol=1e-5, atol=1e-5)

    def gradients(fn):
        return _gradient(lambda a, g, b: fn(a, g, b, 1e-6), x, gamma, beta, weights, tensorflow_graph=True)

    for e, a in zip(gradients(convnext_ops.portable_layer_norm), gradients(convnext_ops.layer_norm)):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)
    x_bf16 = tf.cast(x, tf.bfloat16)
    bf16 = tf.function(lambda a: convnext_ops.layer_norm(a, gamma, beta, 1e-6))
    if _processor_has_avx512():  # oneDNN's bfloat16 kernels need it (not on an AVX2-only AMD EPYC)
        fused_types = _optimized_op_types(bf16, tf.TensorSpec(x.shape, tf.bfloat16))
        assert_speed_up_kept("_MklLayerNorm" in fused_types, "grappler no longer fuses LayerNorm in bfloat16")
    _assert_bfloat16_layer_norm_matches_keras(x_bf16, gamma, beta)
    np.testing.assert_allclose(
        tf.cast(bf16(x_bf16), tf.float32).numpy(),
        tf.cast(convnext_ops.portable_layer_norm(x_bf16, gamma, beta, 1e-6), tf.float32).numpy(),
        rtol=2e-2, atol=2e-2,
    )

    def batch_norms(fn):
        return [op for op in fn.get_concrete_function().graph.get_operations() if op.type == "FusedBatchNormV3"]

    assert_speed_up_kept(batch_norms(fused), "no FusedBatchNormV3 in the traced LayerNorm")
    assert not batch_norms(traced(convnext_ops.layer_norm, jit_compile=True))
    with config.fast_paths(False):
        assert not batch_norms(traced(convnext_ops.layer_norm))
    monkeypatch.setattr(platform, "tensorflow_fuses_layer_norm", lambda: False)
    assert not batch_norms(traced(convnext_ops.layer_norm))


def _processor_has_avx512():
    from keras_convnext.ops.platform import cpuinfo_field

    flags = cpuinfo_field("flags")
    return flags is None or "avx512" in flags  # unknown outside Linux: assert


def _optimized_op_types(fn, *specs):
    """Operation types of `fn`'s graph after TensorFlow's default graph optimizations (grappler)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.grappler import tf_optimizer

    concrete = fn.get_concrete_function(*specs)
    meta_graph = tf.compat.v1.train.export_meta_graph(graph_def=concrete.graph.as_graph_def(), graph=concrete.graph)
    meta_graph.collection_def["train_op"].node_list.value.extend(t.op.name for t in concrete.outputs)
    return {node.op for node in tf_optimizer.OptimizeGraph(config_pb2.ConfigProto(), meta_graph).node}


def _consumers_of(op, depth):
    found, frontier = [], [op]
    for _ in range(depth):
        frontier = [consumer for o in frontier for output in o.outputs for consumer in output.consumers()]
        found += frontier
    return found


def _inference():
    """No gradient tape where the backend has a global one (PyTorch), as in `predict`."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    import contextlib

    return contextlib.nullcontext()


def test_block_gelu_is_in_pwconv1_once():
    """The block's branch equals LayerNorm -> Linear -> GELU -> GRN -> Linear written out in numpy."""
    from keras_convnext.layers import ConvNeXtBlock

    rng = np.random.default_rng(12)
    block = ConvNeXtBlock(use_grn=True)
    x = rng.normal(size=(1, 33, 33, 4)).astype("float32")
    block.build(x.shape)
    for variable in block.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32") * 0.5)
    with _inference():
        actual = ops.convert_to_numpy(block(x))
    from math import erf

    h = ops.convert_to_numpy(block.dwconv(x)).astype("float64")
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    h = h * ops.convert_to_numpy(block.norm.gamma) + ops.convert_to_numpy(block.norm.beta)
    h = h @ ops.convert_to_numpy(block.pwconv1.kernel) + ops.convert_to_numpy(block.pwconv1.bias)
    h = h * 0.5 * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    norm = np.sqrt((h**2).sum(axis=(1, 2), keepdims=True))
    gamma, beta = ops.convert_to_numpy(block.grn.gamma), ops.convert_to_numpy(block.grn.beta)
    h = h + gamma * (h * norm / (norm.mean(-1, keepdims=True) + 1e-6)) + beta
    h = h @ ops.convert_to_numpy(block.pwconv2.kernel) + ops.convert_to_numpy(block.pwconv2.bias)
    np.testing.assert_allclose(actual, x + h, rtol=1e-4, atol=1e-3)


def _under_xla_on_tensorflow(fn):
    """`fn` compiled with XLA on TensorFlow (its XLA formulations), as it is elsewhere."""
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    return tf.function(fn, jit_compile=True)


def test_bfloat16_depthwise_rounds_once():
    """bfloat16 depthwise conv: float32 arithmetic on the bfloat16 values, rounded once.

    Summing the 49 terms in bfloat16 (the shifted form as written) rounds after
    every term: about 0.14 off here, against one rounding's 2**-8 relative.
    """
    rng = np.random.default_rng(13)
    x, kernel, bias = (
        ops.cast(a.astype("float32"), "bfloat16")
        for a in (rng.normal(size=(2, 12, 11, 64)), rng.normal(size=(7, 7, 64, 1)) * 0.3, rng.normal(size=64))
    )
    exact = ops.convert_to_numpy(
        convnext_ops.portable_depthwise_conv2d(*(ops.cast(a, "float32") for a in (x, kernel, bias)))
    )
    with _inference():
        actual = _under_xla_on_tensorflow(convnext_ops.depthwise_conv2d)(x, kernel, bias)
    assert keras.backend.standardize_dtype(actual.dtype) == "bfloat16"
    error = np.abs(ops.convert_to_numpy(ops.cast(actual, "float32")) - exact)
    assert np.all(error <= 2.0**-8 * np.abs(exact) + 1e-6), error.max()


@pytest.mark.parametrize("gelu", [False, True])
def test_bfloat16_linear_agrees_with_float32(gelu, monkeypatch):
    """bfloat16 Linear (with GELU) against float32 arithmetic on the same values; gradients too."""
    rng = np.random.default_rng(14)
    x, kernel, bias = (
        ops.cast(a.astype("float32"), "bfloat16")
        for a in (rng.normal(size=(2, 9, 7, 64)), rng.normal(size=(64, 24)) * 0.2, rng.normal(size=24))
    )
    fast, portable = (
        (convnext_ops.linear_gelu, convnext_ops.portable_linear_gelu)
        if gelu
        else (convnext_ops.linear, convnext_ops.portable_linear)
    )
    exact = ops.convert_to_numpy(portable(*(ops.cast(a, "float32") for a in (x, kernel, bias))))
    for _ in _each_inference_product(monkeypatch, "bfloat16"):
        with _inference():
            actual = fast(x, kernel, bias)
            from_variables = fast(x, keras.Variable(kernel, dtype="bfloat16"), keras.Variable(bias, dtype="bfloat16"))
        assert keras.backend.standardize_dtype(actual.dtype) == "bfloat16"
        np.testing.assert_array_equal(ops.convert_to_numpy(from_variables), ops.convert_to_numpy(actual))
        # a few bfloat16 roundings (2**-8 relative each) where a backend rounds the
        # product before the bias and GELU
        np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(actual, "float32")), exact, rtol=2e-2, atol=2e-2)
    if keras.backend.backend() == "jax":  # the gradient of the float32-result product
        import jax

        def loss(fn, a, k):
            return ops.sum(ops.cast(fn(a, k, bias), "float32") ** 2)

        expected = jax.grad(lambda a, k: loss(portable, a, k), argnums=(0, 1))(x, kernel)
        gradients = jax.grad(lambda a, k: loss(fast, a, k), argnums=(0, 1))(x, kernel)
        for e, a in zip(expected, gradients):
            assert a.dtype == e.dtype == jax.numpy.bfloat16
            scale = np.abs(np.asarray(e, "float32")).max()
            np.testing.assert_allclose(np.asarray(a, "float32"), np.asarray(e, "float32"), atol=3e-2 * scale)


def _special_and_random_float32():
    rng = np.random.default_rng(21)
    specials = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45,
         1.00390625, 1.01171875, -1.00390625, 65536.5, 3.3961776e38, 1.1754942e-38],
        "float32",
    )
    patterns = rng.integers(0, 2**32, size=50000, dtype=np.uint64).astype(np.uint32)
    signalling = np.array([0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FBFFFFF], np.uint32)
    return np.concatenate([specials, patterns.view("float32"), signalling.view("float32")])


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the integer rounding is JAX's")
def test_integer_rounding_to_bfloat16_gives_the_bits_of_a_cast():
    """Every float32 bit pattern rounds as `astype(bfloat16)` does; NaN stays NaN, even where its
    payload would carry into the sign bit; the gradient is the cast's."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from keras_convnext.ops.jax_backend import round_to_bfloat16

    values = _special_and_random_float32()
    rounded = np.asarray(jax.jit(round_to_bfloat16)(values))
    assert rounded.dtype == ml_dtypes.bfloat16
    nan = np.isnan(values)
    assert nan.sum() > 100 and np.isnan(rounded[nan].astype("float32")).all()
    expected = values[~nan].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(rounded[~nan].view(np.uint16), expected.view(np.uint16))
    gradient = jax.grad(lambda v: jnp.sum(round_to_bfloat16(v).astype(jnp.float32) * jnp.arange(4.0)))(jnp.ones(4))
    assert gradient.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(gradient), np.arange(4.0))


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the rounding inside JAX's product")
def test_jax_kernel_rounded_after_its_input_is_the_cast():
    """`rounded_after` gives the bits of `astype(bfloat16)` for every float32
    value (-0.0 stays -0.0), whatever the input value it is tied to (NaN and
    infinities included), and the cast's gradient; under a Keras distribution
    it is the plain cast, untied."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from keras_convnext.ops.jax_backend import rounded_after

    values = _special_and_random_float32()
    kernel = values[: values.size // 8 * 8].reshape(-1, 8)
    nan = np.isnan(kernel)
    with np.errstate(invalid="ignore"):  # NaN payloads
        expected = kernel.astype(ml_dtypes.bfloat16).view(np.uint16)
    for first in (np.nan, -np.nan, np.inf, -np.inf, -0.0, 3.0, -1e-45):
        inputs = np.full((2, 3, 8), 1.5, "float32")
        inputs[0, 0, 0] = first
        rounded = np.asarray(jax.jit(rounded_after)(kernel, jnp.asarray(inputs, jnp.bfloat16)))
        assert rounded.dtype == ml_dtypes.bfloat16
        assert np.isnan(rounded[nan].astype("float32")).all()
        np.testing.assert_array_equal(rounded[~nan].view(np.uint16), expected[~nan])
    def program(k, v):  # traced afresh each time: JAX caches a trace by function, not by Keras' state
        return str(jax.make_jaxpr(lambda a, b: rounded_after(a, b))(k, v))

    inputs = jnp.ones((2, 3, 8), jnp.bfloat16)
    tied = program(kernel, inputs)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()[:1]))
    try:  # no tie where the inputs may be split across devices
        untied = program(kernel, inputs)
    finally:
        keras.distribution.set_distribution(None)
    assert "clamp" in tied and "clamp" not in untied
    upstream = jnp.arange(24.0).reshape(3, 8)
    inputs = jnp.full((4, 8), jnp.nan, jnp.bfloat16)
    gradient = jax.grad(lambda k: jnp.sum(rounded_after(k, inputs).astype(jnp.float32) * upstream))(jnp.ones((3, 8)))
    assert gradient.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(gradient), np.asarray(upstream))


@pytest.mark.perf_contract
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA:CPU's schedule")
def test_jax_rounds_each_kernel_just_before_its_product(monkeypatch):
    """On JAX's CPU, `mixed_bfloat16` Linear layers of more than 256 rows round
    their float32 kernels inside the product, once its input exists: XLA's
    temporary buffer then holds a rounded kernel or two at a time, not all of
    them (which it does when each kernel is simply cast), and the outputs are
    the same."""
    import jax

    from keras_convnext.layers import PointwiseDense
    from keras_convnext.ops import jax_backend, platform

    if not platform.jax_on_cpu():
        pytest.skip("the float32 kernels are handed to the product on JAX's CPU only")
    width, depth = 512, 6
    layers = [PointwiseDense(width, dtype="mixed_bfloat16") for _ in range(depth)]
    model = keras.Sequential([keras.Input((300, 1, width))] + layers)
    x = np.random.default_rng(0).normal(size=(1, 300, 1, width)).astype("float32")
    weights = [v.value for v in model.trainable_variables]

    def compiled():
        program = jax.jit(lambda w, v: model.stateless_call(w, [], v)[0]).lower(weights, x).compile()
        return program.memory_analysis().temp_size_in_bytes, np.asarray(program(weights, x), "float32")

    tied_bytes, tied = compiled()
    monkeypatch.setattr(jax_backend, "rounded_after", lambda kernel, inputs: kernel.astype(inputs.dtype))
    cast_bytes, cast = compiled()
    kernel_bytes = width * width * 2
    assert cast_bytes > (depth - 1) * kernel_bytes  # every rounded kernel alive at once
    assert_speed_up_kept(
        tied_bytes < 3 * kernel_bytes, f"XLA's temporary buffer holds {tied_bytes} bytes (untied: {cast_bytes})"
    )
    np.testing.assert_array_equal(tied, cast)


@pytest.mark.perf_contract
def test_cast_rounded_is_a_cast():
    """`cast_rounded` equals `ops.cast` on every backend; on JAX's CPU it takes the integer rounding."""
    from keras_convnext.ops import platform, portable

    values = _special_and_random_float32()[:20000]
    finite = values[np.isfinite(values)]
    actual = ops.convert_to_numpy(ops.cast(convnext_ops.cast_rounded(ops.convert_to_tensor(finite), "bfloat16"), "float32"))
    expected = ops.convert_to_numpy(ops.cast(portable.cast(finite, "bfloat16"), "float32"))
    np.testing.assert_array_equal(actual, expected)
    unchanged = convnext_ops.cast_rounded(ops.convert_to_tensor(finite[:8]), "float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(unchanged), finite[:8])
    if keras.backend.backend() == "jax" and platform.jax_on_cpu():
        import jax

        program = jax.jit(lambda v: convnext_ops.cast_rounded(v, "bfloat16")).lower(finite).as_text()
        assert_speed_up_kept("bitcast_convert" in program, "the rounding is no longer the integer one")


def _randomize(model, seed):
    """Non-trivial weights: norm scales around 1, GRN gamma and beta and layer scales clearly
    nonzero, kernels scaled by their fan-in, small biases."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        path, shape = variable.path, tuple(variable.shape)
        noise = rng.normal(size=shape).astype("float32")
        if "grn" in path or "layer_scale" in path:
            value = 0.3 * noise + (0.5 if "layer_scale" in path else 0.0)
        elif "norm" in path and path.endswith("gamma"):
            value = 1.0 + 0.2 * noise
        elif len(shape) == 1:
            value = 0.05 * noise
        else:
            value = noise / np.sqrt(max(int(np.prod(shape[:-1])), 1))
        variable.assign(value)


def _inference_and_gradients(model, images, weights):
    """The logits at inference, and the loss `sum(logits * weights)` in training mode with
    its gradient for every trainable weight; each traced afresh (the switch is read when traced)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss(values):
            logits, _ = model.stateless_call(values, non_trainable, images, training=True)
            return (logits * weights).sum()

        logits = jax.jit(lambda t, x: model.stateless_call(t, non_trainable, x, training=False)[0])(trainable, images)
        value, gradients = jax.jit(jax.value_and_grad(loss))(trainable)
        return np.asarray(logits), float(value), [np.asarray(g) for g in gradients]
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                value = tf.reduce_sum(model(x, training=True) * weights)
            return model(x, training=False), value, tape.gradient(value, model.trainable_variables)

        logits, value, gradients = step(tf.constant(images))
        return logits.numpy(), float(value), [g.numpy() for g in gradients]
    import torch

    with torch.no_grad():
        logits = model(images).cpu().numpy()
    value = (model(images, training=True) * torch.from_numpy(weights)).sum()
    gradients = torch.autograd.grad(value, [v.value for v in model.trainable_variables])
    return logits, float(value.detach()), [g.cpu().numpy() for g in gradients]


def _record_backend_calls(monkeypatch):
    """Records which functions of the backends' fast-path modules run (or are traced)."""
    from keras_convnext.ops import jax_backend, tensorflow_backend, xla

    called = []
    for module in (jax_backend, tensorflow_backend, torch_backend, xla):
        for name in ("linear", "linear_gelu", "layer_norm", "grn", "grn_linear", "depthwise_conv2d",
                     "shifted_forward"):
            function = getattr(module, name, None)
            if function is not None:
                def recorded(*args, _function=function, _name=f"{module.__name__}.{name}", **kwargs):
                    called.append(_name)
                    return _function(*args, **kwargs)

                monkeypatch.setattr(module, name, recorded)
    return called


@pytest.mark.parametrize("constructor", ["ConvNeXtAtto", "ConvNeXtV2Atto"])
def test_models_compute_the_same_with_the_fast_paths_off(constructor, monkeypatch):
    """`config.fast_paths(False)` runs only the portable definitions, and a V1 and a V2 model
    give the same logits, training loss and gradients both ways (float32, random weights)."""
    import keras_convnext

    model = getattr(keras_convnext, constructor)(input_shape=(64, 64, 3), classes=10, classifier_activation=None)
    _randomize(model, seed=41)
    rng = np.random.default_rng(42)
    images = rng.uniform(0, 255, size=(2, 64, 64, 3)).astype("float32")
    weights = rng.normal(size=(2, 10)).astype("float32")
    called = _record_backend_calls(monkeypatch)
    with config.fast_paths(False):
        assert not config.fast_paths_enabled()
        portable_logits, portable_loss, portable_gradients = _inference_and_gradients(model, images, weights)
    assert called == []
    assert config.fast_paths_enabled()
    logits, loss, gradients = _inference_and_gradients(model, images, weights)
    assert called  # the fast paths did run
    assert np.abs(portable_logits).max() > 1.0  # not a degenerate model
    np.testing.assert_allclose(logits, portable_logits, rtol=1e-4, atol=1e-4 * np.abs(portable_logits).max())
    np.testing.assert_allclose(loss, portable_loss, rtol=1e-4, atol=1e-4)
    assert len(gradients) == len(portable_gradients) == len(model.trainable_variables)
    for variable, actual, expected in zip(model.trainable_variables, gradients, portable_gradients):
        scale = np.abs(expected).max()
        np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3 * scale + 1e-6, err_msg=variable.path)


def test_environment_variables_turn_the_fast_paths_and_compiled_calls_off(monkeypatch):
    """`KERAS_CONVNEXT_FAST_PATHS=0` and `KERAS_CONVNEXT_COMPILED_CALLS=0` when the package is
    imported, and `set_fast_paths`."""
    import importlib

    try:
        for value, enabled in (("0", False), ("off", False), ("1", True)):
            monkeypatch.setenv("KERAS_CONVNEXT_FAST_PATHS", value)
            monkeypatch.setenv("KERAS_CONVNEXT_COMPILED_CALLS", value)
            importlib.reload(config)
            assert config.fast_paths_enabled() is enabled
            assert config.compiled_calls_enabled() is enabled
            assert platform.fast_backend() == (keras.backend.backend() if enabled else None)
    finally:
        monkeypatch.delenv("KERAS_CONVNEXT_FAST_PATHS")
        monkeypatch.delenv("KERAS_CONVNEXT_COMPILED_CALLS")
        importlib.reload(config)
    assert config.fast_paths_enabled() and config.compiled_calls_enabled()
    config.set_fast_paths(False)
    try:
        assert platform.fast_backend() is None
    finally:
        config.set_fast_paths(True)
