"""Isotropic ConvNeXt (V1 paper, section 3.3): one patchify stem, then blocks at one width.

No downsampling after the stem: a 16x16, stride-16 convolution (with no norm
after it, as in the official definition) cuts the image into patches, and
`depth` V1 blocks without layer scale keep that resolution and width, as a
ViT keeps its tokens. The head is the hierarchical models' head: global
average pooling, LayerNorm, Dense.
"""


import numpy as np
import keras

from keras_convnext.layers.block import ConvNeXtBlock, kernel_init
from keras_convnext.layers.pointwise import PatchConv2D
from keras_convnext.layers.preprocessing import ImageNormalization
from keras_convnext.models.convnext import _image_input, _is_integer, check_head_arguments, finish_model, head

PATCH_SIZE = 16

# Official sizes (facebookresearch/ConvNeXt, models/convnext_isotropic.py): (depth, dim).
ISOTROPIC_VARIANTS = {
    "ConvNeXtIsotropicSmall": (18, 384),
    "ConvNeXtIsotropicBase": (18, 768),
    "ConvNeXtIsotropicLarge": (36, 1024),
}


def ConvNeXtIsotropic(
    depth,
    dim,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    include_preprocessing=True,
    drop_path_rate=0.0,
    kernel_size=7,
    name=None,
    variant_name=None,
):
    """Builds an isotropic ConvNeXt classifier or backbone.

    Args:
        depth: number of blocks, a positive integer (18 or 36 officially).
        dim: channels of every block, a positive integer.
        include_top, weights, input_tensor, input_shape, pooling, classes,
            classifier_activation, include_preprocessing, drop_path_rate,
            kernel_size, name: as for `keras_convnext.ConvNeXt`.
        variant_name: name of the constructor (for weight lookup and errors).

    Returns:
        A `ConvNeXtModel`. With `include_top=False, pooling=None` its output
        is the stride-16 feature map `(batch, height // 16, width // 16, dim)`
        (channels_first: `(batch, dim, height // 16, width // 16)`).
    """
    for label, value in (("depth", depth), ("dim", dim)):
        if not (_is_integer(value) and value >= 1):
            raise ValueError(f"{label} must be a positive integer; got {value!r}.")
    check_head_arguments(include_top, pooling, classes, drop_path_rate, classifier_activation, name)
    data_format = keras.config.image_data_format()

    inputs, channels = _image_input(input_tensor, input_shape, data_format)
    x = inputs
    if include_preprocessing and channels == 3:
        x = ImageNormalization(data_format=data_format, name="preprocessing")(x)
    if data_format == "channels_first":
        x = keras.layers.Permute((2, 3, 1), name="to_channels_last")(x)

    x = PatchConv2D(dim, PATCH_SIZE, kernel_initializer=kernel_init(), name="stem_conv")(x)
    for block, rate in enumerate(np.linspace(0.0, drop_path_rate, depth)):
        # Layer scale init 0 in the official definition: the blocks have no layer scale.
        x = ConvNeXtBlock(
            use_grn=False,
            layer_scale_init_value=None,
            drop_path_rate=float(rate),
            kernel_size=kernel_size,
            data_format="channels_last",
            name=f"block{block}",
        )(x)

    x = head(x, include_top, pooling, classes, classifier_activation, data_format)
    return finish_model(
        inputs, x, input_tensor, name or (variant_name or "convnext_isotropic").lower(), weights, variant_name
    )


def isotropic_multiply_adds(depth, dim, image_size=(224, 224), classes=1000, kernel_size=7):
    """Multiply-accumulate count of one forward pass (the papers' "FLOPs").

    Counts the stem convolution, the blocks' convolutions and Linear layers
    and the head; norms and GELU are left out, as in the papers' tables.
    """
    patches = (image_size[0] // PATCH_SIZE) * (image_size[1] // PATCH_SIZE)
    stem = patches * PATCH_SIZE * PATCH_SIZE * 3 * dim
    per_block = patches * dim * (kernel_size * kernel_size + 8 * dim)
    return stem + depth * per_block + dim * classes


def _named_constructor(variant_name):
    depth, dim = ISOTROPIC_VARIANTS[variant_name]

    def constructor(**kwargs):
        return ConvNeXtIsotropic(depth, dim, variant_name=variant_name, **kwargs)

    constructor.__name__ = constructor.__qualname__ = variant_name
    constructor.__doc__ = (
        f"Isotropic ConvNeXt: a 16x16 patchify stem, then {depth} V1 blocks of width {dim}.\n\n"
        "Keyword arguments as `keras_convnext.models.isotropic.ConvNeXtIsotropic` "
        "(keras.applications-compatible: include_top, weights, input_shape, pooling, classes, ...)."
    )
    return constructor


ConvNeXtIsotropicSmall = _named_constructor("ConvNeXtIsotropicSmall")
ConvNeXtIsotropicBase = _named_constructor("ConvNeXtIsotropicBase")
ConvNeXtIsotropicLarge = _named_constructor("ConvNeXtIsotropicLarge")

ISOTROPIC_CONSTRUCTORS = {name: globals()[name] for name in ISOTROPIC_VARIANTS}
