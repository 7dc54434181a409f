import numpy as np
import pytest

import keras
from keras import ops

from keras_convnext import layers


def _numpy_grn(x, gamma, beta, eps=1e-6):
    norm = np.sqrt(np.sum(x.astype("float64") ** 2, axis=(1, 2), keepdims=True))
    relative = norm / (norm.mean(axis=-1, keepdims=True) + eps)
    return x + gamma * (x * relative) + beta


def _roundtrip(layer):
    config = layer.get_config()
    rebuilt = layer.__class__.from_config(config)
    assert rebuilt.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"].startswith("keras_convnext>")
    return rebuilt


def test_grn_matches_formula_and_is_identity_when_fresh():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 6)).astype("float32")
    layer = layers.GRN()
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), x, atol=1e-6)
    gamma = np.linspace(-1, 1, 6).astype("float32")
    beta = np.linspace(0.5, -0.5, 6).astype("float32")
    layer.set_weights([gamma, beta])
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), _numpy_grn(x, gamma, beta), atol=1e-5)
    _roundtrip(layer)


def test_grn_channels_first_equals_channels_last():
    x = np.random.default_rng(1).normal(size=(2, 5, 7, 6)).astype("float32")
    last, first = layers.GRN(), layers.GRN(data_format="channels_first")
    last.build(x.shape)
    first.build((2, 6, 5, 7))
    weights = [np.arange(6, dtype="float32") / 3, np.ones(6, "float32")]
    last.set_weights(weights)
    first.set_weights(weights)
    out_first = ops.convert_to_numpy(first(np.transpose(x, (0, 3, 1, 2))))
    np.testing.assert_allclose(np.transpose(out_first, (0, 2, 3, 1)), ops.convert_to_numpy(last(x)), atol=1e-5)


def test_grn_float16_does_not_overflow():
    # 56x56 values of 30: a float16 sum of squares would be 2.8e6 > 65504.
    x = np.full((1, 56, 56, 4), 30.0, "float16")
    layer = layers.GRN(dtype="mixed_float16")
    layer.build(x.shape)
    layer.set_weights([np.ones(4, "float32"), np.zeros(4, "float32")])
    out = ops.convert_to_numpy(layer(x)).astype("float32")
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, 60.0, rtol=1e-3)


def test_layer_scale():
    layer = layers.LayerScale(0.5)
    x = np.ones((2, 3, 3, 4), "float32")
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), 0.5 * x)
    assert _roundtrip(layer).init_value == 0.5


def test_stochastic_depth_per_sample_and_identity_at_inference():
    layer = layers.StochasticDepth(0.5, seed=3)
    x = np.ones((256, 2, 2, 3), "float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(layer(x, training=False)), x)
    out = ops.convert_to_numpy(layer(x, training=True))
    per_sample = out.reshape(256, -1)
    # each sample is either dropped entirely or kept and scaled by 1 / (1 - rate)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
    kept = (per_sample[:, 0] > 0).mean()
    assert 0.35 < kept < 0.65
    assert _roundtrip(layer).rate == 0.5
    with pytest.raises(ValueError, match="rate"):
        layers.StochasticDepth(1.0)


@pytest.mark.parametrize("use_grn,layer_scale", [(True, None), (False, 1e-6)])
def test_block_config_roundtrip_and_channels_first(use_grn, layer_scale):
    block = layers.ConvNeXtBlock(use_grn=use_grn, layer_scale_init_value=layer_scale, drop_path_rate=0.1)
    x = np.random.default_rng(2).normal(size=(2, 9, 9, 8)).astype("float32")
    out = ops.convert_to_numpy(block(x))
    assert out.shape == x.shape
    assert (block.grn is not None) == use_grn
    assert (block.layer_scale is not None) == (layer_scale is not None)
    rebuilt = _roundtrip(block)
    assert rebuilt.get_config()["drop_path_rate"] == 0.1

    first = layers.ConvNeXtBlock(
        use_grn=use_grn, layer_scale_init_value=layer_scale, data_format="channels_first"
    )
    first.build((2, 8, 9, 9))
    first.set_weights(block.get_weights())
    out_first = ops.convert_to_numpy(first(np.transpose(x, (0, 3, 1, 2))))
    np.testing.assert_allclose(np.transpose(out_first, (0, 2, 3, 1)), out, atol=1e-5)


def test_image_normalization():
    layer = layers.ImageNormalization()
    x = np.full((1, 2, 2, 3), 255.0, "float32")
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x))[0, 0, 0], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="input has 4"):
        layers.ImageNormalization()(np.zeros((1, 2, 2, 4), "float32"))
    _roundtrip(layer)


def test_image_normalization_rounds_once_under_a_16_bit_policy():
    """Under `mixed_bfloat16` the arithmetic runs in float32 and only the result is rounded."""
    import ml_dtypes

    pixels = np.random.default_rng(3).uniform(0, 255, size=(2, 16, 16, 3)).astype("float32")
    mean = np.array(layers.preprocessing.IMAGENET_MEAN, "float32")
    inv_std = np.array([1.0 / s for s in layers.preprocessing.IMAGENET_STD], "float32")
    expected = ((pixels - mean) * inv_std).astype(ml_dtypes.bfloat16).astype("float32")
    layer = layers.ImageNormalization(dtype="mixed_bfloat16")
    assert layer.input_dtype == "float32"
    out = layer(pixels)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    np.testing.assert_array_equal(ops.convert_to_numpy(ops.cast(out, "float32")), expected)
    # Rounded at each step instead, about a fifth of these values come out different.
    stepwise = pixels.astype(ml_dtypes.bfloat16)
    stepwise = (stepwise - mean.astype(ml_dtypes.bfloat16)).astype(ml_dtypes.bfloat16)
    stepwise = (stepwise * inv_std.astype(ml_dtypes.bfloat16)).astype(ml_dtypes.bfloat16)
    assert np.mean(stepwise.astype("float32") != expected) > 0.05
    # Integer pixels are converted in the layer, to the same values.
    whole = np.round(pixels).astype("uint8")
    expected_whole = ((whole.astype("float32") - mean) * inv_std).astype(ml_dtypes.bfloat16).astype("float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(ops.cast(layer(whole), "float32")), expected_whole)
    # channels_first (the per-channel broadcast) and a width unknown when traced give the same.
    first = layers.ImageNormalization(dtype="mixed_bfloat16", data_format="channels_first")
    out_first = ops.convert_to_numpy(ops.cast(first(np.transpose(pixels, (0, 3, 1, 2))), "float32"))
    np.testing.assert_array_equal(np.transpose(out_first, (0, 2, 3, 1)), expected)
    inputs = keras.Input((None, None, 3))
    flexible = keras.Model(inputs, layers.ImageNormalization(dtype="mixed_bfloat16")(inputs))
    out_flexible = ops.convert_to_numpy(ops.cast(flexible.predict_on_batch(pixels), "float32"))
    np.testing.assert_array_equal(out_flexible, expected)
    assert layers.ImageNormalization().input_dtype == "float32"
    assert layers.ImageNormalization(dtype="float64").input_dtype == "float64"


def test_host_truncated_normal_distribution_seeding_and_config():
    initializer = layers.HostTruncatedNormal(mean=0.1, stddev=0.02)
    values = ops.convert_to_numpy(initializer((256, 512)))
    assert values.shape == (256, 512) and values.dtype == np.float32
    assert np.abs(values - 0.1).max() <= 0.04 + 1e-7  # redrawn beyond two standard deviations
    # A normal cut at +-2 sigma has standard deviation 0.8796 sigma.
    assert abs(values.std() - 0.8796 * 0.02) < 2e-4 and abs(values.mean() - 0.1) < 2e-4
    assert not np.allclose(values, ops.convert_to_numpy(initializer((256, 512))))
    keras.utils.set_random_seed(7)
    first = ops.convert_to_numpy(initializer((64,)))
    keras.utils.set_random_seed(7)
    np.testing.assert_array_equal(first, ops.convert_to_numpy(initializer((64,))))
    seeded = layers.HostTruncatedNormal(stddev=0.02, seed=3)
    np.testing.assert_array_equal(ops.convert_to_numpy(seeded((5, 5))), ops.convert_to_numpy(seeded((5, 5))))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(seeded))
    assert isinstance(restored, layers.HostTruncatedNormal) and restored.get_config() == seeded.get_config()
    assert ops.convert_to_numpy(initializer((3,), dtype="float16")).dtype == np.float16


def test_weights_in_compute_dtype_without_a_cast_when_the_dtype_matches():
    from keras_convnext.layers.compute_dtype import compute_weights, in_compute_dtype, in_dtype

    dense = keras.layers.Dense(3, dtype="mixed_bfloat16")
    dense.build((None, 4))
    dense.kernel.assign(np.linspace(-1.0, 1.0, 12).reshape(4, 3).astype("float32"))
    kernel, bias = compute_weights(dense)
    assert keras.backend.standardize_dtype(kernel.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(bias.dtype) == "bfloat16"
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(kernel, "float32")), ops.convert_to_numpy(dense.kernel), atol=4e-3
    )
    value = in_compute_dtype(dense.kernel, "float32")
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    np.testing.assert_array_equal(ops.convert_to_numpy(value), ops.convert_to_numpy(dense.kernel))
    x = ops.ones((2, 3), dtype="float32")
    assert in_dtype(x, "float32") is x
    assert keras.backend.standardize_dtype(in_dtype(x, "bfloat16").dtype) == "bfloat16"


def test_stored_value_reads_the_float32_weight_inside_a_mixed_call():
    from keras_convnext.layers.compute_dtype import stored_value

    seen = {}

    class Probe(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(2,), initializer="ones")

        def call(self, x):
            seen["autocast"] = keras.backend.standardize_dtype(self.w.value.dtype)
            seen["stored"] = keras.backend.standardize_dtype(stored_value(self.w).dtype)
            return x

    Probe(dtype="mixed_bfloat16")(ops.ones((1, 2)))
    assert seen == {"autocast": "bfloat16", "stored": "float32"}


def _product_rule_input(positions_per_image, images):
    """Inputs and kernel whose product keeps what bfloat16 weights lose.

    The kernel's columns alternate (1 + 3 * 2**-10) and 1 over inputs that
    alternate +1 and -1: a bfloat16 kernel (both entries round to 1) gives 0,
    the float32 one 32 * 3 * 2**-10 = 0.09375 over 64 inputs.
    """
    kernel = np.ones((64, 4), "float32")
    kernel[0::2] += 3 * 2.0**-10
    x = np.ones((images, positions_per_image, 1, 64), "float32")
    x[..., 1::2] = -1.0
    return x, kernel


@pytest.mark.parametrize("positions,expected", [(8, 0.09375), (1600, 0.0)])
def test_bfloat16_linear_on_jax_cpu_reads_the_stored_kernel_for_small_products(positions, expected):
    """On JAX's CPU, a `mixed_bfloat16` Linear of up to 256 positions multiplies
    by its float32 kernel (no per-call rounding pass over the weights); larger
    ones, and every other backend, by the kernel rounded to bfloat16."""
    from keras_convnext.ops.platform import float32_kernel_pays, jax_on_cpu

    on_jax_cpu = keras.backend.backend() == "jax" and jax_on_cpu()
    assert float32_kernel_pays(256, "bfloat16", "float32") == on_jax_cpu
    assert not float32_kernel_pays(257, "bfloat16", "float32")
    assert not float32_kernel_pays(None, "bfloat16", "float32")  # positions unknown when traced
    assert not float32_kernel_pays(8, "float16", "float32")
    assert not float32_kernel_pays(8, "float32", "float32")

    x, kernel = _product_rule_input(positions, 2 if positions == 8 else 1)
    dense = layers.PointwiseDense(4, dtype="mixed_bfloat16")
    dense.build(x.shape)
    dense.kernel.assign(kernel)
    outputs = dense(x)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    values = ops.convert_to_numpy(ops.cast(outputs, "float32"))
    # float32 arithmetic on the float32 kernel, rounded once: 0.09375 is exact in bfloat16
    np.testing.assert_array_equal(values, np.full(values.shape, expected if on_jax_cpu else 0.0))

    if on_jax_cpu and positions == 8:  # the patch convolution's product follows the same rule
        patch = layers.PatchConv2D(4, 2, dtype="mixed_bfloat16")
        maps = np.ones((1, 4, 4, 16), "float32")
        maps[..., 1::2] = -1.0
        patch.build(maps.shape)
        patch.kernel.assign(kernel.reshape(2, 2, 16, 4))
        patched = ops.convert_to_numpy(ops.cast(patch(maps), "float32"))
        np.testing.assert_array_equal(patched, np.full((1, 2, 2, 4), 0.09375))


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the float32-kernel product is JAX's")
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("positions", [(5, 3), (20, 8)])
def test_bfloat16_linear_from_the_stored_kernel_agrees_with_float32_and_trains(activation, positions):
    """Values and gradients of the product from the stored float32 kernel
    against float32 arithmetic on the same values (the portable Linear in
    float32): the float32 kernel itself up to 256 rows (30 here), the kernel
    rounded to bfloat16 inside the product beyond (320 rows)."""
    import jax

    from keras_convnext import ops as convnext_ops

    rng = np.random.default_rng(3)
    x = rng.normal(size=(2,) + positions + (32,)).astype("float32")
    rounded = 2 * positions[0] * positions[1] > 256
    dense = layers.PointwiseDense(16, activation=activation, dtype="mixed_bfloat16")
    dense.build(x.shape)
    dense.kernel.assign(rng.normal(size=(32, 16)).astype("float32") * 0.3)
    dense.bias.assign(rng.normal(size=16).astype("float32"))
    x_bf16 = ops.cast(x, "bfloat16")
    portable = convnext_ops.portable_linear_gelu if activation else convnext_ops.portable_linear

    def reference(kernel, bias):
        kernel = ops.cast(ops.cast(kernel, "bfloat16"), "float32") if rounded else kernel
        return portable(ops.cast(x_bf16, "float32"), kernel, ops.cast(ops.cast(bias, "bfloat16"), "float32"))

    def ours(kernel, bias):
        return dense.stateless_call([kernel, bias], [], x_bf16)[0]

    weights = [v.value for v in dense.trainable_variables]
    actual, expected = ours(*weights), reference(*weights)
    assert actual.dtype == jax.numpy.bfloat16
    # one bfloat16 rounding of the output (2**-8 relative) apart, at most
    np.testing.assert_allclose(np.asarray(actual, "float32"), np.asarray(expected), rtol=2**-8, atol=1e-6)

    def loss(fn):
        return lambda k, b: ops.sum(ops.cast(fn(k, b), "float32") ** 2)

    gradients = jax.grad(loss(ours), argnums=(0, 1))(*weights)
    expected_gradients = jax.grad(loss(reference), argnums=(0, 1))(*weights)
    for g, e in zip(gradients, expected_gradients):
        assert g.dtype == jax.numpy.float32  # the variables' own dtype
        scale = np.abs(np.asarray(e)).max()
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=2e-2 * scale)
