"""Serializable Keras layers of the ConvNeXt family."""

from keras_convnext.layers.block import ConvNeXtBlock
from keras_convnext.layers.depthwise import DepthwiseConv
from keras_convnext.layers.drop_path import StochasticDepth
from keras_convnext.layers.grn import GRN
from keras_convnext.layers.initializers import HostTruncatedNormal
from keras_convnext.layers.layer_norm import LayerNorm
from keras_convnext.layers.layer_scale import LayerScale
from keras_convnext.layers.pointwise import PatchConv2D, PointwiseDense
from keras_convnext.layers.preprocessing import ImageNormalization

__all__ = [
    "ConvNeXtBlock",
    "DepthwiseConv",
    "GRN",
    "HostTruncatedNormal",
    "ImageNormalization",
    "LayerNorm",
    "LayerScale",
    "PatchConv2D",
    "PointwiseDense",
    "StochasticDepth",
]
