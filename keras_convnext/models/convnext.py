"""One ConvNeXt builder (V1 and V2) and the named constructors over it."""

import numbers

import numpy as np
import keras

from keras_convnext.layers.block import ConvNeXtBlock, kernel_init, layer_norm
from keras_convnext.layers.pointwise import PatchConv2D
from keras_convnext.layers.preprocessing import ImageNormalization
from keras_convnext.models.model import ConvNeXtModel
from keras_convnext.models.variants import VARIANTS

# Four downsamplings (strides 4, 2, 2, 2) each need a whole patch.
MIN_IMAGE_SIZE = 32

# The shape of one image, in words, per data format.
IMAGE_LAYOUTS = {
    "channels_last": "(height, width, channels) for channels_last",
    "channels_first": "(channels, height, width) for channels_first",
}


def _image_input(input_tensor, input_shape, data_format):
    """The model's input tensor and its channel count, after checking their shape.

    `input_tensor` wins over `input_shape` (as in keras.applications); with
    neither, the model takes RGB images of any size of at least 32x32.
    """
    if input_tensor is not None:
        if not keras.backend.is_keras_tensor(input_tensor):
            raise ValueError(
                "input_tensor must be a Keras tensor, such as keras.Input(shape=(224, 224, 3)) "
                f"or the output of a layer; got {type(input_tensor).__name__}."
            )
        tensor_shape = tuple(input_tensor.shape)
        if len(tensor_shape) != 4:
            raise ValueError(
                f"input_tensor must be a batch of images, (batch,) + {IMAGE_LAYOUTS[data_format]}; "
                f"got a tensor of shape {tensor_shape}."
            )
        channels = _check_image_shape(tensor_shape[1:], data_format, f"input_tensor of shape {tensor_shape}")
        return input_tensor, channels
    if input_shape is None:
        input_shape = (None, None, 3) if data_format == "channels_last" else (3, None, None)
    try:
        input_shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a tuple {IMAGE_LAYOUTS[data_format]}; got {input_shape!r}.") from None
    channels = _check_image_shape(input_shape, data_format, f"input_shape={input_shape}")
    return keras.Input(shape=input_shape), channels


def _check_image_shape(shape, data_format, source):
    """The channel count of a per-image shape, or a ValueError naming what is wrong."""
    layout = IMAGE_LAYOUTS[data_format]
    if len(shape) != 3:
        raise ValueError(f"{source}: an image shape needs 3 entries, {layout}; got {len(shape)}.")
    for entry in shape:
        if entry is not None and (isinstance(entry, bool) or not isinstance(entry, numbers.Integral) or entry < 1):
            raise ValueError(f"{source}: each entry must be a positive integer or None; got {entry!r}.")
    if data_format == "channels_last":
        height, width, channels = shape
    else:
        channels, height, width = shape
    if channels is None:
        raise ValueError(
            f"{source} leaves the number of channels unknown ({layout}); the stem "
            "convolution's weights depend on it. Give it: 3 for RGB images."
        )
    for size in (height, width):
        if size is not None and size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"ConvNeXt downsamples by {MIN_IMAGE_SIZE}, so images must be at least "
                f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels; got {source}, {layout}."
            )
    return int(channels)


def _four_entries(value):
    try:
        return len(value) == 4
    except TypeError:  # an int, None: no length
        return False


def _check_arguments(version, stage_depths, stage_dims, kernel_size, include_top, pooling, classes, drop_path_rate,
                     classifier_activation, name):
    if version not in ("v1", "v2"):
        raise ValueError(f'version must be "v1" or "v2"; got {version!r}.')
    if not (_four_entries(stage_depths) and _four_entries(stage_dims)):
        raise ValueError(
            f"stage_depths and stage_dims need four entries each; got {stage_depths} and {stage_dims}."
        )
    if not all(_is_integer(depth) and depth >= 0 for depth in stage_depths):
        raise ValueError(f"stage_depths must be integers of at least 0; got {stage_depths}.")
    if not all(_is_integer(dim) and dim >= 1 for dim in stage_dims):
        raise ValueError(f"stage_dims must be positive integers; got {stage_dims}.")
    if not (_is_integer(kernel_size) and kernel_size >= 1 and kernel_size % 2 == 1):
        raise ValueError(f"kernel_size must be an odd positive integer (7 in every official model); got {kernel_size!r}.")
    check_head_arguments(include_top, pooling, classes, drop_path_rate, classifier_activation, name)


def check_head_arguments(include_top, pooling, classes, drop_path_rate, classifier_activation=None, name=None):
    """The checks every ConvNeXt builder shares: the head, the pooling, the drop-path rate and the name."""
    if name is not None and not isinstance(name, str):
        raise ValueError(f"name must be a string; got {name!r}.")
    if include_top and classifier_activation is not None and not callable(classifier_activation):
        try:
            keras.activations.get(classifier_activation)
        except (TypeError, ValueError):
            raise ValueError(
                "classifier_activation must be None (the head returns logits), the name of a Keras "
                f"activation such as 'softmax', or a callable; got {classifier_activation!r}."
            ) from None
    if pooling not in (None, "avg", "max"):
        raise ValueError(f'pooling must be None, "avg" or "max"; got {pooling!r}.')
    if include_top and not (_is_integer(classes) and classes >= 1):
        raise ValueError(f"classes must be a positive integer with include_top=True; got {classes!r}.")
    is_number = isinstance(drop_path_rate, numbers.Real) and not isinstance(drop_path_rate, bool)
    if not (is_number and 0.0 <= drop_path_rate < 1.0):
        raise ValueError(
            "drop_path_rate is the probability of dropping the last block's residual branch, "
            f"a number in [0, 1); got {drop_path_rate!r}."
        )


STAGES = 4


def remat_per_stage(remat):
    """Four booleans, one per stage, from `remat`: a boolean (every stage),
    stage indices (`(2,)`, `[0, 1]`) or four booleans (`(False, False, True, True)`)."""
    if isinstance(remat, (bool, np.bool_)):
        return (bool(remat),) * STAGES
    try:
        entries = tuple(remat)
    except TypeError:
        entries = None
    if entries is not None and len(entries) == STAGES and all(isinstance(e, (bool, np.bool_)) for e in entries):
        return tuple(bool(e) for e in entries)
    if entries is not None and all(_is_integer(e) and 0 <= e < STAGES for e in entries):
        return tuple(stage in entries for stage in range(STAGES))
    raise ValueError(
        "remat must be True or False (every stage), a tuple of stage indices from 0 to 3 such as (2, 3), "
        f"or four booleans, one per stage; got {remat!r}."
    )


def _is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def ConvNeXt(
    stage_depths,
    stage_dims,
    version="v2",
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    include_preprocessing=True,
    drop_path_rate=0.0,
    layer_scale_init_value=None,
    kernel_size=7,
    name=None,
    variant_name=None,
    remat=False,
):
    """Builds a ConvNeXt V1 or V2 classifier or backbone.

    Args:
        stage_depths: blocks per stage, four integers (for example `(3, 3, 9, 3)`).
        stage_dims: channels per stage, four integers (for example `(96, 192, 384, 768)`).
        version: `"v1"` (blocks with layer scale) or `"v2"` (blocks with GRN).
        include_top: end with the classification head (pool, LayerNorm, Dense).
        weights: None, a checkpoint path (official, timm, HF transformers or
            Keras `.weights.h5`), or a registry tag such as `"imagenet"`
            (`keras_convnext.list_weights()` lists them). The loader,
            `keras_convnext.weights`, sits above the models (it reads the
            variants table and builds models for `.weights.h5` files), so it
            is imported here, when weights are asked for, rather than when
            this module loads: data flows layers <- models <- weights.
        input_tensor: optional Keras tensor to build the model on, for
            example `keras.Input((224, 224, 3))` or a layer's output; it
            wins over `input_shape`.
        input_shape: one image's shape, `(height, width, channels)`
            (channels_last) or `(channels, height, width)` (channels_first).
            Height and width may be None (any size); every size of at least
            32 works: each downsampling floors, as in the PyTorch models. The
            channel count must be given. Default: RGB images of any size.
        pooling: with `include_top=False`, None (4D features), `"avg"` or `"max"`.
        classes: number of classes of the head, a positive integer.
        classifier_activation: activation of the head; None returns logits.
        include_preprocessing: with 3 input channels, the inputs are RGB
            pixels in [0, 255] and the model applies the ImageNet mean/std
            normalization itself (`keras_convnext.normalize_imagenet`).
            **With any other channel count (1, 4, ...) no normalization is
            applied, whatever this says**: the images reach the stem
            convolution as given, so scale them yourself. This is what
            keras.applications' ConvNeXt does.
        drop_path_rate: stochastic depth rate of the last block, in [0, 1);
            earlier blocks get linearly smaller rates, from 0 (official schedule).
        layer_scale_init_value: V1 layer scale initial value (default 1e-6);
            must be None for V2.
        kernel_size: depthwise kernel size (7 in every official model).
        name: model name.
        variant_name: name of the constructor (for weight lookup and errors).
        remat: gradient checkpointing, for every stage (`True`) or some:
            a tuple of stage indices (`(2,)`: the third stage, which holds
            most blocks) or four booleans, one per stage. Each such block
            keeps only its input for the backward pass and computes its
            residual branch again there (`keras.remat`: `jax.checkpoint` on
            JAX, `tf.recompute_grad` on TensorFlow, `torch.utils.checkpoint`
            on PyTorch), trading about one more forward pass for the memory
            of the blocks' activations in training. Outputs and gradients
            are the same. Saved in each block's config, so a `.keras` file
            keeps it.

    Returns:
        A `ConvNeXtModel` (a functional `keras.Model`). With
        `include_top=False, pooling=None` its output is the stride-32 feature
        map `(batch, height / 32, width / 32, dims[-1])`;
        `keras_convnext.stage_features(model)` gives all four stages.
    """
    _check_arguments(version, stage_depths, stage_dims, kernel_size, include_top, pooling, classes, drop_path_rate,
                     classifier_activation, name)
    classes = int(classes) if include_top else classes  # Keras' Dense takes Python integers only.
    if version == "v1" and layer_scale_init_value is None:
        layer_scale_init_value = 1e-6
    if version == "v2" and layer_scale_init_value is not None:
        raise ValueError("ConvNeXt V2 blocks have no layer scale; leave layer_scale_init_value=None.")
    stage_remat = remat_per_stage(remat)
    data_format = keras.config.image_data_format()

    inputs, channels = _image_input(input_tensor, input_shape, data_format)
    x = inputs
    # As keras.applications: the ImageNet statistics are RGB, so other channel
    # counts go to the stem as given.
    if include_preprocessing and channels == 3:
        x = ImageNormalization(data_format=data_format, name="preprocessing")(x)
    if data_format == "channels_first":
        # Every layer below computes in channels_last; the weights do not change.
        x = keras.layers.Permute((2, 3, 1), name="to_channels_last")(x)

    x = PatchConv2D(stage_dims[0], 4, kernel_initializer=kernel_init(), name="stem_conv")(x)
    x = layer_norm("stem_norm")(x)
    total_blocks = sum(stage_depths)
    block_rates = np.linspace(0.0, drop_path_rate, total_blocks) if total_blocks else []
    block_index = 0
    for stage, (depth, dim) in enumerate(zip(stage_depths, stage_dims)):
        if stage > 0:
            x = layer_norm(f"downsample{stage}_norm")(x)
            x = PatchConv2D(dim, 2, kernel_initializer=kernel_init(), name=f"downsample{stage}_conv")(x)
        for block in range(depth):
            x = ConvNeXtBlock(
                use_grn=version == "v2",
                layer_scale_init_value=layer_scale_init_value,
                drop_path_rate=float(block_rates[block_index]),
                kernel_size=kernel_size,
                data_format="channels_last",
                remat=stage_remat[stage],
                name=f"stage{stage}_block{block}",
            )(x)
            block_index += 1

    x = head(x, include_top, pooling, classes, classifier_activation, data_format)
    return finish_model(inputs, x, input_tensor, name or (variant_name or "convnext").lower(), weights, variant_name)


def head(x, include_top, pooling, classes, classifier_activation, data_format):
    """The end of every ConvNeXt on channels_last features `x`: the classifier (pool,
    LayerNorm, Dense), or the pooling, or the feature map back in `data_format`."""
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(data_format="channels_last", name="avg_pool")(x)
        x = layer_norm("head_norm")(x)
        x = keras.layers.Dense(int(classes), kernel_initializer=kernel_init(), name="predictions")(x)
        if classifier_activation is not None:
            x = keras.layers.Activation(classifier_activation, dtype="float32", name="activation")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(data_format="channels_last", name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(data_format="channels_last", name="max_pool")(x)
    elif data_format == "channels_first":
        x = keras.layers.Permute((3, 1, 2), name="to_channels_first")(x)
    return x


def finish_model(inputs, outputs, input_tensor, name, weights, variant_name):
    """The `ConvNeXtModel` from `inputs` (or `input_tensor`'s sources) to `outputs`, with `weights` loaded."""
    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
        inputs = inputs[0] if len(inputs) == 1 else inputs
    model = ConvNeXtModel(inputs, outputs, name=name)
    if weights is not None:
        from keras_convnext.weights import load_for_constructor

        load_for_constructor(model, weights, variant_name)
    return model


def stage_features(model):
    """A model mapping images to the four stage outputs of a ConvNeXt model.

    Returns a `keras.Model` with the same inputs and a list of four outputs,
    at strides 4, 8, 16 and 32: `(batch, H/4, W/4, dims[0])` ...
    `(batch, H/32, W/32, dims[3])` (channels_first: `(batch, dims[i], ...)`),
    for dense prediction heads (FPN, UperNet). The weights are shared with
    `model`. The stage outputs are taken before the head's LayerNorm, as in
    the official detection and segmentation backbones.
    """
    outputs = []
    for stage in range(4):
        blocks = [layer for layer in model.layers if layer.name.startswith(f"stage{stage}_block")]
        if not blocks:
            raise ValueError(f"{model.name} has no layers named stage{stage}_block*; is it a ConvNeXt?")
        output = blocks[-1].output
        if keras.config.image_data_format() == "channels_first":
            output = keras.layers.Permute((3, 1, 2), name=f"stage{stage}_channels_first")(output)
        outputs.append(output)
    return keras.Model(model.inputs, outputs, name=f"{model.name}_stage_features")


def _named_constructor(variant_name):
    variant = VARIANTS[variant_name]

    def constructor(
        include_top=True,
        weights=None,
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=1000,
        classifier_activation="softmax",
        include_preprocessing=True,
        drop_path_rate=0.0,
        name=None,
        remat=False,
        **kwargs,
    ):
        return ConvNeXt(
            variant.stage_depths,
            variant.stage_dims,
            version=variant.version,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            include_preprocessing=include_preprocessing,
            drop_path_rate=drop_path_rate,
            name=name,
            variant_name=variant_name,
            remat=remat,
            **kwargs,
        )

    family = "ConvNeXt V2 (GRN)" if variant.version == "v2" else "ConvNeXt V1 (layer scale)"
    extra = "layer_scale_init_value, kernel_size" if variant.version == "v1" else "kernel_size"
    constructor.__name__ = constructor.__qualname__ = variant_name
    constructor.__doc__ = (
        f"{family}, stage depths {variant.stage_depths}, dims {variant.stage_dims}.\n\n"
        f"Arguments as `keras_convnext.ConvNeXt` (keras.applications-compatible, "
        "plus `remat` for gradient checkpointing, `True` or per stage); "
        f"also accepts {extra}.\n\n"
        "Note: `include_preprocessing=True` normalizes 3-channel (RGB) inputs only; "
        "images with 1, 4 or any other number of channels reach the stem as given, "
        "as in keras.applications."
    )
    return constructor


ConvNeXtV2Atto = _named_constructor("ConvNeXtV2Atto")
ConvNeXtV2Femto = _named_constructor("ConvNeXtV2Femto")
ConvNeXtV2Pico = _named_constructor("ConvNeXtV2Pico")
ConvNeXtV2Nano = _named_constructor("ConvNeXtV2Nano")
ConvNeXtV2Tiny = _named_constructor("ConvNeXtV2Tiny")
ConvNeXtV2Base = _named_constructor("ConvNeXtV2Base")
ConvNeXtV2Large = _named_constructor("ConvNeXtV2Large")
ConvNeXtV2Huge = _named_constructor("ConvNeXtV2Huge")
ConvNeXtAtto = _named_constructor("ConvNeXtAtto")
ConvNeXtFemto = _named_constructor("ConvNeXtFemto")
ConvNeXtPico = _named_constructor("ConvNeXtPico")
ConvNeXtNano = _named_constructor("ConvNeXtNano")
ConvNeXtTiny = _named_constructor("ConvNeXtTiny")
ConvNeXtSmall = _named_constructor("ConvNeXtSmall")
ConvNeXtBase = _named_constructor("ConvNeXtBase")
ConvNeXtLarge = _named_constructor("ConvNeXtLarge")
ConvNeXtXLarge = _named_constructor("ConvNeXtXLarge")

CONSTRUCTORS = {name: globals()[name] for name in VARIANTS}
