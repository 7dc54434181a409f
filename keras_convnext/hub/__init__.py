"""ConvNeXt in keras-hub: a `Backbone`, an `ImageClassifier`, and RetinaNet/DeepLabV3 on our encoder.

    from keras_convnext import hub
    classifier = hub.ConvNeXtImageClassifier.from_preset("convnext_v2_atto_imagenet")
    detector = hub.retinanet_detector(keras_convnext.ConvNeXtV2Tiny(include_top=False), num_classes=20)

keras-hub is optional (`pip install "keras-convnext[hub]"`): this package
imports it only when one of its models is asked for, and
`import keras_convnext` never does. A `.keras` file of
`ConvNeXtBackbone`/`ConvNeXtImageClassifier` loads once
`keras_convnext.hub.models` is imported (it registers the classes).
"""

from keras_convnext.hub.dependency import import_keras_hub
from keras_convnext.hub.registry_presets import preset_name, presets
from keras_convnext.hub.tasks import deeplabv3_segmenter, retinanet_detector

_MODELS = ("ConvNeXtBackbone", "ConvNeXtImageClassifier")


def __getattr__(name):
    # The keras-hub classes are defined on first use, so that this package
    # imports without keras-hub and names it only when it is needed.
    if name in _MODELS:
        from keras_convnext.hub import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConvNeXtBackbone",
    "ConvNeXtImageClassifier",
    "deeplabv3_segmenter",
    "import_keras_hub",
    "preset_name",
    "presets",
    "retinanet_detector",
]
