"""The operations of the ConvNeXt layers.

- `portable`: the definitions, written once with `keras.ops`.
- `torch_backend`, `tensorflow_backend`, `jax_backend`, `xla`: each backend's
  faster formulations of those definitions.
- `platform`: which formulation applies here (backend, device, processor,
  compiler context, the fast-path switch), with the thresholds and their reasons.
- `dispatch`: one function per operation, asking `platform` and running the
  backend's formulation or the definition. Its functions are exported here;
  the definitions are exported with a `portable_` prefix.
"""

from keras_convnext.ops import portable
from keras_convnext.ops.dispatch import (
    cast_rounded,
    depthwise_conv2d,
    folded_grn_linear,
    grn,
    grn_linear,
    layer_norm,
    linear,
    linear_gelu,
    patch_conv2d,
    patch_linear,
)
from keras_convnext.ops.xla import shifted_depthwise_conv2d

portable_depthwise_conv2d = portable.depthwise_conv2d
portable_grn = portable.grn
portable_grn_linear = portable.grn_linear
portable_layer_norm = portable.layer_norm
portable_linear = portable.linear
portable_linear_gelu = portable.linear_gelu
portable_patch_conv2d = portable.patch_conv2d
