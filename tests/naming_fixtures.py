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
