"""The architecture knobs the roadmap turns, as one frozen record."""

import dataclasses

BLOCK_OPERATIONS = ("pointwise_in", "spatial", "pointwise_out", "norm", "act")
NORMS = ("batch", "layer")
STEMS = ("resnet", "patchify")
BOTTLENECKS = ("resnet", "inverted")
DOWNSAMPLINGS = ("in_block", "separate")


@dataclasses.dataclass(frozen=True)
class RoadmapConfig:
    """One network of the roadmap, from ResNet-50 to ConvNeXt-T.

    Attributes:
        stage_depths: residual blocks per stage, four integers.
        width: the base width, in channels: the stem's output and, per stage
            `i`, the `width * 2**i` channels of a ResNet bottleneck's middle.
        bottleneck: `"resnet"` (wide -> narrow -> wide: a block outputs
            `expansion * width * 2**i` channels and works inside on
            `width * 2**i`) or `"inverted"` (narrow -> wide -> narrow: it
            outputs `width * 2**i` channels and widens them `expansion` times).
        expansion: the ratio of wide to narrow channels in a block (4).
        block_layout: the block's residual branch, in order, as names from
            `pointwise_in` (1x1 conv to the block's inner channels), `spatial`
            (the k x k conv, on the channels it meets), `pointwise_out` (1x1
            conv to the block's output channels), `norm` and `act`.
        activation_after_add: apply the activation after the residual sum,
            as ResNet does.
        spatial_kernel_size: k of the k x k spatial conv.
        depthwise: the spatial conv has one group per channel (otherwise one
            group, a full convolution).
        stem: `"resnet"` (7x7 stride-2 conv, norm, activation, 3x3 stride-2
            max pool) or `"patchify"` (4x4 stride-4 conv, norm).
        activation: a Keras activation name for every `act` (`"relu"`, `"gelu"`).
        norm: `"batch"` (BatchNorm, epsilon 1e-5) or `"layer"` (LayerNorm over
            channels, epsilon 1e-6) for every norm of the network.
        downsampling: `"in_block"` (the first block of stages 2-4 strides its
            spatial conv by 2 and its shortcut is a strided 1x1 conv plus norm)
            or `"separate"` (a norm and a 2x2 stride-2 conv between stages).
        head_norm: normalize the pooled features before the classifier.
        layer_scale_init_value: a learned per-channel scale at the end of each
            residual branch, starting at this value; None for none.
    """

    stage_depths: tuple = (3, 4, 6, 3)
    width: int = 64
    bottleneck: str = "resnet"
    expansion: int = 4
    block_layout: tuple = ("pointwise_in", "norm", "act", "spatial", "norm", "act", "pointwise_out", "norm")
    activation_after_add: bool = True
    spatial_kernel_size: int = 3
    depthwise: bool = False
    stem: str = "resnet"
    activation: str = "relu"
    norm: str = "batch"
    downsampling: str = "in_block"
    head_norm: bool = False
    layer_scale_init_value: float = None

    def __post_init__(self):
        if len(self.stage_depths) != 4 or min(self.stage_depths) < 1:
            raise ValueError(f"stage_depths needs four positive integers; got {self.stage_depths}.")
        for field, allowed in (
            ("bottleneck", BOTTLENECKS),
            ("stem", STEMS),
            ("norm", NORMS),
            ("downsampling", DOWNSAMPLINGS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}; got {getattr(self, field)!r}.")
        unknown = [operation for operation in self.block_layout if operation not in BLOCK_OPERATIONS]
        if unknown:
            raise ValueError(f"block_layout may only name {BLOCK_OPERATIONS}; got {unknown}.")
        for operation in ("pointwise_in", "spatial", "pointwise_out"):
            if self.block_layout.count(operation) != 1:
                raise ValueError(f"block_layout needs {operation!r} exactly once; got {self.block_layout}.")
        if self.spatial_kernel_size < 1 or self.spatial_kernel_size % 2 == 0:
            raise ValueError(
                f"spatial_kernel_size must be an odd positive integer; got {self.spatial_kernel_size}."
            )

    def stage_channels(self, stage):
        """`(output, inner)` channels of the blocks of stage `stage` (0-3)."""
        narrow = self.width * 2**stage
        wide = self.expansion * narrow
        if self.bottleneck == "resnet":
            return wide, narrow
        return narrow, wide
