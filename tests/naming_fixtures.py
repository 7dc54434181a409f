"""Test-side renamings of HF transformers keys to the official and timm namings.

Written independently of keras_convnext.weights.naming, so a wrong row in
the package's tables shows up as a parity failure.
"""

import re

_HF_TO_OFFICIAL = [
    (r"convnext(v2)?\.embeddings\.patch_embeddings\.", "downsample_layers.0.0."),
    (r"convnext(v2)?\.embeddings\.layernorm\.", "downsample_layers.0.1."),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.downsampling_layer\.(\d)\.", r"downsample_layers.\2.\3."),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer_scale_parameter", r"stages.\2.\3.gamma"),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.layernorm\.", r"stages.\2.\3.norm."),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.grn\.weight", r"stages.\2.\3.grn.gamma"),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.grn\.bias", r"stages.\2.\3.grn.beta"),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.", r"stages.\2.\3."),
    (r"convnext(v2)?\.layernorm\.", "norm."),
    (r"classifier\.", "head."),
]

_HF_TO_TIMM = [
    (r"convnext(v2)?\.embeddings\.patch_embeddings\.", "stem.0."),
    (r"convnext(v2)?\.embeddings\.layernorm\.", "stem.1."),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.downsampling_layer\.(\d)\.", r"stages.\2.downsample.\3."),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer_scale_parameter", r"stages.\2.blocks.\3.gamma"),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.dwconv\.", r"stages.\2.blocks.\3.conv_dw."),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.layernorm\.", r"stages.\2.blocks.\3.norm."),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.pwconv1\.", r"stages.\2.blocks.\3.mlp.fc1."),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.grn\.", r"stages.\2.blocks.\3.mlp.grn."),
    (r"convnext(v2)?\.encoder\.stages\.(\d)\.layers\.(\d+)\.pwconv2\.", r"stages.\2.blocks.\3.mlp.fc2."),
    (r"convnext(v2)?\.layernorm\.", "head.norm."),
    (r"classifier\.", "head.fc."),
]


def _rename(state_dict, rules):
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            new_key, count = re.subn("^" + pattern, replacement, key)
            if count:
                renamed[new_key] = value
                break
        else:
            raise KeyError(f"no renaming rule for {key}")
    return renamed


def hf_to_official(state_dict):
    """Official Meta naming; GRN tensors keep HF's (1, 1, 1, C) shape, as in the official files."""
    return _rename(state_dict, _HF_TO_OFFICIAL)


def hf_to_timm(state_dict):
    """timm naming; timm stores GRN weight/bias as (C,)."""
    renamed = _rename(state_dict, _HF_TO_TIMM)
    return {k: (v.reshape(-1) if ".mlp.grn." in k else v) for k, v in renamed.items()}


# The official FCMAE encoder is a MinkowskiEngine network. The conversion below is
# written from the layout's description, independently of the package's
# naming table: sparse kernels list the k*k offsets with the column varying
# slowest, so offset `col * k + row` holds the dense weight at (row, col).


def _dense_to_sparse_kernel(weight):
    """torch (out, in_or_1, k, k) -> Minkowski (k*k, in, out), or (k*k, C) for depthwise."""
    out_channels, in_channels, k, _ = weight.shape
    if in_channels == 1:  # depthwise: (C, 1, k, k)
        return weight[:, 0].permute(2, 1, 0).reshape(k * k, out_channels).contiguous()
    return weight.permute(3, 2, 1, 0).reshape(k * k, in_channels, out_channels).contiguous()


def hf_to_fcmae(state_dict):
    """The encoder of an HF ConvNeXt V2 state dict in the official FCMAE checkpoint's naming."""
    converted = {}
    for key, value in state_dict.items():
        if not key.startswith("convnextv2.") or key.startswith("convnextv2.layernorm"):
            continue  # the classifier head is not part of the FCMAE encoder
        match = re.match(r"convnextv2\.encoder\.stages\.(\d)\.layers\.(\d+)\.(\w+)\.(\w+)$", key)
        if key.startswith("convnextv2.embeddings.patch_embeddings."):
            converted["encoder.downsample_layers.0.0." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("convnextv2.embeddings.layernorm."):
            converted["encoder.downsample_layers.0.1." + key.rsplit(".", 1)[1]] = value
        elif "downsampling_layer" in key:
            stage, index, leaf = re.match(r".*stages\.(\d)\.downsampling_layer\.(\d)\.(\w+)$", key).groups()
            prefix = f"encoder.downsample_layers.{stage}.{index}."
            if index == "0":
                converted[prefix + "ln." + leaf] = value
            elif leaf == "weight":
                converted[prefix + "kernel"] = _dense_to_sparse_kernel(value)
            else:
                converted[prefix + "bias"] = value.reshape(1, -1)
        else:
            stage, block, layer, leaf = match.groups()
            prefix = f"encoder.stages.{stage}.{block}."
            if layer == "dwconv":
                converted[prefix + ("dwconv.kernel" if leaf == "weight" else "dwconv.bias")] = (
                    _dense_to_sparse_kernel(value) if leaf == "weight" else value.reshape(1, -1)
                )
            elif layer == "layernorm":
                converted[prefix + "norm.ln." + leaf] = value
            elif layer in ("pwconv1", "pwconv2"):
                converted[prefix + layer + ".linear." + leaf] = value
            elif layer == "grn":
                converted[prefix + ("grn.gamma" if leaf == "weight" else "grn.beta")] = value.reshape(1, -1)
    return converted


def official_fcmae_decoder(encoder_dim, seed=0):
    """Random tensors of the official FCMAE decoder, in its naming and layouts.

    The official pre-training configuration: decoder width 512, one ConvNeXt V2
    block, 32-pixel patches of 3 channels; a (1, C, 1, 1) mask token, 1x1
    Conv2d projection and prediction, GRN parameters (1, 1, 1, C).
    """
    import torch

    dim, hidden, pixels = 512, 4 * 512, 32 * 32 * 3
    shapes = {
        "proj.weight": (dim, encoder_dim, 1, 1), "proj.bias": (dim,), "mask_token": (1, dim, 1, 1),
        "decoder.0.dwconv.weight": (dim, 1, 7, 7), "decoder.0.dwconv.bias": (dim,),
        "decoder.0.norm.weight": (dim,), "decoder.0.norm.bias": (dim,),
        "decoder.0.pwconv1.weight": (hidden, dim), "decoder.0.pwconv1.bias": (hidden,),
        "decoder.0.grn.gamma": (1, 1, 1, hidden), "decoder.0.grn.beta": (1, 1, 1, hidden),
        "decoder.0.pwconv2.weight": (dim, hidden), "decoder.0.pwconv2.bias": (dim,),
        "pred.weight": (pixels, dim, 1, 1), "pred.bias": (pixels,),
    }
    generator = torch.Generator().manual_seed(seed)
    return {key: 0.1 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}
