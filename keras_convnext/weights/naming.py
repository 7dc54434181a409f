"""Checkpoint namings as data: each row maps a checkpoint key to a model weight.

A row is `(key pattern, model weight template, transform)`. Patterns are
anchored regular expressions with named groups (`stage`, `block`); the
template is filled from those groups to give the weight's Keras path, for
example `stage2_block5/pwconv1/kernel`. Transforms turn a PyTorch tensor
layout into the Keras one:

- `conv`: Conv2d weight (out, in, kh, kw) -> Keras (kh, kw, in, out): transpose (2, 3, 1, 0)
- `depthwise`: depthwise weight (channels, 1, kh, kw) -> (kh, kw, channels, 1): transpose (2, 3, 0, 1)
- `linear`: Linear weight (out, in) -> Dense kernel (in, out): `.T`
- `vector`: GRN (1, 1, 1, C) or (1, C), layer scale (C,) -> (C,)
- `sparse_depthwise`: MinkowskiEngine depthwise kernel (k*k, C) -> (k, k, C, 1)
- `sparse_conv`: MinkowskiEngine conv kernel (k*k, in, out) -> (k, k, in, out)

MinkowskiEngine enumerates the k*k kernel offsets with the column varying
slowest: offset `col * k + row` holds the dense weight at (row, col). A
reshape to (k, k, ...) therefore indexes (col, row) and needs a swap of the
first two axes.
"""

import re

import numpy as np


def _conv(array):
    return np.transpose(array, (2, 3, 1, 0))


def _depthwise(array):
    return np.transpose(array, (2, 3, 0, 1))


def _linear(array):
    return np.transpose(array)


def _vector(array):
    return np.reshape(array, (-1,))


def _sparse_offsets(array):
    """(k*k, ...) indexed by `col * k + row` -> (k, k, ...) indexed by (row, col)."""
    size = int(round(np.sqrt(array.shape[0])))
    if size * size != array.shape[0]:
        raise ValueError(f"A sparse conv kernel needs k*k offsets; got shape {array.shape}.")
    grid = np.reshape(array, (size, size) + tuple(array.shape[1:]))
    return np.swapaxes(grid, 0, 1)


def _sparse_depthwise(array):
    return _sparse_offsets(array)[..., np.newaxis]


TRANSFORMS = {
    None: None,
    "conv": _conv,
    "depthwise": _depthwise,
    "linear": _linear,
    "vector": _vector,
    "sparse_depthwise": _sparse_depthwise,
    "sparse_conv": _sparse_offsets,
}

NORM = [("weight", "gamma", None), ("bias", "beta", None)]
CONV = [("weight", "kernel", "conv"), ("bias", "bias", None)]
DEPTHWISE = [("weight", "kernel", "depthwise"), ("bias", "bias", None)]
LINEAR = [("weight", "kernel", "linear"), ("bias", "bias", None)]
BLOCK = "stage{stage}_block{block}"


def table(*groups):
    """Rows from `(key prefix regex, weight path prefix, [(suffix, name, transform)])` groups."""
    rows = []
    for key_prefix, target_prefix, params in groups:
        for suffix, name, transform in params:
            pattern = re.compile("^" + key_prefix + re.escape(suffix) + "$")
            rows.append((pattern, target_prefix + name, transform))
    return rows


# Meta's official repositories (facebookresearch/ConvNeXt and ConvNeXt-V2).
_OFFICIAL_BLOCK = r"stages\.(?P<stage>\d)\.(?P<block>\d+)\."
OFFICIAL = table(
    (r"downsample_layers\.0\.0\.", "stem_conv/", CONV),
    (r"downsample_layers\.0\.1\.", "stem_norm/", NORM),
    (r"downsample_layers\.(?P<stage>[1-3])\.0\.", "downsample{stage}_norm/", NORM),
    (r"downsample_layers\.(?P<stage>[1-3])\.1\.", "downsample{stage}_conv/", CONV),
    (_OFFICIAL_BLOCK + r"dwconv\.", BLOCK + "/dwconv/", DEPTHWISE),
    (_OFFICIAL_BLOCK + r"norm\.", BLOCK + "/norm/", NORM),
    (_OFFICIAL_BLOCK + r"pwconv1\.", BLOCK + "/pwconv1/", LINEAR),
    (_OFFICIAL_BLOCK + r"grn\.", BLOCK + "/grn/", [("gamma", "gamma", "vector"), ("beta", "beta", "vector")]),
    (_OFFICIAL_BLOCK + r"pwconv2\.", BLOCK + "/pwconv2/", LINEAR),
    (_OFFICIAL_BLOCK, BLOCK + "/layer_scale/", [("gamma", "gamma", "vector")]),
    (r"norm\.", "head_norm/", NORM),
    (r"head\.", "predictions/", LINEAR),
)

# timm (timm/models/convnext.py), V1 and V2.
_TIMM_BLOCK = r"stages\.(?P<stage>\d)\.blocks\.(?P<block>\d+)\."
TIMM = table(
    (r"stem\.0\.", "stem_conv/", CONV),
    (r"stem\.1\.", "stem_norm/", NORM),
    (r"stages\.(?P<stage>[1-3])\.downsample\.0\.", "downsample{stage}_norm/", NORM),
    (r"stages\.(?P<stage>[1-3])\.downsample\.1\.", "downsample{stage}_conv/", CONV),
    (_TIMM_BLOCK + r"conv_dw\.", BLOCK + "/dwconv/", DEPTHWISE),
    (_TIMM_BLOCK + r"norm\.", BLOCK + "/norm/", NORM),
    (_TIMM_BLOCK + r"mlp\.fc1\.", BLOCK + "/pwconv1/", LINEAR),
    (_TIMM_BLOCK + r"mlp\.grn\.", BLOCK + "/grn/", [("weight", "gamma", "vector"), ("bias", "beta", "vector")]),
    (_TIMM_BLOCK + r"mlp\.fc2\.", BLOCK + "/pwconv2/", LINEAR),
    (_TIMM_BLOCK, BLOCK + "/layer_scale/", [("gamma", "gamma", "vector")]),
    (r"head\.norm\.", "head_norm/", NORM),
    (r"head\.fc\.", "predictions/", LINEAR),
)

# HF transformers ConvNextForImageClassification / ConvNextV2ForImageClassification.
_HF = r"convnext(?:v2)?\."
_HF_BLOCK = _HF + r"encoder\.stages\.(?P<stage>\d)\.layers\.(?P<block>\d+)\."
HF = table(
    (_HF + r"embeddings\.patch_embeddings\.", "stem_conv/", CONV),
    (_HF + r"embeddings\.layernorm\.", "stem_norm/", NORM),
    (_HF + r"encoder\.stages\.(?P<stage>[1-3])\.downsampling_layer\.0\.", "downsample{stage}_norm/", NORM),
    (_HF + r"encoder\.stages\.(?P<stage>[1-3])\.downsampling_layer\.1\.", "downsample{stage}_conv/", CONV),
    (_HF_BLOCK + r"dwconv\.", BLOCK + "/dwconv/", DEPTHWISE),
    (_HF_BLOCK + r"layernorm\.", BLOCK + "/norm/", NORM),
    (_HF_BLOCK + r"pwconv1\.", BLOCK + "/pwconv1/", LINEAR),
    (_HF_BLOCK + r"grn\.", BLOCK + "/grn/", [("weight", "gamma", "vector"), ("bias", "beta", "vector")]),
    (_HF_BLOCK + r"pwconv2\.", BLOCK + "/pwconv2/", LINEAR),
    (_HF_BLOCK, BLOCK + "/layer_scale/", [("layer_scale_parameter", "gamma", "vector")]),
    (_HF + r"layernorm\.", "head_norm/", NORM),
    (r"classifier\.", "predictions/", LINEAR),
)

# Official FCMAE pre-training checkpoints (convnextv2_<size>_1k_224_fcmae.pt).
# The encoder is a MinkowskiEngine sparse network: LayerNorm and Linear sit in
# wrappers (`.ln.`, `.linear.`), GRN and conv biases are (1, C), and sparse
# conv kernels list their k*k offsets column-major (see `_sparse_offsets`).
# The stem is a dense Conv2d + LayerNorm.
_FCMAE_BLOCK = r"encoder\.stages\.(?P<stage>\d)\.(?P<block>\d+)\."
SPARSE_CONV = [("kernel", "kernel", "sparse_conv"), ("bias", "bias", "vector")]
FCMAE = table(
    (r"encoder\.downsample_layers\.0\.0\.", "stem_conv/", CONV),
    (r"encoder\.downsample_layers\.0\.1\.", "stem_norm/", NORM),
    (r"encoder\.downsample_layers\.(?P<stage>[1-3])\.0\.ln\.", "downsample{stage}_norm/", NORM),
    (r"encoder\.downsample_layers\.(?P<stage>[1-3])\.1\.", "downsample{stage}_conv/", SPARSE_CONV),
    (_FCMAE_BLOCK + r"dwconv\.", BLOCK + "/dwconv/", [("kernel", "kernel", "sparse_depthwise"), ("bias", "bias", "vector")]),
    (_FCMAE_BLOCK + r"norm\.ln\.", BLOCK + "/norm/", NORM),
    (_FCMAE_BLOCK + r"pwconv1\.linear\.", BLOCK + "/pwconv1/", LINEAR),
    (_FCMAE_BLOCK + r"grn\.", BLOCK + "/grn/", [("gamma", "gamma", "vector"), ("beta", "beta", "vector")]),
    (_FCMAE_BLOCK + r"pwconv2\.linear\.", BLOCK + "/pwconv2/", LINEAR),
)

# The FCMAE decoder, dense PyTorch layers, mapped to the names of
# `keras_convnext.fcmae.FCMAEDecoder.named_weights()`.
_DECODER_BLOCK = r"decoder\.(?P<block>\d+)\."
FCMAE_DECODER = table(
    (r"proj\.", "proj/", CONV),
    ("", "", [("mask_token", "mask_token", "vector")]),
    (_DECODER_BLOCK + r"dwconv\.", "block{block}/dwconv/", DEPTHWISE),
    (_DECODER_BLOCK + r"norm\.", "block{block}/norm/", NORM),
    (_DECODER_BLOCK + r"pwconv1\.", "block{block}/pwconv1/", LINEAR),
    (_DECODER_BLOCK + r"grn\.", "block{block}/grn/", [("gamma", "gamma", "vector"), ("beta", "beta", "vector")]),
    (_DECODER_BLOCK + r"pwconv2\.", "block{block}/pwconv2/", LINEAR),
    (r"pred\.", "pred/", CONV),
)

# Each naming: (name shown to users, marker pattern found in its keys, table).
NAMINGS = {
    "official": ("official Meta ConvNeXt", re.compile(r"^downsample_layers\.0\."), OFFICIAL),
    "timm": ("timm", re.compile(r"^stem\.0\."), TIMM),
    "hf": ("HF transformers", re.compile(r"^convnext(v2)?\.embeddings\."), HF),
    "fcmae": ("official FCMAE pre-training", re.compile(r"^encoder\.downsample_layers\.0\."), FCMAE),
}

# Namings of pre-training checkpoints: keys of parts a ConvNeXt classifier or
# backbone does not have (the FCMAE decoder), which loading skips, and no
# classification head, so a model with include_top=True keeps its fresh one.
NON_ENCODER_KEYS = {"fcmae": re.compile(r"^(proj\.|mask_token$|decoder\.|pred\.)")}

# Model weights that belong to the classification head.
HEAD_PREFIXES = ("head_norm/", "predictions/")
CLASSIFIER_PREFIX = "predictions/"
