"""One builder for every network of the roadmap, from a `RoadmapConfig`."""

import keras

from keras_convnext.layers import HostTruncatedNormal, LayerScale

BATCH_NORM_EPSILON = 1e-5
LAYER_NORM_EPSILON = 1e-6


def _initializer():
    # The ConvNeXt recipe's truncated normal, std 0.02, for every step, so
    # that the steps differ only in their architecture; drawn on the host, as
    # JAX would compile one program per weight shape.
    return HostTruncatedNormal(stddev=0.02)


def _norm(config, name):
    if config.norm == "batch":
        # PyTorch's BatchNorm2d: momentum 0.1 there is 0.9 here.
        return keras.layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, momentum=0.9, name=name)
    return keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=name)


def _conv(x, filters, kernel_size, strides, use_bias, name, depthwise=False, patches=False):
    """A conv padded as PyTorch pads it: `kernel_size // 2` zeros each side,
    or none for `patches` (non-overlapping, kernel size = stride)."""
    if kernel_size > 1 and not patches:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    if depthwise:
        return keras.layers.DepthwiseConv2D(
            kernel_size,
            strides=strides,
            use_bias=use_bias,
            depthwise_initializer=_initializer(),
            name=name,
        )(x)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        use_bias=use_bias,
        kernel_initializer=_initializer(),
        name=name,
    )(x)


def _stem(x, config):
    # A conv right before a BatchNorm needs no bias: the norm's shift replaces it.
    use_bias = config.norm != "batch"
    if config.stem == "patchify":
        x = _conv(x, config.width, 4, 4, use_bias, "stem_conv", patches=True)
        return _norm(config, "stem_norm")(x)
    x = _conv(x, config.width, 7, 2, use_bias, "stem_conv")
    x = _norm(config, "stem_norm")(x)
    x = keras.layers.Activation(config.activation, name="stem_act")(x)
    # Zero padding is PyTorch's -inf padding here: the inputs are >= 0 after ReLU.
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)


def _block(x, config, output_channels, inner_channels, strides, name):
    """One residual block: `act?(shortcut(x) + branch(x))`."""
    shortcut = x
    if strides != 1 or x.shape[-1] != output_channels:
        shortcut = _conv(x, output_channels, 1, strides, config.norm != "batch", f"{name}_shortcut_conv")
        shortcut = _norm(config, f"{name}_shortcut_norm")(shortcut)

    layout = config.block_layout
    for position, operation in enumerate(layout):
        layer_name = f"{name}_{operation}{layout[:position].count(operation) or ''}"
        followed_by_batch_norm = config.norm == "batch" and layout[position + 1 : position + 2] == ("norm",)
        if operation == "pointwise_in":
            x = _conv(x, inner_channels, 1, 1, not followed_by_batch_norm, layer_name)
        elif operation == "pointwise_out":
            x = _conv(x, output_channels, 1, 1, not followed_by_batch_norm, layer_name)
        elif operation == "spatial":
            x = _conv(
                x,
                x.shape[-1],
                config.spatial_kernel_size,
                strides,
                not followed_by_batch_norm,
                layer_name,
                depthwise=config.depthwise,
            )
        elif operation == "norm":
            x = _norm(config, layer_name)(x)
        else:
            x = keras.layers.Activation(config.activation, name=layer_name)(x)
    if config.layer_scale_init_value is not None:
        x = LayerScale(config.layer_scale_init_value, data_format="channels_last", name=f"{name}_layer_scale")(x)

    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    if config.activation_after_add:
        x = keras.layers.Activation(config.activation, name=f"{name}_out_act")(x)
    return x


def build_network(config, classes=1000, input_shape=(224, 224, 3), classifier_activation=None, name="roadmap"):
    """A `keras.Model` of the network `config` describes.

    Args:
        config: a `RoadmapConfig`.
        classes: outputs of the classifier.
        input_shape: `(height, width, channels)`, channels last; height and
            width of at least 32 (the networks downsample by 32).
        classifier_activation: None for logits, or a Keras activation name.
        name: the model's name.

    Returns:
        A functional `keras.Model` from normalized images
        `(batch, height, width, channels)` to `(batch, classes)`. Layers are
        named `stem_conv`, `stem_norm`, `downsample{i}_norm`,
        `downsample{i}_conv`, `stage{i}_block{j}_{operation}` after the
        block layout (a repeated operation numbered from its second use:
        `_norm`, `_norm1`, `_norm2`), `stage{i}_block{j}_shortcut_conv`,
        `head_norm` and `predictions`.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or any(size is not None and size < 32 for size in input_shape[:2]):
        raise ValueError(
            f"input_shape must be (height, width, channels) with height and width of at least 32; "
            f"got {input_shape}."
        )
    if classes < 1:
        raise ValueError(f"classes must be a positive integer; got {classes}.")
    inputs = keras.Input(shape=input_shape, name="images")
    x = _stem(inputs, config)
    for stage, depth in enumerate(config.stage_depths):
        output_channels, inner_channels = config.stage_channels(stage)
        if stage > 0 and config.downsampling == "separate":
            x = _norm(config, f"downsample{stage}_norm")(x)
            x = _conv(x, output_channels, 2, 2, True, f"downsample{stage}_conv", patches=True)
        for block in range(depth):
            strides = 2 if stage > 0 and block == 0 and config.downsampling == "in_block" else 1
            x = _block(x, config, output_channels, inner_channels, strides, f"stage{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if config.head_norm:
        x = _norm(config, "head_norm")(x)
    x = keras.layers.Dense(classes, kernel_initializer=_initializer(), name="predictions")(x)
    if classifier_activation is not None:
        x = keras.layers.Activation(classifier_activation, dtype="float32", name="activation")(x)
    return keras.Model(inputs, x, name=name)
