"""The ResNet-50 to ConvNeXt-T roadmap of "A ConvNet for the 2020s" (Figure 2).

```python
from keras_convnext import roadmap

for step in roadmap.STEPS:
    model = roadmap.build(step.name, classes=10, input_shape=(64, 64, 3))
    print(step.label, roadmap.count_parameters(model), roadmap.count_flops(model) / 1e9)
```
"""

from keras_convnext.roadmap.builder import build_network
from keras_convnext.roadmap.config import RoadmapConfig
from keras_convnext.roadmap.flops import count_flops, count_parameters, layer_flops
from keras_convnext.roadmap.steps import KERNEL_SIZE_SWEEP, RESNET50, STEP_NAMES, STEPS, Step, step_config


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
    kernel set to that size (3 is the step itself; 7 is the next step).
    """
    return {
        size: build(
            "move_up_depthwise", classes, input_shape, spatial_kernel_size=size
        )
        for size in kernel_sizes
    }


__all__ = [
    "KERNEL_SIZE_SWEEP",
    "RESNET50",
    "STEPS",
    "STEP_NAMES",
    "RoadmapConfig",
    "Step",
    "build",
    "build_network",
    "count_flops",
    "count_parameters",
    "kernel_size_sweep",
    "layer_flops",
    "step_config",
]
