"""Checkpoint namings as data: each row maps a checkpoint key to a model weight.

A row is `(key template, weight template, transform)`, for example
`("stages.{stage}.{block}.pwconv1.weight", "stage{stage}_block{block}/pwconv1/kernel", "linear")`.
Placeholders are `{stage}` (one digit), `{block}` (a number) and `{hf}` (HF
transformers' model prefix, `convnext` or `convnextv2`); the key template is
compiled into an anchored regular expression, and filling it back from a
weight path names the tensor a checkpoint lacks in its own naming. Rows are
tried in order; the first that matches a key wins.

Transforms turn a PyTorch tensor layout into the Keras one. Each accepts
exactly one documented layout and refuses any other (nothing is reshaped to
fit):

- `conv`: Conv2d weight (out, in, kh, kw) -> Keras (kh, kw, in, out): transpose (2, 3, 1, 0)
- `depthwise`: depthwise weight (channels, 1, kh, kw) -> (kh, kw, channels, 1): transpose (2, 3, 0, 1)
- `linear`: Linear weight (out, in) -> Dense kernel (in, out): `.T`
- `vector`: (C,) as it is (timm's GRN, layer scale)
- `nhwc_vector`: GRN (1, 1, 1, C) of the official and HF models -> (C,)
- `nchw_vector`: FCMAE mask token (1, C, 1, 1) -> (C,)
- `row`: MinkowskiEngine GRN and biases (1, C) -> (C,)
- `sparse_depthwise`: MinkowskiEngine depthwise kernel (k*k, C) -> (k, k, C, 1)
- `sparse_conv`: MinkowskiEngine conv kernel (k*k, in, out) -> (k, k, in, out)

MinkowskiEngine enumerates the k*k kernel offsets with the column varying
slowest: offset `col * k + row` holds the dense weight at (row, col). A
reshape to (k, k, ...) therefore indexes (col, row) and needs a swap of the
first two axes.
"""

import re

import numpy as np


class LayoutError(ValueError):
    """A tensor is not in the layout its naming documents."""


def _require(array, expected, layout):
    """Raises LayoutError unless `array.shape` fits `expected` (None: any size)."""
    shape = tuple(array.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        raise LayoutError(f"shape {shape}, expected {layout}")


def _conv(array):
    _require(array, (None, None, None, None), "(out, in, kh, kw)")
    return np.transpose(array, (2, 3, 1, 0))


def _depthwise(array):
    _require(array, (None, 1, None, None), "(channels, 1, kh, kw)")
    return np.transpose(array, (2, 3, 0, 1))


def _linear(array):
    _require(array, (None, None), "(out, in)")
    return np.transpose(array)


def _vector(array):
    _require(array, (None,), "(C,)")
    return array


def _nhwc_vector(array):
    _require(array, (1, 1, 1, None), "(1, 1, 1, C)")
    return array[0, 0, 0]


def _nchw_vector(array):
    _require(array, (1, None, 1, 1), "(1, C, 1, 1)")
    return array[0, :, 0, 0]


def _row(array):
    _require(array, (1, None), "(1, C)")
    return array[0]


def _sparse_offsets(array):
    """(k*k, ...) indexed by `col * k + row` -> (k, k, ...) indexed by (row, col)."""
    size = int(round(np.sqrt(array.shape[0]))) if array.ndim else 0
    if size * size != (array.shape[0] if array.ndim else -1):
        raise LayoutError(f"shape {tuple(array.shape)}, expected k*k kernel offsets first")
    grid = np.reshape(array, (size, size) + tuple(array.shape[1:]))
    return np.swapaxes(grid, 0, 1)


def _sparse_depthwise(array):
    _require(array, (None, None), "(k*k, C)")
    return _sparse_offsets(array)[..., np.newaxis]


def _sparse_conv(array):
    _require(array, (None, None, None), "(k*k, in, out)")
    return _sparse_offsets(array)


TRANSFORMS = {
    None: None,
    "conv": _conv,
    "depthwise": _depthwise,
    "linear": _linear,
    "vector": _vector,
    "nhwc_vector": _nhwc_vector,
    "nchw_vector": _nchw_vector,
    "row": _row,
    "sparse_depthwise": _sparse_depthwise,
    "sparse_conv": _sparse_conv,
}

PLACEHOLDERS = {"stage": r"\d", "block": r"\d+", "hf": r"convnext(?:v2)?"}


def compile_template(template):
    """An anchored regex with one named group per `{placeholder}` of `template`."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        f"(?P<{part}>{PLACEHOLDERS[part]})" if index % 2 else re.escape(part)
        for index, part in enumerate(parts)
    )
    return re.compile("^" + pattern + "$")


NORM = [("weight", "gamma", None), ("bias", "beta", None)]
CONV = [("weight", "kernel", "conv"), ("bias", "bias", None)]
DEPTHWISE = [("weight", "kernel", "depthwise"), ("bias", "bias", None)]
LINEAR = [("weight", "kernel", "linear"), ("bias", "bias", None)]
BLOCK = "stage{stage}_block{block}"


def table(*groups):
    """Rows `(key regex, key template, weight template, transform)` from
    `(key prefix template, weight prefix template, [(suffix, name, transform)])` groups."""
    rows = []
    for key_prefix, target_prefix, params in groups:
        for suffix, name, transform in params:
            key = key_prefix + suffix
            rows.append((compile_template(key), key, target_prefix + name, transform))
    return rows


# Meta's official repositories (facebookresearch/ConvNeXt and ConvNeXt-V2).
_OFFICIAL_BLOCK = "stages.{stage}.{block}."
OFFICIAL = table(
    ("downsample_layers.0.0.", "stem_conv/", CONV),
    ("downsample_layers.0.1.", "stem_norm/", NORM),
    ("downsample_layers.{stage}.0.", "downsample{stage}_norm/", NORM),
    ("downsample_layers.{stage}.1.", "downsample{stage}_conv/", CONV),
    (_OFFICIAL_BLOCK + "dwconv.", BLOCK + "/dwconv/", DEPTHWISE),
    (_OFFICIAL_BLOCK + "norm.", BLOCK + "/norm/", NORM),
    (_OFFICIAL_BLOCK + "pwconv1.", BLOCK + "/pwconv1/", LINEAR),
    (_OFFICIAL_BLOCK + "grn.", BLOCK + "/grn/", [("gamma", "gamma", "nhwc_vector"), ("beta", "beta", "nhwc_vector")]),
    (_OFFICIAL_BLOCK + "pwconv2.", BLOCK + "/pwconv2/", LINEAR),
    (_OFFICIAL_BLOCK, BLOCK + "/layer_scale/", [("gamma", "gamma", "vector")]),
    ("norm.", "head_norm/", NORM),
    ("head.", "predictions/", LINEAR),
)

# Meta's official isotropic ConvNeXt (facebookresearch/ConvNeXt, models/convnext_isotropic.py):
# a single patchify convolution, then a flat list of blocks without layer scale.
_ISOTROPIC_BLOCK = "blocks.{block}."
ISOTROPIC_BLOCK = "block{block}"
OFFICIAL_ISOTROPIC = table(
    ("stem.", "stem_conv/", CONV),
    (_ISOTROPIC_BLOCK + "dwconv.", ISOTROPIC_BLOCK + "/dwconv/", DEPTHWISE),
    (_ISOTROPIC_BLOCK + "norm.", ISOTROPIC_BLOCK + "/norm/", NORM),
    (_ISOTROPIC_BLOCK + "pwconv1.", ISOTROPIC_BLOCK + "/pwconv1/", LINEAR),
    (_ISOTROPIC_BLOCK + "pwconv2.", ISOTROPIC_BLOCK + "/pwconv2/", LINEAR),
    ("norm.", "head_norm/", NORM),
    ("head.", "predictions/", LINEAR),
)

# timm (timm/models/convnext.py), V1 and V2.
_TIMM_BLOCK = "stages.{stage}.blocks.{block}."
TIMM = table(
    ("stem.0.", "stem_conv/", CONV),
    ("stem.1.", "stem_norm/", NORM),
    ("stages.{stage}.downsample.0.", "downsample{stage}_norm/", NORM),
    ("stages.{stage}.downsample.1.", "downsample{stage}_conv/", CONV),
    (_TIMM_BLOCK + "conv_dw.", BLOCK + "/dwconv/", DEPTHWISE),
    (_TIMM_BLOCK + "norm.", BLOCK + "/norm/", NORM),
    (_TIMM_BLOCK + "mlp.fc1.", BLOCK + "/pwconv1/", LINEAR),
    (_TIMM_BLOCK + "mlp.grn.", BLOCK + "/grn/", [("weight", "gamma", "vector"), ("bias", "beta", "vector")]),
    (_TIMM_BLOCK + "mlp.fc2.", BLOCK + "/pwconv2/", LINEAR),
    (_TIMM_BLOCK, BLOCK + "/layer_scale/", [("gamma", "gamma", "vector")]),
    ("head.norm.", "head_norm/", NORM),
    ("head.fc.", "predictions/", LINEAR),
)

# HF transformers ConvNextForImageClassification / ConvNextV2ForImageClassification.
_HF_BLOCK = "{hf}.encoder.stages.{stage}.layers.{block}."
HF = table(
    ("{hf}.embeddings.patch_embeddings.", "stem_conv/", CONV),
    ("{hf}.embeddings.layernorm.", "stem_norm/", NORM),
    ("{hf}.encoder.stages.{stage}.downsampling_layer.0.", "downsample{stage}_norm/", NORM),
    ("{hf}.encoder.stages.{stage}.downsampling_layer.1.", "downsample{stage}_conv/", CONV),
    (_HF_BLOCK + "dwconv.", BLOCK + "/dwconv/", DEPTHWISE),
    (_HF_BLOCK + "layernorm.", BLOCK + "/norm/", NORM),
    (_HF_BLOCK + "pwconv1.", BLOCK + "/pwconv1/", LINEAR),
    (_HF_BLOCK + "grn.", BLOCK + "/grn/", [("weight", "gamma", "nhwc_vector"), ("bias", "beta", "nhwc_vector")]),
    (_HF_BLOCK + "pwconv2.", BLOCK + "/pwconv2/", LINEAR),
    (_HF_BLOCK, BLOCK + "/layer_scale/", [("layer_scale_parameter", "gamma", "vector")]),
    ("{hf}.layernorm.", "head_norm/", NORM),
    ("classifier.", "predictions/", LINEAR),
)

# Official FCMAE pre-training checkpoints (convnextv2_<size>_1k_224_fcmae.pt).
# The encoder is a MinkowskiEngine sparse network: LayerNorm and Linear sit in
# wrappers (`.ln.`, `.linear.`), GRN and conv biases are (1, C), and sparse
# conv kernels list their k*k offsets column-major (see `_sparse_offsets`).
# The stem is a dense Conv2d + LayerNorm.
_FCMAE_BLOCK = "encoder.stages.{stage}.{block}."
SPARSE_CONV = [("kernel", "kernel", "sparse_conv"), ("bias", "bias", "row")]
FCMAE = table(
    ("encoder.downsample_layers.0.0.", "stem_conv/", CONV),
    ("encoder.downsample_layers.0.1.", "stem_norm/", NORM),
    ("encoder.downsample_layers.{stage}.0.ln.", "downsample{stage}_norm/", NORM),
    ("encoder.downsample_layers.{stage}.1.", "downsample{stage}_conv/", SPARSE_CONV),
    (_FCMAE_BLOCK + "dwconv.", BLOCK + "/dwconv/", [("kernel", "kernel", "sparse_depthwise"), ("bias", "bias", "row")]),
    (_FCMAE_BLOCK + "norm.ln.", BLOCK + "/norm/", NORM),
    (_FCMAE_BLOCK + "pwconv1.linear.", BLOCK + "/pwconv1/", LINEAR),
    (_FCMAE_BLOCK + "grn.", BLOCK + "/grn/", [("gamma", "gamma", "row"), ("beta", "beta", "row")]),
    (_FCMAE_BLOCK + "pwconv2.linear.", BLOCK + "/pwconv2/", LINEAR),
)

# The FCMAE decoder, dense PyTorch layers, mapped to the names of
# `keras_convnext.fcmae.FCMAEDecoder.named_weights()`.
_DECODER_BLOCK = "decoder.{block}."
FCMAE_DECODER = table(
    ("proj.", "proj/", CONV),
    ("", "", [("mask_token", "mask_token", "nchw_vector")]),
    (_DECODER_BLOCK + "dwconv.", "block{block}/dwconv/", DEPTHWISE),
    (_DECODER_BLOCK + "norm.", "block{block}/norm/", NORM),
    (_DECODER_BLOCK + "pwconv1.", "block{block}/pwconv1/", LINEAR),
    (_DECODER_BLOCK + "grn.", "block{block}/grn/", [("gamma", "gamma", "nhwc_vector"), ("beta", "beta", "nhwc_vector")]),
    (_DECODER_BLOCK + "pwconv2.", "block{block}/pwconv2/", LINEAR),
    ("pred.", "pred/", CONV),
)


def checkpoint_key(rows, weight_path, placeholders):
    """The checkpoint key that `rows` map to `weight_path`, or None.

    `placeholders` supplies values no weight path carries (HF's `{hf}`).
    """
    for _, key_template, weight_template, _ in rows:
        match = compile_template(weight_template).match(weight_path)
        if match:
            try:
                return key_template.format(**{**placeholders, **match.groupdict()})
            except KeyError:
                return None
    return None


# Each naming: (name shown to users, marker pattern found in its keys, table).
NAMINGS = {
    "official": ("official Meta ConvNeXt", re.compile(r"^downsample_layers\.0\."), OFFICIAL),
    "official_isotropic": ("official Meta isotropic ConvNeXt", re.compile(r"^stem\.weight$"), OFFICIAL_ISOTROPIC),
    "timm": ("timm", re.compile(r"^stem\.0\."), TIMM),
    "hf": ("HF transformers", re.compile(r"^convnext(v2)?\.embeddings\."), HF),
    "fcmae": ("official FCMAE pre-training", re.compile(r"^encoder\.downsample_layers\.0\."), FCMAE),
}

# Namings of pre-training checkpoints: keys of parts a ConvNeXt classifier or
# backbone does not have (the FCMAE decoder), which loading skips, and no
# classification head, so a model with include_top=True keeps its fresh one.
NON_ENCODER_KEYS = {"fcmae": re.compile(r"^(proj\.|mask_token$|decoder\.|pred\.)")}

# Converted pre-training weights name the decoder's tensors `decoder/<name>`,
# `<name>` as `FCMAEDecoder.named_weights()` gives it; no encoder weight path
# starts so.
DECODER_PREFIX = "decoder/"

# Model weights that belong to the classification head.
HEAD_PREFIXES = ("head_norm/", "predictions/")
CLASSIFIER_PREFIX = "predictions/"
