"""The roadmap's networks by step name, and their sizes."""

import collections

import keras

from keras_convnext.roadmap.builder import build_network
from keras_convnext.roadmap.flops import count_flops, count_parameters
from keras_convnext.roadmap.steps import step_config

Counts = collections.namedtuple("Counts", ["parameters", "flops", "convolution_flops"])


def build(step, classes=1000, input_shape=(224, 224, 3), classifier_activation=None, **changes):
    """The network of roadmap step `step` (a name from `STEP_NAMES`).

    Args:
        step: the step's name, `"resnet50"` ... `"separate_downsampling"`
            (ConvNeXt-T).
        classes: outputs of the classifier.
        input_shape: `(height, width, channels)`, height and width >= 32.
        classifier_activation: None for logits, or a Keras activation name.
        **changes: further `RoadmapConfig` changes on top of the step, for
            example `spatial_kernel_size=5`.

    Returns:
        A functional `keras.Model` named after the step, from normalized
        images `(batch, height, width, channels)` to `(batch, classes)`.
    """
    config = step_config(step, **changes)
    return build_network(config, classes, input_shape, classifier_activation, name=f"roadmap_{step}")


def kernel_size_sweep(kernel_sizes=(3, 5, 7, 9, 11), classes=1000, input_shape=(224, 224, 3)):
    """The paper's kernel-size study: `{kernel size: model}`.

    Each model is the "move up depthwise conv" step with its depthwise
    kernel set to that size (3 is that step itself; 7 is the next step).
    """
    return {
        size: build("move_up_depthwise", classes, input_shape, spatial_kernel_size=size)
        for size in kernel_sizes
    }


def count(step, classes=1000, input_shape=(224, 224, 3), **changes):
    """Parameters and FLOPs of a step's network, without initializing it.

    The network is built in a `keras.StatelessScope`, where Keras only
    records each weight's shape, so counting ResNet-50 takes seconds.

    Returns:
        `Counts(parameters, flops, convolution_flops)`: learned parameters
        (`count_parameters`), FLOPs per image as the paper counts them
        (`count_flops`) and those of the convolutions and dense layers alone
        (`count_flops(model, elementwise=False)`).
    """
    with keras.StatelessScope():
        model = build(step, classes, input_shape, **changes)
        return Counts(count_parameters(model), count_flops(model), count_flops(model, elementwise=False))
