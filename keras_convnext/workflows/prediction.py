"""Classifying image files: the top classes of each, as `keras-convnext predict` prints them."""

import os

import numpy as np

from keras_convnext._deps import require


def load_image(path, image_size, crop_fraction=0.875):
    """An RGB image file as float32 `(image_size, image_size, 3)` pixels in [0, 255].

    Resizes the short side to `image_size / crop_fraction` and crops the
    centre, as the official evaluation does.
    """
    image_module = require("PIL.Image", "reading images")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist.")
    try:
        with image_module.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path!r}: {error}") from None
    scale = image_size / crop_fraction / min(image.size)
    size = (max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale)))
    resized = image.resize(size, image_module.BICUBIC)
    left = (resized.width - image_size) // 2
    top = (resized.height - image_size) // 2
    return np.asarray(resized.crop((left, top, left + image_size, top + image_size)), dtype="float32")


def predict_images(model, paths, top=5, verbose=True):
    """The `top` classes of each image file.

    Args:
        model: a classifier of `(batch, size, size, 3)` pixels in [0, 255];
            with 1000 outputs the ImageNet class names are used.
        paths: image files (anything Pillow reads).

    Returns:
        `[(path, [(class id, class name, score), ...]), ...]`, best class first.
    """
    import keras

    import keras_convnext

    size = model.input_shape[1] or 224
    images = [load_image(path, size) for path in paths]  # every file is checked before the model runs
    progress = keras.utils.Progbar(len(paths), unit_name="image", verbose=1 if verbose and len(paths) > 1 else 0)
    results = []
    for index, (path, image) in enumerate(zip(paths, images)):
        scores = np.asarray(model.predict(image[None], verbose=0))
        if scores.shape[-1] == 1000:
            best = keras_convnext.decode_predictions(scores, top=top)[0]
        else:
            order = np.argsort(scores[0])[::-1][:top]
            best = [(str(i), f"class {i}", float(scores[0, i])) for i in order]
        results.append((path, best))
        progress.update(index + 1)
    return results
