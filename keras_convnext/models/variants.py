"""The ConvNeXt sizes as data: one row per named constructor."""

from typing import NamedTuple


class Variant(NamedTuple):
    version: str  # "v1" (layer scale) or "v2" (GRN)
    stage_depths: tuple
    stage_dims: tuple


_SMALL = {  # the small sizes share their shapes between V1 (timm) and V2
    "Atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "Femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "Pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "Nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
}

VARIANTS = {
    **{f"ConvNeXtV2{size}": Variant("v2", *shape) for size, shape in _SMALL.items()},
    "ConvNeXtV2Tiny": Variant("v2", (3, 3, 9, 3), (96, 192, 384, 768)),
    "ConvNeXtV2Base": Variant("v2", (3, 3, 27, 3), (128, 256, 512, 1024)),
    "ConvNeXtV2Large": Variant("v2", (3, 3, 27, 3), (192, 384, 768, 1536)),
    "ConvNeXtV2Huge": Variant("v2", (3, 3, 27, 3), (352, 704, 1408, 2816)),
    **{f"ConvNeXt{size}": Variant("v1", *shape) for size, shape in _SMALL.items()},
    "ConvNeXtTiny": Variant("v1", (3, 3, 9, 3), (96, 192, 384, 768)),
    "ConvNeXtSmall": Variant("v1", (3, 3, 27, 3), (96, 192, 384, 768)),
    "ConvNeXtBase": Variant("v1", (3, 3, 27, 3), (128, 256, 512, 1024)),
    "ConvNeXtLarge": Variant("v1", (3, 3, 27, 3), (192, 384, 768, 1536)),
    "ConvNeXtXLarge": Variant("v1", (3, 3, 27, 3), (256, 512, 1024, 2048)),
}


def find_variant(version, stage_depths, stage_dims):
    """Name of the constructor with these shapes, or None for a custom size."""
    key = Variant(version, tuple(stage_depths), tuple(stage_dims))
    for name, variant in VARIANTS.items():
        if variant == key:
            return name
    return None


def multiply_adds(stage_depths, stage_dims, image_size=(224, 224), classes=1000, kernel_size=7):
    """Multiply-accumulate count of one forward pass (the "FLOPs" of the papers).

    Counts convolutions and Linear layers; norms, GELU and GRN are negligible
    and left out, as in the papers' tables.
    """
    height, width = image_size[0] // 4, image_size[1] // 4
    total = height * width * 4 * 4 * 3 * stage_dims[0]
    for stage, (depth, dim) in enumerate(zip(stage_depths, stage_dims)):
        if stage > 0:
            height, width = height // 2, width // 2
            total += height * width * 2 * 2 * stage_dims[stage - 1] * dim
        per_block = height * width * dim * (kernel_size * kernel_size + 8 * dim)
        total += depth * per_block
    return total + stage_dims[-1] * classes
