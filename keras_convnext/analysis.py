"""Feature-collapse analysis of ConvNeXt blocks (ConvNeXt V2, Woo et al. 2023, sec. 3).

The ConvNeXt V2 paper motivates GRN by "feature collapse": FCMAE pre-training
of V1 blocks leaves many dead, saturated or redundant channels in the
dimension-expansion layer of each block. It shows this in two ways, both
available here for any ConvNeXt V1 or V2 model built by keras_convnext and for
the encoder of a `keras_convnext.FCMAE`:

- `feature_collapse(model, images)`: per block, the average pairwise cosine
  distance between channels (the paper's Figure 4);
- `channel_activation_grid(model, image, block)`: one block's channel maps
  side by side as one image (the paper's Figure 3), with `save_grid` and
  `plot_feature_collapse` to write them as image files (matplotlib).

Which activation of a block is analysed (`activation=`):

- `"expansion"` (default): the output of the dimension-expansion Linear
  `pwconv1` after its GELU, `(batch, h, w, mlp_ratio * channels)`, the layer the
  paper analyses;
- `"grn"`: the same after GRN (V2 blocks only);
- `"dwconv"`: the depthwise convolution's output, `(batch, h, w, channels)`;
- `"block"`: the block's output, residual stream included.

Models run at inference (`training=False`), densely on whole images: an FCMAE
encoder is analysed as it is fine-tuned, without masking.
"""

import os

import numpy as np
import keras
from keras import ops

from keras_convnext.fcmae import FCMAE
from keras_convnext.layers.block import ConvNeXtBlock

ACTIVATIONS = ("expansion", "grn", "dwconv", "block")
CHANNEL_ORDERS = ("mean", "std", "index")
GRID_NORMALIZATIONS = ("grid", "channel", None)
MATPLOTLIB_MISSING = "Saving figures needs matplotlib: pip install matplotlib"


def _backbone(model):
    """The ConvNeXt model to analyse: the model itself, or an FCMAE's encoder."""
    if isinstance(model, FCMAE):
        return model.encoder
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Expected a keras_convnext ConvNeXt model or FCMAE; got {type(model).__name__}."
        )
    return model


def blocks_of(model):
    """The model's ConvNeXt blocks in depth order, as `{name: ConvNeXtBlock}`.

    Names follow `stage{i}_block{j}`. `model` is a ConvNeXt V1 or V2 model
    built by keras_convnext (with or without head) or a `keras_convnext.FCMAE`.
    """
    backbone = _backbone(model)
    blocks = {layer.name: layer for layer in backbone.layers if isinstance(layer, ConvNeXtBlock)}
    if not blocks:
        raise ValueError(
            f"'{backbone.name}' has no ConvNeXt blocks; pass a model built by keras_convnext "
            "(for example keras_convnext.ConvNeXtV2Atto(include_top=False)) or an FCMAE."
        )
    return blocks


def _channels_last(x, data_format):
    return ops.transpose(x, (0, 2, 3, 1)) if data_format == "channels_first" else x


def _check_request(model, activation, blocks):
    """The `{name: block}` to analyse, after checking the arguments."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}.")
    available = blocks_of(model)
    names = list(available) if blocks is None else list(blocks)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"No block named {', '.join(unknown)}; the model's blocks are {', '.join(available)}."
        )
    if activation == "grn":
        v1_blocks = [name for name in names if available[name].grn is None]
        if v1_blocks:
            raise ValueError(
                f"Blocks {', '.join(v1_blocks)} have no GRN (ConvNeXt V1 blocks); use "
                "activation='expansion', 'dwconv' or 'block'."
            )
    return {name: available[name] for name in names}


class BlockTap(keras.layers.Layer):
    """One activation inside a ConvNeXt block, computed from the block's input.

    Calls the block's public sublayers (`dwconv`, `norm`, `pwconv1` with its
    GELU, `grn`) as the block's residual branch does, and returns
    `(batch, h, w, channels)` channels_last. It holds no weights of its own:
    the block's are used. A probe for `activation_model`, not meant to be
    saved with a model.
    """

    def __init__(self, block, activation="expansion", **kwargs):
        super().__init__(dtype=block.dtype_policy, **kwargs)
        self.block = block
        self.activation = activation

    def call(self, inputs):
        x = self.block.dwconv(_channels_last(inputs, self.block.data_format))
        if self.activation == "dwconv":
            return x
        x = self.block.pwconv1(self.block.norm(x))
        return self.block.grn(x) if self.activation == "grn" else x

    def compute_output_shape(self, input_shape):
        if self.block.data_format == "channels_first":
            input_shape = (input_shape[0], input_shape[2], input_shape[3], input_shape[1])
        if self.activation == "dwconv":
            return tuple(input_shape)
        return tuple(input_shape[:-1]) + (self.block.pwconv1.units,)


def activation_model(model, activation="expansion", blocks=None):
    """A `keras.Model` from the model's images to one activation per block.

    Args:
        model: a keras_convnext ConvNeXt model or a `keras_convnext.FCMAE`.
        activation: one of `ACTIVATIONS` (see the module docstring).
        blocks: block names (`"stage0_block0"` ...) to include; None: all.

    Returns:
        A model that shares `model`'s weights and maps the same inputs to a
        dict `{block name: (batch, h, w, channels)}`, channels_last. The
        activation inside a block is a `BlockTap` on the block's input, so
        the model's own graph is left as it is.
    """
    selected = _check_request(model, activation, blocks)
    outputs = {}
    for name, block in selected.items():
        if activation == "block":
            outputs[name] = _channels_last(block.output, block.data_format)
        else:
            outputs[name] = BlockTap(block, activation, name=f"{name}_{activation}_tap")(block.input)
    backbone = _backbone(model)
    return keras.Model(backbone.input, outputs, name=f"{backbone.name}_{activation}_activations")


def _read(extractor, batch):
    outputs = extractor.predict_on_batch(batch)
    return {name: np.asarray(values, dtype=np.float32) for name, values in outputs.items()}


def _batches(images, batch_size):
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"images must be a batch (batch, height, width, channels) (or channels_first); "
            f"got shape {images.shape}."
        )
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def block_activations(model, images, activation="expansion", blocks=None, batch_size=32):
    """Each block's `activation` for `images`, as numpy arrays.

    Args:
        model: a keras_convnext ConvNeXt model or a `keras_convnext.FCMAE`.
        images: `(batch, height, width, 3)` as the model takes them (pixels
            in [0, 255] with the default preprocessing).
        activation: one of `ACTIVATIONS`.
        blocks: block names to include; None: all.
        batch_size: images per forward pass.

    Returns:
        `{block name: (batch, h, w, channels)}` float32, channels_last, in
        depth order. All of them are held in memory: for many images, use
        `feature_collapse`, which keeps only the distances.
    """
    extractor = activation_model(model, activation, blocks)
    parts = [_read(extractor, batch) for batch in _batches(images, batch_size)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def pairwise_cosine_distance(activations):
    """Average pairwise cosine distance between channels, per image.

    The feature cosine distance of ConvNeXt V2 (Woo et al. 2023, sec. 3,
    "Feature cosine distance analysis", Figure 4): for one image, the
    activation `X` `(H, W, C)` gives `C` vectors `X_i` of length `H * W`, and

        distance = 1 / C**2 * sum_i sum_j (1 - cos(X_i, X_j)) / 2,

    the sum running over all ordered pairs, `i == j` included. A higher value
    means more diverse channels, a lower one redundant channels.

    Since `sum_ij cos(X_i, X_j) = ||sum_i u_i||**2` for the unit vectors
    `u_i = X_i / ||X_i||`, this is `(1 - ||mean_i u_i||**2) / 2`, computed in
    O(C * H * W). It lies in [0, 0.5]: 0 when all channels point the same way,
    (C - 1) / (2 C) for pairwise orthogonal channels, 0.5 when the unit
    vectors cancel (for example half the channels `X`, half `-X`). For
    non-negative activations every cosine is >= 0, so the value is at most
    (C - 1) / (2 C). A channel that is zero everywhere has cosine 0 with
    every channel, itself included (the convention of
    `torch.nn.functional.cosine_similarity`).

    Args:
        activations: `(batch, height, width, channels)`, channels_last.

    Returns:
        `(batch,)` float64, one distance per image.
    """
    x = np.asarray(activations, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(
            f"activations must be (batch, height, width, channels); got shape {x.shape}."
        )
    vectors = x.reshape(x.shape[0], -1, x.shape[-1])
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    units = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    mean_unit = units.mean(axis=-1)
    return (1.0 - np.sum(np.square(mean_unit), axis=-1)) / 2.0


def feature_collapse(model, images, activation="expansion", blocks=None, batch_size=32):
    """Per block, the average pairwise cosine distance between channels (ConvNeXt V2, Fig. 4).

    For each image and block, `pairwise_cosine_distance` of the block's
    `activation` (default: the expansion layer's output after GELU, the layer
    the paper analyses); then the mean over images, as in the paper.

    Args:
        model: a keras_convnext ConvNeXt V1 or V2 model (with or without
            head) or a `keras_convnext.FCMAE` (its encoder is analysed).
        images: `(batch, height, width, 3)` as the model takes them.
        activation: one of `ACTIVATIONS`.
        blocks: block names to include; None: all.
        batch_size: images per forward pass; only the distances are kept.

    Returns:
        `{block name: distance}`, floats in [0, 0.5], in depth order.
    """
    extractor = activation_model(model, activation, blocks)
    distances = {}
    for batch in _batches(images, batch_size):
        outputs = _read(extractor, batch)
        for name, values in outputs.items():
            distances.setdefault(name, []).append(pairwise_cosine_distance(values))
    return {name: float(np.mean(np.concatenate(parts))) for name, parts in distances.items()}


def top_channels(activation, k, order="mean"):
    """Indices of `k` channels of one image's activation `(height, width, channels)`.

    `order`: `"mean"`, the largest spatial means first; `"std"`, the largest
    spatial standard deviations first (the most structured maps); `"index"`,
    the first `k` channels. Returns `(min(k, channels),)` int indices.
    """
    activation = np.asarray(activation)
    if activation.ndim != 3:
        raise ValueError(f"activation must be (height, width, channels); got shape {activation.shape}.")
    if order not in CHANNEL_ORDERS:
        raise ValueError(f"order must be one of {', '.join(CHANNEL_ORDERS)}; got {order!r}.")
    count = min(int(k), activation.shape[-1])
    if order == "index":
        return np.arange(count)
    flat = activation.reshape(-1, activation.shape[-1]).astype(np.float64)
    scores = flat.mean(axis=0) if order == "mean" else flat.std(axis=0)
    # Stable sort of the negated scores: ties keep channel order.
    return np.argsort(-scores, kind="stable")[:count]


def channel_grid(activation, channels=None, columns=None, normalize="grid"):
    """Channel maps of one image tiled into one image.

    Args:
        activation: `(h, w, channels)`, one image's activation.
        channels: channel indices to show, in order (row by row); None: all.
        columns: maps per row; None: `ceil(sqrt(len(channels)))`.
        normalize: `"grid"` scales all maps by the grid's common minimum
            and maximum to [0, 1] (dead and saturated channels stay visible
            as such); `"channel"` scales each map by its own range; None
            keeps the values.

    Returns:
        `(rows * h, columns * w)` float32, channel `channels[n]` at row
        `n // columns`, column `n % columns`; empty cells are 0.
    """
    activation = np.asarray(activation, dtype=np.float32)
    if activation.ndim != 3:
        raise ValueError(f"activation must be (height, width, channels); got shape {activation.shape}.")
    if normalize not in GRID_NORMALIZATIONS:
        raise ValueError(f"normalize must be 'grid', 'channel' or None; got {normalize!r}.")
    channels = np.arange(activation.shape[-1]) if channels is None else np.asarray(channels, dtype=int)
    maps = np.moveaxis(activation[..., channels], -1, 0)  # (n, h, w)
    if normalize == "grid":
        maps = _scale(maps, maps.min(), maps.max())
    elif normalize == "channel":
        maps = _scale(maps, maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True))
    count, height, width = maps.shape
    columns = int(columns or np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = np.zeros((rows * height, columns * width), dtype=np.float32)
    for n in range(count):
        row, column = divmod(n, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = maps[n]
    return grid


def _scale(maps, low, high):
    span = np.maximum(high - low, np.finfo(np.float32).tiny)
    return (maps - low) / span


def channel_activation_grid(
    model, image, block, k=64, activation="expansion", order="mean", columns=None, normalize="grid"
):
    """The top-`k` channel maps of one block for one image, as one grid (ConvNeXt V2, Fig. 3).

    Args:
        model: a keras_convnext ConvNeXt model or a `keras_convnext.FCMAE`.
        image: `(height, width, 3)` or `(1, height, width, 3)`, as the model takes it.
        block: a block name such as `"stage2_block1"`.
        k: how many channels to show.
        activation: one of `ACTIVATIONS`.
        order: how channels are chosen, see `top_channels`.
        columns, normalize: see `channel_grid`.

    Returns:
        `(rows * h, columns * w)` float32 (`h, w`: the block's spatial size).
    """
    image = np.asarray(image)
    batch = image[None] if image.ndim == 3 else image
    if batch.shape[0] != 1:
        raise ValueError(f"channel_activation_grid takes one image; got a batch of {batch.shape[0]}.")
    values = block_activations(model, batch, activation, blocks=[block])[block][0]
    return channel_grid(values, top_channels(values, k, order), columns, normalize)


def _matplotlib():
    try:
        import matplotlib.image
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(MATPLOTLIB_MISSING) from None
    return matplotlib.image, Figure


def _write_atomically(path, write):
    """Calls `write(temporary_path, format)`, then renames the file to `path`."""
    root, extension = os.path.splitext(path)
    file_format = extension.lstrip(".").lower() or "png"
    temporary = f"{root}.partial.{file_format}"
    try:
        write(temporary, file_format)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def save_grid(grid, path, scale=4, cmap="viridis"):
    """Writes a grid from `channel_grid` as an image file (PNG by default; needs matplotlib).

    Values are taken in [0, 1]; each cell becomes `scale` x `scale` pixels.
    Returns `path`.
    """
    image_module, _ = _matplotlib()
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"grid must be 2D (rows * h, columns * w); got shape {grid.shape}.")
    pixels = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    return _write_atomically(
        path, lambda target, fmt: image_module.imsave(target, pixels, cmap=cmap, vmin=0.0, vmax=1.0, format=fmt)
    )


def plot_feature_collapse(curves, path, title="Feature cosine distance per block", normalized_depth=False):
    """Plots per-block distances of several models, as the paper's Figure 4 (needs matplotlib).

    Args:
        curves: `{label: {block name: distance}}`, for example
            `{"V1 + FCMAE": feature_collapse(v1, images), ...}`; a distance
            may be a list (one value per run, for example per seed): the
            line is then their mean and a band spans their minimum to maximum.
        path: image file to write (PNG by default).
        normalized_depth: the x axis is the block's position divided by the
            number of blocks (the paper's "normalized layer index", which
            compares networks of different depths), instead of the position
            in depth order (1 = first block).

    Dotted lines separate the stages of the first curve. The y axis ends at
    the distance's maximum, 0.5, and starts just below the lowest value.
    Returns `path`.
    """
    _, Figure = _matplotlib()
    figure = Figure(figsize=(6, 3.5))
    axis = figure.add_subplot()
    for label, distances in curves.items():
        runs = [np.atleast_1d(np.asarray(value, dtype=np.float64)) for value in distances.values()]
        positions = np.arange(1, len(runs) + 1) / (len(runs) if normalized_depth else 1)
        line = axis.plot(positions, [values.mean() for values in runs], marker="o", markersize=4, label=label)
        if max(values.size for values in runs) > 1:
            axis.fill_between(positions, [values.min() for values in runs], [values.max() for values in runs],
                              color=line[0].get_color(), alpha=0.2, linewidth=0)
    first = list(next(iter(curves.values())))
    for index in range(1, len(first)):
        if first[index].split("_")[0] != first[index - 1].split("_")[0]:
            boundary = index + 0.5
            axis.axvline(boundary / len(first) if normalized_depth else boundary,
                         color="gray", linestyle=":", linewidth=1)
    if normalized_depth:
        axis.set_xlabel("normalized layer index (block / blocks; dotted: stage boundaries)")
    else:
        axis.set_xlabel("block (depth order; dotted: stage boundaries)")
    axis.set_ylabel("average cosine distance (max 0.5)")
    axis.set_ylim(top=0.5)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    return _write_atomically(path, lambda target, fmt: figure.savefig(target, format=fmt, dpi=120))
