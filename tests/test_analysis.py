"""Feature-collapse analysis: the paper's cosine distance, block activations, channel grids."""

import math
import os
import sys

import numpy as np
import pytest

import keras

import keras_convnext as kc
from keras_convnext import analysis


def explicit_distance(image):
    """The paper's double sum for one image `(h, w, c)`, written out pair by pair.

    Zero channels have cosine 0 with every channel (the documented convention).
    """
    vectors = image.reshape(-1, image.shape[-1]).T.astype(np.float64)
    channels = len(vectors)
    total = 0.0
    for i in range(channels):
        for j in range(channels):
            norms = np.linalg.norm(vectors[i]) * np.linalg.norm(vectors[j])
            cosine = vectors[i] @ vectors[j] / norms if norms > 0 else 0.0
            total += (1.0 - cosine) / 2.0
    return total / channels**2


def test_distance_matches_scikit_learn():
    from sklearn.metrics.pairwise import cosine_distances

    rng = np.random.default_rng(0)
    activations = rng.normal(size=(3, 5, 4, 7)) + rng.uniform(0, 1, size=(1, 1, 1, 7))
    expected = [
        # Y is a copy: sklearn sets the diagonal to 0 only for X is Y, which it is here anyway.
        np.mean(cosine_distances(image.reshape(-1, 7).T, image.reshape(-1, 7).T.copy())) / 2.0
        for image in activations
    ]
    np.testing.assert_allclose(analysis.pairwise_cosine_distance(activations), expected, rtol=1e-10)


def test_distance_matches_explicit_sum_with_dead_channels():
    rng = np.random.default_rng(1)
    activations = np.maximum(rng.normal(size=(2, 3, 3, 6)), 0.0)
    activations[0, ..., 2] = 0.0
    activations[1, ..., 4] = 0.0
    expected = [explicit_distance(image) for image in activations]
    np.testing.assert_allclose(analysis.pairwise_cosine_distance(activations), expected, rtol=1e-10)


def _as_batch(channel_vectors, height=2):
    """`(1, height, n / height, c)` from `c` vectors of length `n`."""
    vectors = np.asarray(channel_vectors, dtype=np.float64)
    return vectors.T.reshape(1, height, -1, len(vectors))


def test_known_answers():
    base = np.array([1.0, 2.0, 0.0, 3.0])
    one_hot = np.eye(4)
    cases = {
        # all cosines 1
        "identical and positive multiples": ([base, 2 * base, 0.5 * base], 0.0),
        # cosines 1 on the diagonal, 0 elsewhere: (1 - 1/C) / 2
        "pairwise orthogonal, C=4": (one_hot, 3 / 8),
        "pairwise orthogonal, C=2": (one_hot[:2], 1 / 4),
        # the unit vectors cancel: the maximum, 1/2
        "antipodal pair": ([base, -base], 0.5),
        "half X, half -X": ([base, base, -base, -3 * base], 0.5),
        # two identical channels and a dead one: (1 - (2/3)**2) / 2
        "dead channel": ([base, base, np.zeros(4)], 5 / 18),
    }
    for name, (vectors, expected) in cases.items():
        value = analysis.pairwise_cosine_distance(_as_batch(vectors))
        np.testing.assert_allclose(value, [expected], atol=1e-12, err_msg=name)


def test_distance_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\)"):
        analysis.pairwise_cosine_distance(np.ones((4, 4, 3)))


# -- real models ---------------------------------------------------------------


def _randomized(model, seed=0):
    """GRN and layer scale clearly nonzero, so every term of a block shows."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "/grn/" in variable.path or "/layer_scale/" in variable.path:
            variable.assign(rng.uniform(0.5, 1.5, size=shape).astype("float32"))
        elif variable.path.endswith("bias"):
            variable.assign(rng.normal(scale=0.1, size=shape).astype("float32"))
    return model


def _weights(layer):
    return {variable.path.split("/")[-1]: np.asarray(variable.numpy(), np.float64) for variable in layer.weights}


def _np_depthwise(x, layer):
    """'same' depthwise convolution of `(batch, h, w, c)`, odd kernel."""
    weights = _weights(layer)
    kernel = next(value for key, value in weights.items() if "kernel" in key)
    kernel = kernel.reshape(kernel.shape[0], kernel.shape[1], -1)
    size = kernel.shape[0]
    pad = size // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros_like(x) + weights["bias"]
    height, width = x.shape[1:3]
    for dy in range(size):
        for dx in range(size):
            out += padded[:, dy : dy + height, dx : dx + width] * kernel[dy, dx]
    return out


def _np_expansion(x, block):
    norm = _weights(block.norm)
    mean = x.mean(-1, keepdims=True)
    variance = x.var(-1, keepdims=True)
    x = (x - mean) / np.sqrt(variance + 1e-6) * norm["gamma"] + norm["beta"]
    linear = _weights(block.pwconv1)
    x = x @ linear["kernel"] + linear["bias"]
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _np_grn(x, block):
    """Woo et al. 2023, eqs. 1-3: x + gamma * (x * Nx) + beta."""
    weights = _weights(block.grn)
    spatial = np.sqrt(np.sum(np.square(x), axis=(1, 2), keepdims=True))
    normalized = spatial / (spatial.mean(-1, keepdims=True) + 1e-6)
    return x + weights["gamma"] * (x * normalized) + weights["beta"]


def _np_projection(x, block):
    linear = _weights(block.pwconv2)
    x = x @ linear["kernel"] + linear["bias"]
    if block.layer_scale is not None:
        x = x * _weights(block.layer_scale)["gamma"]
    return x


@pytest.mark.parametrize("constructor", ["ConvNeXtV2Atto", "ConvNeXtAtto"])
def test_block_activations_are_the_layers_inside_the_block(constructor):
    """Each tapped activation, rebuilt in numpy from the one before it, block 1 of stage 0."""
    model = _randomized(kc.CONSTRUCTORS[constructor](include_top=False, input_shape=(32, 32, 3)))
    images = np.random.default_rng(2).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    second = model.get_layer("stage0_block1")
    activations = ["dwconv", "expansion"] + (["grn"] if second.grn is not None else [])
    block_model = analysis.activation_model(model, "block", blocks=["stage0_block0", "stage0_block1"])
    block_outputs = block_model(model.input)
    outputs = [block_outputs["stage0_block0"], block_outputs["stage0_block1"]] + [
        analysis.BlockTap(second, name, name=f"tap_{name}")(second.input) for name in activations
    ]
    values = keras.Model(model.input, outputs).predict_on_batch(images)
    previous, output, taps = values[0], values[1], dict(zip(activations, values[2:]))
    previous = np.asarray(previous, np.float64)

    np.testing.assert_allclose(taps["dwconv"], _np_depthwise(previous, second.dwconv), atol=1e-4)
    expansion = _np_expansion(np.asarray(taps["dwconv"], np.float64), second)
    np.testing.assert_allclose(taps["expansion"], expansion, atol=1e-4)
    branch_input = np.asarray(taps["expansion"], np.float64)
    if second.grn is not None:
        np.testing.assert_allclose(taps["grn"], _np_grn(branch_input, second), atol=1e-4)
        branch_input = np.asarray(taps["grn"], np.float64)
    np.testing.assert_allclose(output, previous + _np_projection(branch_input, second), atol=1e-3)


ATTO_BLOCKS = [f"stage{stage}_block{block}" for stage, depth in enumerate((2, 2, 6, 2)) for block in range(depth)]


# V1 on the first two stages only: a smaller graph to compile, the same code.
@pytest.mark.parametrize("constructor, blocks", [("ConvNeXtV2Atto", None), ("ConvNeXtAtto", ATTO_BLOCKS[:4])])
def test_feature_collapse_on_a_model(constructor, blocks):
    model = kc.CONSTRUCTORS[constructor](include_top=False, input_shape=(32, 32, 3))
    images = np.random.default_rng(3).uniform(0, 255, size=(4, 32, 32, 3)).astype("float32")
    assert list(analysis.blocks_of(model)) == ATTO_BLOCKS

    distances = analysis.feature_collapse(model, images, blocks=blocks, batch_size=2)
    assert list(distances) == (blocks or ATTO_BLOCKS)
    assert all(0.0 <= value <= 0.5 for value in distances.values())
    # In one batch of four: the mean over images does not depend on batching.
    expansion = analysis.block_activations(model, images, blocks=["stage1_block0"], batch_size=4)
    assert expansion["stage1_block0"].shape == (4, 4, 4, 4 * 80)
    np.testing.assert_allclose(
        distances["stage1_block0"], analysis.pairwise_cosine_distance(expansion["stage1_block0"]).mean(), rtol=1e-5
    )


def test_channels_first_model_gives_the_same_distances():
    images = np.random.default_rng(6).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    model = kc.ConvNeXtV2Atto(include_top=False, input_shape=(32, 32, 3))
    expected = analysis.feature_collapse(model, images, blocks=["stage0_block1"])
    keras.config.set_image_data_format("channels_first")
    transposed = kc.ConvNeXtV2Atto(include_top=False, input_shape=(3, 32, 32))
    transposed.set_weights(model.get_weights())
    got = analysis.feature_collapse(transposed, images.transpose(0, 3, 1, 2), blocks=["stage0_block1"])
    np.testing.assert_allclose(got["stage0_block1"], expected["stage0_block1"], rtol=1e-5)


def test_fcmae_is_analysed_through_its_encoder():
    fcmae = kc.FCMAE("ConvNeXtV2Atto", input_shape=(64, 64, 3), decoder_dim=16, seed=0)
    images = np.random.default_rng(4).uniform(0, 255, size=(2, 64, 64, 3)).astype("float32")
    assert list(analysis.blocks_of(fcmae)) == list(analysis.blocks_of(fcmae.encoder))
    through_fcmae = analysis.feature_collapse(fcmae, images, activation="grn", blocks=["stage0_block1"])
    direct = analysis.block_activations(fcmae.encoder, images, activation="grn", blocks=["stage0_block1"])
    np.testing.assert_allclose(
        through_fcmae["stage0_block1"], analysis.pairwise_cosine_distance(direct["stage0_block1"]).mean(), rtol=1e-6
    )


def test_clear_errors():
    model = kc.ConvNeXtAtto(include_top=False, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="no GRN"):
        analysis.activation_model(model, "grn")
    with pytest.raises(ValueError, match="No block named stage9_block0"):
        analysis.activation_model(model, blocks=["stage9_block0"])
    with pytest.raises(ValueError, match="activation must be one of"):
        analysis.activation_model(model, "gelu")
    with pytest.raises(ValueError, match="no ConvNeXt blocks"):
        analysis.blocks_of(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))


# -- channel grids -------------------------------------------------------------


def test_top_channels_orders():
    activation = np.zeros((2, 2, 4))
    activation[..., 0] = 1.0  # mean 1, std 0
    activation[..., 1] = [[0.0, 4.0], [0.0, 0.0]]  # mean 1, std ~1.73
    activation[..., 2] = 3.0  # mean 3, std 0
    activation[..., 3] = [[-1.0, 1.0], [-1.0, 1.0]]  # mean 0, std 1
    np.testing.assert_array_equal(analysis.top_channels(activation, 3, "mean"), [2, 0, 1])
    np.testing.assert_array_equal(analysis.top_channels(activation, 2, "std"), [1, 3])
    np.testing.assert_array_equal(analysis.top_channels(activation, 9, "index"), [0, 1, 2, 3])


def test_channel_grid_places_and_scales_maps():
    activation = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    grid = analysis.channel_grid(activation, channels=[4, 1, 3], columns=2, normalize=None)
    assert grid.shape == (2 * 2, 2 * 3)
    np.testing.assert_array_equal(grid[0:2, 0:3], activation[..., 4])
    np.testing.assert_array_equal(grid[0:2, 3:6], activation[..., 1])
    np.testing.assert_array_equal(grid[2:4, 0:3], activation[..., 3])
    np.testing.assert_array_equal(grid[2:4, 3:6], 0.0)

    scaled = analysis.channel_grid(activation, channels=[4, 1, 3], columns=2)
    low, high = activation[..., [4, 1, 3]].min(), activation[..., [4, 1, 3]].max()
    np.testing.assert_allclose(scaled[0:2, 0:3], (activation[..., 4] - low) / (high - low))
    per_channel = analysis.channel_grid(activation, channels=[4], normalize="channel")
    assert per_channel.min() == 0.0 and per_channel.max() == 1.0


def test_channel_activation_grid_of_a_model():
    model = kc.ConvNeXtV2Atto(include_top=False, input_shape=(32, 32, 3))
    image = np.random.default_rng(5).uniform(0, 255, size=(32, 32, 3)).astype("float32")
    grid = analysis.channel_activation_grid(model, image, "stage0_block0", k=10, columns=5)
    assert grid.shape == (2 * 8, 5 * 8)
    assert 0.0 <= grid.min() and grid.max() == 1.0


def test_saving_writes_files_and_names_matplotlib(tmp_path, monkeypatch):
    grid = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    path = analysis.save_grid(grid, str(tmp_path / "grid.png"), scale=2)
    from matplotlib import image

    assert image.imread(path).shape[:2] == (6, 8)
    curves = {"a": {"stage0_block0": 0.4, "stage1_block0": 0.2}, "b": {"stage0_block0": 0.3, "stage1_block0": 0.1}}
    plot = analysis.plot_feature_collapse(curves, str(tmp_path / "curves.png"))
    assert os.path.getsize(plot) > 0
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "grid.png"]
    # Several runs per block: the same mean line, plus a band from their minimum to maximum.
    runs = {"a": {"stage0_block0": [0.3, 0.5], "stage1_block0": [0.1, 0.2, 0.3]}, "b": curves["b"]}
    banded = analysis.plot_feature_collapse(runs, str(tmp_path / "runs.png"), normalized_depth=True)
    means = analysis.plot_feature_collapse(curves, str(tmp_path / "means.png"), normalized_depth=True)
    assert image.imread(banded).shape == image.imread(means).shape
    assert not np.array_equal(image.imread(banded), image.imread(means))
    for name in ("runs.png", "means.png"):
        os.remove(tmp_path / name)

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.image", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        analysis.save_grid(grid, str(tmp_path / "other.png"))
