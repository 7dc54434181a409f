"""Backend fast paths, each beside its portable keras.ops formulation."""


from keras_convnext.ops.depthwise import (
    depthwise_conv2d,
    portable_depthwise_conv2d,
    shifted_depthwise_conv2d,
)
from keras_convnext.ops.pointwise import (
    grn,
    grn_linear,
    layer_norm,
    linear,
    linear_gelu,
    patch_conv2d,
    portable_grn,
    portable_grn_linear,
    portable_layer_norm,
    portable_linear,
    portable_linear_gelu,
    portable_patch_conv2d,
)
