"""The feature pyramid of a ConvNeXt model: its four stage outputs, keyed by level."""

import keras

PYRAMID_LEVELS = ("P2", "P3", "P4", "P5")
"""Level `Pn` is the output of stage n - 2, `2**n` times smaller than the image."""


def model_data_format(model):
    """`"channels_first"` if `model` was built for channels-first images, else `"channels_last"`.

    The builder computes in channels_last and permutes channels-first inputs
    once, in the layer named `to_channels_last`; so this is read from the
    model, not from the current `keras.config.image_data_format()`.
    """
    names = {layer.name for layer in model.layers}
    return "channels_first" if "to_channels_last" in names else "channels_last"


def build_pyramid_outputs(model):
    """The feature maps of the four stages as `{"P2": ..., "P5": ...}` KerasTensors.

    Level `Pn` has stride `2**n` (4, 8, 16, 32 pixels) and `stage_dims[n - 2]`
    channels, in the model's image data format: `(batch, H / 2**n, W / 2**n,
    channels)` for channels_last, `(batch, channels, H / 2**n, W / 2**n)`
    for channels_first. The maps are the last block of each stage, before
    the head's LayerNorm, as in the official detection and segmentation
    backbones. The tensors belong to `model`'s graph, so
    `keras.Model(model.inputs, build_pyramid_outputs(model))` shares its
    weights; this is keras-hub's `FeaturePyramidBackbone.pyramid_outputs`
    contract, which `RetinaNetBackbone` and `DeepLabV3Backbone` read from
    their `image_encoder`.
    """
    channels_first = model_data_format(model) == "channels_first"
    outputs = {}
    for stage, level in enumerate(PYRAMID_LEVELS):
        blocks = [layer for layer in model.layers if layer.name.startswith(f"stage{stage}_block")]
        if not blocks:
            raise ValueError(
                f"{model.name} has no layers named stage{stage}_block*, so it has no level "
                f"{level} of a ConvNeXt feature pyramid; build it with keras_convnext.ConvNeXt."
            )
        output = blocks[-1].output
        if channels_first:
            output = keras.layers.Permute((3, 1, 2), name=f"{model.name}_{level}_channels_first")(output)
        outputs[level] = output
    return outputs
