"""ConvNeXt as the image encoder of keras-hub's detection and segmentation tasks.

Every ConvNeXt model has `pyramid_outputs` (keras-hub's feature pyramid
contract), so it can be passed to `keras_hub.models.RetinaNetBackbone` and
`DeepLabV3Backbone` directly; the two functions here build the whole task
with settings that suit ConvNeXt's four stages. keras-hub is optional:
`pip install "keras-convnext[hub]"`.
"""

import math

import numpy as np

from keras_convnext.hub.dependency import import_keras_hub
from keras_convnext.models.pyramid import model_data_format

CLASS_PRIOR = 0.01
"""Every anchor's initial probability of each class, RetinaNet's prior (Lin et al. 2017, section 4.1)."""


def _image_shape(image_encoder):
    """The encoder's input shape without the batch axis, e.g. `(height, width, 3)`."""
    return tuple(image_encoder.inputs[0].shape[1:])


def retinanet_detector(
    image_encoder,
    num_classes,
    bounding_box_format="yxyx",
    min_level=3,
    max_level=7,
    use_p5=False,
    **detector_kwargs,
):
    """A `keras_hub.models.RetinaNetObjectDetector` on a ConvNeXt image encoder.

    Args:
        image_encoder: a keras_convnext model, usually built with
            `include_top=False`; its weights are shared, not copied.
        num_classes: number of object classes.
        bounding_box_format: format of the boxes the detector takes and
            returns (`"yxyx"`, `"xyxy"`, ... in pixels).
        min_level, max_level: the feature pyramid levels: 3 to 7 are strides
            8 to 128 pixels; levels above 5 are made by the pyramid network
            from the stride-32 map.
        use_p5: build levels 6 and 7 from the FPN's P5 rather than from
            the encoder's stride-32 map.
        **detector_kwargs: passed to `RetinaNetObjectDetector`
            (`anchor_generator`, `preprocessor`, ...).

    Returns:
        The detector: images of the encoder's input shape (pixels as the
        encoder takes them) to box regressions and class logits per anchor.
    """
    keras_hub = import_keras_hub()
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=image_encoder,
        min_level=min_level,
        max_level=max_level,
        use_p5=use_p5,
        image_shape=_image_shape(image_encoder),
        data_format=model_data_format(image_encoder),
    )
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone,
        num_classes=num_classes,
        bounding_box_format=bounding_box_format,
        **detector_kwargs,
    )
    _initialize_head_biases(detector)
    return detector


def _initialize_head_biases(detector):
    """Starts the class logits at the prior and the box offsets at zero, as RetinaNet's paper does.

    keras-hub (0.32) gives the prior's bias, -log(99), to the box head's
    output instead of the classification head's: every anchor then starts at
    a class probability of 0.5, the background's focal loss swamps the few
    positive anchors, and the boxes start e**-4.6 times their anchors' size.
    """
    prior_logit = -math.log((1.0 - CLASS_PRIOR) / CLASS_PRIOR)
    for head, value in ((detector.classification_head, prior_logit), (detector.box_head, 0.0)):
        bias = head.prediction_layer.bias
        bias.assign(np.full(tuple(bias.shape), value, "float32"))


def deeplabv3_segmenter(
    image_encoder,
    num_classes,
    spatial_pyramid_pooling_key="P5",
    low_level_feature_key="P2",
    dilation_rates=(6, 12, 18),
    **segmenter_kwargs,
):
    """A `keras_hub.models.DeepLabV3ImageSegmenter` on a ConvNeXt image encoder.

    Args:
        image_encoder: a keras_convnext model, usually built with
            `include_top=False`; its weights are shared, not copied.
        num_classes: number of segmentation classes.
        spatial_pyramid_pooling_key: the pyramid level (`"P4"` or `"P5"`)
            that the atrous spatial pyramid pooling reads.
        low_level_feature_key: the finer level (`"P2"` or `"P3"`) that the
            decoder joins, or None for no decoder.
        dilation_rates: dilation rates of the pooling's atrous convolutions.
        **segmenter_kwargs: passed to `DeepLabV3ImageSegmenter`.

    Returns:
        The segmenter: images to per-pixel class logits,
        `(batch, height, width, num_classes)` (channels_first:
        `(batch, num_classes, height, width)`).
    """
    keras_hub = import_keras_hub()
    pooled_stride = 2 ** int(spatial_pyramid_pooling_key[1:])
    low_level_stride = 2 ** int(low_level_feature_key[1:]) if low_level_feature_key else pooled_stride
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=image_encoder,
        spatial_pyramid_pooling_key=spatial_pyramid_pooling_key,
        upsampling_size=pooled_stride // low_level_stride,
        dilation_rates=list(dilation_rates),
        low_level_feature_key=low_level_feature_key,
        image_shape=_image_shape(image_encoder),
    )
    return keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=backbone, num_classes=num_classes, **segmenter_kwargs
    )
