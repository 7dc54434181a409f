"""Figure 2 of "A ConvNet for the 2020s" (Liu et al., 2022) as data.

Each step is one change over the step before it; `RESNET50` is the start.
`paper_gflops` and `paper_top1` are the figure's numbers (ImageNet-1K,
224x224, the paper's training recipe); the paper's GFLOPs count
multiply-accumulates, as `keras_convnext.roadmap.count_flops` does.
"""

import collections
import dataclasses

from keras_convnext.roadmap.config import RoadmapConfig

Step = collections.namedtuple("Step", ["name", "label", "change", "paper_gflops", "paper_top1"])

RESNET50 = RoadmapConfig()

STEPS = (
    Step("resnet50", "ResNet-50", {}, 4.1, 78.8),
    Step("stage_ratio", "stage ratio", {"stage_depths": (3, 3, 9, 3)}, 4.5, 79.4),
    Step("patchify_stem", '"patchify" stem', {"stem": "patchify"}, 4.4, 79.5),
    Step("depthwise_conv", "depthwise conv", {"depthwise": True}, 2.4, 78.3),
    Step("width_96", "width 64 -> 96", {"width": 96}, 5.3, 80.5),
    Step("inverted_bottleneck", "inverting dims", {"bottleneck": "inverted"}, 4.6, 80.6),
    Step(
        "move_up_depthwise",
        "move up depthwise conv",
        {"block_layout": ("spatial", "norm", "act", "pointwise_in", "norm", "act", "pointwise_out", "norm")},
        4.1,
        79.9,
    ),
    Step("kernel_7", "kernel size 7", {"spatial_kernel_size": 7}, 4.2, 80.6),
    Step("gelu", "ReLU -> GELU", {"activation": "gelu"}, 4.2, 80.6),
    Step(
        "fewer_activations",
        "fewer activations",
        {
            "block_layout": ("spatial", "norm", "pointwise_in", "norm", "act", "pointwise_out", "norm"),
            "activation_after_add": False,
        },
        4.2,
        81.3,
    ),
    Step(
        "fewer_norms",
        "fewer norms",
        {"block_layout": ("spatial", "norm", "pointwise_in", "act", "pointwise_out")},
        4.2,
        81.4,
    ),
    Step("layer_norm", "BN -> LN", {"norm": "layer"}, 4.2, 81.5),
    Step(
        "separate_downsampling",
        "separate downsampling (ConvNeXt-T)",
        {"downsampling": "separate", "head_norm": True, "layer_scale_init_value": 1e-6},
        4.5,
        82.0,
    ),
)

# The kernel sizes the paper tried on the "move up depthwise conv" network
# (Section 2.5): kernel size -> (GFLOPs, ImageNet-1K top-1 %).
KERNEL_SIZE_SWEEP = {3: (4.1, 79.9), 5: (4.1, 80.4), 7: (4.2, 80.6), 9: (4.2, 80.6), 11: (4.3, 80.6)}

STEP_NAMES = tuple(step.name for step in STEPS)


def step_index(name):
    """Position of step `name` in `STEPS`; a ValueError names the valid steps."""
    if name not in STEP_NAMES:
        raise ValueError(f"Unknown roadmap step {name!r}; the steps are {', '.join(STEP_NAMES)}.")
    return STEP_NAMES.index(name)


def step_config(name, **changes):
    """The `RoadmapConfig` of step `name`: ResNet-50 with every change up to it.

    Extra keyword arguments are further changes (for example
    `spatial_kernel_size=5`), applied last.
    """
    config = RESNET50
    for step in STEPS[: step_index(name) + 1]:
        config = dataclasses.replace(config, **step.change)
    try:
        return dataclasses.replace(config, **changes)
    except TypeError as error:
        fields = ", ".join(field.name for field in dataclasses.fields(RoadmapConfig))
        raise ValueError(f"Unknown roadmap setting in {sorted(changes)}; the settings are {fields}.") from error
