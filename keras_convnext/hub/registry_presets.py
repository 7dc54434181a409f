"""keras-hub style preset names for the pretrained registry's ConvNeXt releases.

A preset names one release: the constructor in snake case, then the
registry tag with `_` for `-`. `ConvNeXtV2Tiny(weights="imagenet22k-ft-1k-384")`
is the preset `"convnext_v2_tiny_imagenet22k_ft_1k_384"`; `ConvNeXtAtto` with
`"imagenet"` is `"convnext_atto_imagenet"`. The names are read from the
registry when asked for, so they always list what `weights=` accepts. Only the
hierarchical models (four stages, a feature pyramid) have presets.
"""

from keras_convnext.models.variants import VARIANTS
from keras_convnext.weights import registry

_PREFIX = "ConvNeXt"


def preset_name(variant_name, tag):
    """`("ConvNeXtV2Tiny", "imagenet22k-ft-1k")` -> `"convnext_v2_tiny_imagenet22k_ft_1k"`."""
    size = variant_name[len(_PREFIX):]
    parts = ["convnext", "v2", size[2:]] if size.startswith("V2") else ["convnext", size]
    return "_".join(parts + [tag]).replace("-", "_").lower()


def presets():
    """`{preset name: registry entry}` for every hierarchical ConvNeXt release."""
    return {
        preset_name(variant, tag): entry
        for (variant, tag), entry in registry.REGISTRY.items()
        if variant in VARIANTS
    }


def describe(entry):
    """keras-hub's preset metadata (`Backbone.presets[name]["metadata"]`) for a registry entry."""
    return {
        "metadata": {
            "description": f"{entry.variant}, {entry.training_data}, {entry.resolution}x{entry.resolution} pixels",
            "variant": entry.variant,
            "tag": entry.tag,
            "classes": entry.classes,
            "imagenet_top1": entry.top1,
            "license": entry.license,
            "url": entry.url,
        }
    }


def lookup(name):
    """The registry entry of preset `name`, or None if `name` is not a ConvNeXt preset."""
    if not isinstance(name, str):
        return None
    return presets().get(name)
