"""Semantic segmentation: DeepLabV3 (keras-hub) on a ConvNeXt encoder, fine-tuned and scored by mIoU.

    from keras_convnext import workflows

    result = workflows.finetune_segmenter(data="digit_canvases", epochs=5, output_dir="segmentation")
    result["evaluation"]["miou"], result["evaluation"]["chance_miou"]

Data is `"digit_canvases"` (offline: scanned digits on canvases, 11
classes: background and the ten digits) or `"oxford_iiit_pet"`
(tensorflow-datasets' pets, 3 classes: pet, background, border). mIoU is
`keras.metrics.MeanIoU`.
"""

import os
from typing import NamedTuple

import numpy as np

from keras_convnext.workflows import canvases, task_plots, tasks

DATA_CHOICES = ("digit_canvases", "oxford_iiit_pet")
PET_SPLITS = ("oxford_iiit_pet", "train", "test")
PET_CLASS_NAMES = ("pet", "background", "border")
"""The pets' trimap values 1, 2, 3 as classes 0, 1, 2."""


class MaskSet(NamedTuple):
    """Images with a class per pixel, as numpy arrays.

    images: uint8 `(n, size, size, 3)`, pixels in [0, 255].
    masks: uint8 `(n, size, size)`, class ids.
    """

    images: np.ndarray
    masks: np.ndarray


class SegmentationData(NamedTuple):
    train: object  # tf.data.Dataset of (images float32 (b, s, s, 3), masks int32 (b, s, s, 1))
    held_out: MaskSet
    class_names: tuple
    background_class: int


def _canvas_data(image_size, train_count, held_out_count, batch_size, seed, digits=None):
    tf = tasks.tensorflow()
    common = dict(canvas_size=image_size, digits=digits)
    train = canvases.digit_canvases(train_count, split="train", seed=seed, **common)
    held_out = canvases.digit_canvases(held_out_count, split="held_out", seed=seed + 1, **common)
    pipeline = tf.data.Dataset.from_tensor_slices((train.images, train.masks)).map(
        lambda image, mask: (tf.cast(image, "float32"), tf.cast(mask, "int32")[..., None])
    )
    return SegmentationData(
        train=tasks.batches(pipeline, batch_size, seed),
        held_out=MaskSet(held_out.images, held_out.masks),
        class_names=canvases.SEGMENTATION_CLASS_NAMES,
        background_class=0,
    )


def _pet_example(example, image_size):
    """A tfds pet example as `(image float32, mask int32 (size, size, 1))`, both resized to a square."""
    import tensorflow as tf  # traced by tf.data: a plain import (the loader has checked it is there)
    image = tf.image.resize(tf.cast(example["image"], "float32"), (image_size, image_size), antialias=True)
    mask = tf.image.resize(example["segmentation_mask"], (image_size, image_size), method="nearest")
    image = tf.ensure_shape(tf.clip_by_value(image, 0.0, 255.0), (image_size, image_size, 3))
    return image, tf.reshape(tf.cast(mask, "int32") - 1, (image_size, image_size, 1))


def _pet_data(image_size, train_count, held_out_count, batch_size, seed, data_dir=None):
    tf = tasks.tensorflow()
    name, train_split, held_out_split = PET_SPLITS
    train, held_out, _ = tasks.load_tfds_splits(
        name, train_split, held_out_split, train_count, held_out_count, data_dir
    )
    prepare = lambda example: _pet_example(example, image_size)  # noqa: E731
    held_out = list(held_out.map(prepare).as_numpy_iterator())
    return SegmentationData(
        train=tasks.batches(train.map(prepare, num_parallel_calls=tf.data.AUTOTUNE), batch_size, seed),
        held_out=MaskSet(
            np.stack([np.rint(image).astype("uint8") for image, _ in held_out]),
            np.stack([mask[..., 0].astype("uint8") for _, mask in held_out]),
        ),
        class_names=PET_CLASS_NAMES,
        background_class=PET_CLASS_NAMES.index("background"),
    )


def load_segmentation_data(data="digit_canvases", image_size=128, train_count=2000, held_out_count=400,
                           batch_size=16, seed=0, data_dir=None, digits=None):
    """Training batches and a held-out `MaskSet` for `data` ("digit_canvases" or "oxford_iiit_pet")."""
    if digits is not None and data != "digit_canvases":
        raise ValueError(f"digits chooses the digits of the digit canvases; {data!r} has its own classes.")
    if data == "digit_canvases":
        return _canvas_data(image_size, train_count, held_out_count, batch_size, seed, digits)
    if data == "oxford_iiit_pet":
        return _pet_data(image_size, train_count, held_out_count, batch_size, seed, data_dir)
    raise ValueError(f"segmentation data must be one of {', '.join(DATA_CHOICES)}; got {data!r}.")


def build_segmenter(encoder, num_classes):
    """A DeepLabV3 on `encoder`: atrous pooling (rates 1, 2, 3) on the stride-32 map, decoder at stride 4.

    The stride-32 map is 4x4 for a 128-pixel image and 7x7 for 224 pixels,
    where taps at rates up to 3 still land inside it; DeepLabV3's own 6, 12,
    18 suit 512-pixel images at stride 16.
    """
    from keras_convnext import hub  # imports Keras: here, so that the command line's --help needs none

    return hub.deeplabv3_segmenter(
        encoder, num_classes, spatial_pyramid_pooling_key="P5", low_level_feature_key="P2",
        dilation_rates=(1, 2, 3),
    )


def predict_masks(segmenter, images, batch_size=16):
    """The class of each pixel, uint8 `(n, size, size)`."""
    logits = segmenter.predict(images.astype("float32"), batch_size=batch_size, verbose=0)
    return np.argmax(np.asarray(logits), axis=-1).astype("uint8")


def mean_iou(true_masks, predicted_masks, num_classes):
    """`keras.metrics.MeanIoU`: the IoU of each class present in either mask, averaged."""
    import keras

    metric = keras.metrics.MeanIoU(num_classes=num_classes)
    metric.update_state(true_masks.reshape(-1), predicted_masks.reshape(-1))
    return float(keras.ops.convert_to_numpy(metric.result()))


def evaluate_segmenter(segmenter, held_out, num_classes, background_class, batch_size=16):
    """mIoU on `held_out`, and the chance level: the mIoU of calling every pixel background.

    Returns:
        `{"miou", "chance_miou", "images"}` and the raw `"predictions"`.
    """
    predictions = predict_masks(segmenter, held_out.images, batch_size)
    all_background = np.full_like(held_out.masks, background_class)
    return {
        "miou": mean_iou(held_out.masks, predictions, num_classes),
        "chance_miou": mean_iou(held_out.masks, all_background, num_classes),
        "images": len(held_out.images),
        "predictions": predictions,
    }


def finetune_segmenter(data="digit_canvases", model="ConvNeXtV2Atto", depths=None, dims=None, weights=None,
                       image_size=128, train_count=2000, held_out_count=400, epochs=5, batch_size=16,
                       learning_rate=1e-3, weight_decay=0.05, seed=0, output_dir="segmentation_run", digits=None,
                       verbose=True):
    """Fine-tunes a DeepLabV3 on a ConvNeXt encoder and scores it on held-out images.

    Writes into `output_dir`: `model.keras`, `metrics.json` (mIoU, its
    chance level, the scale and the time) and `predictions.png` (held-out
    images with true and predicted masks).

    Args:
        data: "digit_canvases" (offline) or "oxford_iiit_pet" (tensorflow-datasets).
        model, depths, dims, weights: the encoder (`tasks.build_encoder`).
        image_size: square input side in pixels.
        train_count, held_out_count: images used from each split.
        digits: for the canvases, the digits drawn (None: all ten).

    Returns:
        `{"model", "history", "evaluation", "plot", "predictions", "held_out"}`.
    """
    import keras

    keras.utils.set_random_seed(seed)
    dataset = load_segmentation_data(data, image_size, train_count, held_out_count, batch_size, seed,
                                     digits=digits)
    num_classes = len(dataset.class_names)
    encoder = tasks.build_encoder(model, image_size, weights, depths, dims)
    segmenter = build_segmenter(encoder, num_classes)
    steps = tasks.steps_per_epoch(dataset.train)
    tasks.compile_for_fine_tuning(
        segmenter, learning_rate, weight_decay, epochs * steps,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="pixel_accuracy")],  # the masks are class ids
    )
    history, seconds = tasks.fit(segmenter, dataset.train, epochs, verbose)
    evaluation = evaluate_segmenter(segmenter, dataset.held_out, num_classes, dataset.background_class,
                                    batch_size)
    predictions = evaluation.pop("predictions")
    os.makedirs(output_dir, exist_ok=True)
    plot = task_plots.plot_masks(dataset.held_out, predictions, num_classes, dataset.background_class,
                                 os.path.join(output_dir, "predictions.png"))
    evaluation.update(train_seconds=seconds, train_images=steps * batch_size, epochs=epochs, image_size=image_size,
                      model=model, backend=keras.backend.backend())
    tasks.save_keras_file(segmenter, output_dir)
    tasks.write_json(dict(evaluation, history=history), os.path.join(output_dir, "metrics.json"))
    return {"model": segmenter, "history": history, "evaluation": evaluation, "plot": plot,
            "predictions": predictions, "held_out": dataset.held_out}
