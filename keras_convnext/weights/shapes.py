"""The weights a named ConvNeXt has, as `{weight path: shape}`, without building it.

Converting a registry checkpoint checks the tensors against this table, so
the conversion needs no model; tests/test_cache.py proves the table equal to
the weights of built models.
"""

from keras_convnext.models.isotropic import ISOTROPIC_VARIANTS, PATCH_SIZE
from keras_convnext.models.variants import VARIANTS
from keras_convnext.weights.naming import DECODER_PREFIX

MLP_RATIO = 4
KERNEL_SIZE = 7
# The decoder of the official FCMAE pre-training (the defaults of the official
# FCMAE model and pre-training script): every released checkpoint has it.
OFFICIAL_DECODER = {"decoder_dim": 512, "decoder_depth": 1, "patch_size": 32, "channels": 3}


def _block_shapes(prefix, dim, version):
    hidden = MLP_RATIO * dim
    shapes = {
        prefix + "dwconv/kernel": (KERNEL_SIZE, KERNEL_SIZE, dim, 1),
        prefix + "dwconv/bias": (dim,),
        prefix + "norm/gamma": (dim,),
        prefix + "norm/beta": (dim,),
        prefix + "pwconv1/kernel": (dim, hidden),
        prefix + "pwconv1/bias": (hidden,),
        prefix + "pwconv2/kernel": (hidden, dim),
        prefix + "pwconv2/bias": (dim,),
    }
    if version == "v2":
        shapes[prefix + "grn/gamma"] = (hidden,)
        shapes[prefix + "grn/beta"] = (hidden,)
    else:
        shapes[prefix + "layer_scale/gamma"] = (dim,)
    return shapes


def variant_shapes(variant_name, classes=None):
    """`{weight path: shape}` of `variant_name` (e.g. "ConvNeXtV2Tiny").

    `classes=None`: the backbone (`include_top=False`); otherwise the
    classifier with that many classes, head LayerNorm included.
    """
    if variant_name in ISOTROPIC_VARIANTS:
        return _isotropic_shapes(variant_name, classes)
    variant = VARIANTS[variant_name]
    dims = variant.stage_dims
    shapes = {
        "stem_conv/kernel": (4, 4, 3, dims[0]),
        "stem_conv/bias": (dims[0],),
        "stem_norm/gamma": (dims[0],),
        "stem_norm/beta": (dims[0],),
    }
    for stage, depth in enumerate(variant.stage_depths):
        if stage > 0:
            shapes[f"downsample{stage}_norm/gamma"] = (dims[stage - 1],)
            shapes[f"downsample{stage}_norm/beta"] = (dims[stage - 1],)
            shapes[f"downsample{stage}_conv/kernel"] = (2, 2, dims[stage - 1], dims[stage])
            shapes[f"downsample{stage}_conv/bias"] = (dims[stage],)
        for block in range(depth):
            shapes.update(_block_shapes(f"stage{stage}_block{block}/", dims[stage], variant.version))
    if classes is not None:
        shapes["head_norm/gamma"] = (dims[-1],)
        shapes["head_norm/beta"] = (dims[-1],)
        shapes["predictions/kernel"] = (dims[-1], classes)
        shapes["predictions/bias"] = (classes,)
    return shapes


def decoder_shapes(encoder_dim, decoder_dim, decoder_depth, patch_size, channels):
    """`{"decoder/<name>": shape}` of an FCMAE decoder (`FCMAEDecoder.named_weights()` names)."""
    shapes = {
        "mask_token": (decoder_dim,),
        "proj/kernel": (1, 1, encoder_dim, decoder_dim),
        "proj/bias": (decoder_dim,),
        "pred/kernel": (1, 1, decoder_dim, patch_size * patch_size * channels),
        "pred/bias": (patch_size * patch_size * channels,),
    }
    for block in range(decoder_depth):
        block_shapes = _block_shapes(f"block{block}/", decoder_dim, "v2")
        shapes.update(block_shapes)
    return {DECODER_PREFIX + name: shape for name, shape in shapes.items()}


def pretraining_shapes(variant_name):
    """`{weight path: shape}` of an official FCMAE checkpoint: the backbone and the official decoder."""
    shapes = variant_shapes(variant_name)
    shapes.update(decoder_shapes(VARIANTS[variant_name].stage_dims[-1], **OFFICIAL_DECODER))
    return shapes


def _isotropic_shapes(variant_name, classes):
    """`variant_shapes` of an isotropic ConvNeXt: patchify stem, V1 blocks without layer scale."""
    depth, dim = ISOTROPIC_VARIANTS[variant_name]
    shapes = {"stem_conv/kernel": (PATCH_SIZE, PATCH_SIZE, 3, dim), "stem_conv/bias": (dim,)}
    for block in range(depth):
        block_shapes = _block_shapes(f"block{block}/", dim, "v1")
        del block_shapes[f"block{block}/layer_scale/gamma"]
        shapes.update(block_shapes)
    if classes is not None:
        shapes.update({
            "head_norm/gamma": (dim,), "head_norm/beta": (dim,),
            "predictions/kernel": (dim, classes), "predictions/bias": (classes,),
        })
    return shapes
