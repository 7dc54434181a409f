"""ImageNet-1k input normalization and class names (shipped, nothing downloaded)."""

import functools
import importlib.resources

import numpy as np
import keras

from keras_convnext.layers.data_format import standardize_data_format

from keras_convnext.layers.preprocessing import IMAGENET_MEAN, IMAGENET_STD


def preprocess_input(images, data_format=None):
    """Normalizes RGB pixels in [0, 255] with the ImageNet mean and std.

    For models built with `include_preprocessing=False`. Models built with
    the default `include_preprocessing=True` normalize by themselves and take
    the pixels as they are: do not call this for them.

    Args:
        images: array `(..., height, width, 3)` (channels_last) or
            `(..., 3, height, width)` (channels_first).
        data_format: defaults to `keras.config.image_data_format()`.

    Returns:
        A float32 numpy array of the same shape.
    """
    data_format = standardize_data_format(data_format)
    images = np.asarray(images, dtype="float32")
    axis = -1 if data_format == "channels_last" else -3
    if images.ndim < 3 or images.shape[axis] != 3:
        raise ValueError(
            f"preprocess_input expects RGB images with 3 channels on axis {axis} "
            f"({data_format}); got shape {images.shape}."
        )
    shape = [1] * images.ndim
    shape[axis] = 3
    mean = np.reshape(np.asarray(IMAGENET_MEAN, "float32"), shape)
    std = np.reshape(np.asarray(IMAGENET_STD, "float32"), shape)
    return (images - mean) / std


@functools.lru_cache(maxsize=1)
def imagenet_classes():
    """The 1000 ImageNet-1k classes in model output order: `[(wordnet_id, name), ...]`."""
    text = importlib.resources.files("keras_convnext").joinpath("data/imagenet1k_classes.tsv").read_text()
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if line]


def decode_predictions(predictions, top=5):
    """Top classes of ImageNet-1k predictions.

    Args:
        predictions: array `(batch, 1000)` of probabilities or logits.
        top: how many classes to return per image.

    Returns:
        One list per image of `(wordnet_id, class_name, score)` tuples, best first.
    """
    predictions = np.asarray(keras.ops.convert_to_numpy(predictions))
    if predictions.ndim != 2 or predictions.shape[1] != 1000:
        raise ValueError(
            "decode_predictions expects ImageNet-1k predictions of shape (batch, 1000); "
            f"got {predictions.shape}."
        )
    classes = imagenet_classes()
    results = []
    for row in predictions:
        best = np.argsort(row)[::-1][:top]
        results.append([(classes[i][0], classes[i][1], float(row[i])) for i in best])
    return results
