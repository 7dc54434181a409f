"""ImageNet-1k input helpers and class names, as keras.applications' ConvNeXt has them.

The models normalize their inputs themselves (`include_preprocessing=True`,
the default), so `preprocess_input` returns the images unchanged, exactly as
`keras.applications.convnext.preprocess_input` does: code written for either
package gives the same predictions with the other. The normalization itself
is `normalize_imagenet`, for models built with `include_preprocessing=False`
and for PyTorch reference models.
"""

import functools
import importlib.resources
import numbers

import numpy as np
import keras

from keras_convnext.layers.data_format import standardize_data_format
from keras_convnext.layers.preprocessing import IMAGENET_MEAN, IMAGENET_STD


def preprocess_input(x, data_format=None):
    """Returns `x` unchanged: the models normalize their inputs themselves.

    The same no-op as `keras.applications.convnext.preprocess_input`, kept so
    that code written for keras.applications runs unchanged. Give the models
    RGB pixels in [0, 255]. For a model built with
    `include_preprocessing=False`, call `normalize_imagenet` instead.

    Args:
        x: images, an array or tensor of any shape.
        data_format: accepted for compatibility; not used.

    Returns:
        `x` itself.
    """
    del data_format  # Nothing to do in either layout.
    return x


def normalize_imagenet(images, data_format=None):
    """`(pixels - mean) / std` per RGB channel, with ImageNet's statistics.

    What a model built with `include_preprocessing=True` (the default) does
    to its inputs, for models built with `include_preprocessing=False` and
    for reference models that expect normalized inputs. Mean
    `(0.485, 0.456, 0.406) * 255`, std `(0.229, 0.224, 0.225) * 255`.

    Args:
        images: RGB pixels in [0, 255], an array or tensor
            `(..., height, width, 3)` (channels_last) or
            `(..., 3, height, width)` (channels_first).
        data_format: `"channels_last"` or `"channels_first"`; defaults to
            `keras.config.image_data_format()`.

    Returns:
        A float32 numpy array of the same shape.
    """
    data_format = standardize_data_format(data_format)
    images = np.asarray(keras.ops.convert_to_numpy(images), dtype="float32")
    axis = -1 if data_format == "channels_last" else -3
    if images.ndim < 3 or images.shape[axis] != 3:
        raise ValueError(
            f"normalize_imagenet expects RGB images with 3 channels on axis {axis} "
            f"({data_format}); got shape {images.shape}."
        )
    shape = [1] * images.ndim
    shape[axis] = 3
    mean = np.reshape(np.asarray(IMAGENET_MEAN, "float32"), shape)
    std = np.reshape(np.asarray(IMAGENET_STD, "float32"), shape)
    return (images - mean) / std


@functools.lru_cache(maxsize=1)
def imagenet_classes():
    """The 1000 ImageNet-1k classes in model output order: `[(wordnet_id, synonyms), ...]`.

    `synonyms` is WordNet's full list, for example `"tabby, tabby cat"`;
    `decode_predictions` names each class by its first synonym instead.
    """
    text = importlib.resources.files("keras_convnext").joinpath("data/imagenet1k_classes.tsv").read_text()
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if line]


@functools.lru_cache(maxsize=1)
def _short_class_names():
    # keras.applications names a class by its first WordNet synonym, spaces
    # written as underscores ("tabby", "African_elephant"); the same for all
    # 1000 classes of its imagenet_class_index.json.
    return [(wordnet_id, synonyms.split(", ")[0].replace(" ", "_")) for wordnet_id, synonyms in imagenet_classes()]


def decode_predictions(preds, top=5):
    """The top classes of ImageNet-1k predictions, as keras.applications returns them.

    Args:
        preds: array or tensor `(batch, 1000)` of probabilities or logits.
        top: how many classes to return per image, a positive integer.

    Returns:
        One list per image of `(wordnet_id, class_name, score)` tuples, best
        first, for example `("n02504458", "African_elephant", 0.93)`: the
        names and the format of `keras.applications.convnext.decode_predictions`
        (`imagenet_classes()` has the full WordNet synonyms). No file is
        downloaded; the class list ships with the package.
    """
    if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1:
        raise ValueError(f"top must be a positive integer; got {top!r}.")
    preds = np.asarray(keras.ops.convert_to_numpy(preds))
    if preds.ndim != 2 or preds.shape[1] != 1000:
        raise ValueError(
            "decode_predictions expects ImageNet-1k predictions of shape (batch, 1000); "
            f"got {preds.shape}."
        )
    classes = _short_class_names()
    results = []
    for row in preds:
        # A stable sort: among equal scores, the lower class index comes first.
        best = np.argsort(-row, kind="stable")[:top]
        results.append([(*classes[i], row[i]) for i in best])
    return results
