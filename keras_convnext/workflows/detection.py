"""Object detection: RetinaNet (keras-hub) on a ConvNeXt encoder, fine-tuned and scored by COCO mAP.

    from keras_convnext import workflows

    result = workflows.finetune_detector(data="digit_canvases", epochs=5, output_dir="detection")
    result["evaluation"]["map"], result["evaluation"]["chance_map"]

Data is `"digit_canvases"` (offline: scanned digits on canvases,
`keras_convnext.workflows.canvases`) or `"voc"` (tensorflow-datasets' PASCAL
VOC 2007). Boxes are `(y_min, x_min, y_max, x_max)` in pixels throughout.
mAP is pycocotools' COCO evaluation (`pip install "keras-convnext[detection]"`).
"""

import os
from typing import NamedTuple

import numpy as np

from keras_convnext.workflows import canvases, coco, task_plots, tasks

DATA_CHOICES = ("digit_canvases", "voc")
MAX_BOXES = 32
"""Boxes kept per image; the rest of an image's boxes are -1 padding (VOC has up to 42, most far fewer)."""

VOC_SPLITS = ("voc/2007", "train", "validation")
MAX_DETECTIONS = 100
"""Detections kept per image after non-maximum suppression, COCO's own limit."""

SCORE_THRESHOLD = 0.05
"""Detections scoring less are dropped before mAP, as in COCO evaluation of RetinaNet."""


class BoxSet(NamedTuple):
    """Images with their boxes, as numpy arrays (`n` images, `m` box slots).

    images: uint8 `(n, size, size, 3)`, pixels in [0, 255].
    boxes: float32 `(n, m, 4)`, `(y_min, x_min, y_max, x_max)` in pixels; -1 rows are padding.
    labels: int32 `(n, m)`, class ids from 0; -1 is padding.
    """

    images: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


class DetectionData(NamedTuple):
    train: object  # tf.data.Dataset of (images float32 (b, s, s, 3), {"boxes": (b, m, 4), "labels": (b, m)})
    held_out: BoxSet
    class_names: tuple
    anchor_size: float  # the smallest anchor is `8 * anchor_size` pixels (pyramid level 3)


def _canvas_data(image_size, train_count, held_out_count, batch_size, seed, digits=None):
    tf = tasks.tensorflow()
    sizes = canvases.default_digit_sizes(image_size)
    common = dict(canvas_size=image_size, digit_sizes=sizes, digits=digits)
    train = canvases.digit_canvases(train_count, split="train", seed=seed, **common)
    held_out = canvases.digit_canvases(held_out_count, split="held_out", seed=seed + 1, **common)
    pipeline = tf.data.Dataset.from_tensor_slices(
        (train.images, {"boxes": train.boxes, "labels": train.labels})
    ).map(lambda image, target: (tf.cast(image, "float32"), target))
    return DetectionData(
        train=tasks.batches(pipeline, batch_size, seed),
        held_out=BoxSet(held_out.images, held_out.boxes, held_out.labels),
        class_names=canvases.DIGIT_CLASS_NAMES,
        anchor_size=sizes[0] / 8,  # the smallest anchor (8 * anchor_size pixels) is the smallest digit's square
    )


def _voc_example(example, image_size):
    """A tfds VOC example as `(image float32, {"boxes", "labels"})`, resized to a square and padded."""
    import tensorflow as tf  # traced by tf.data: a plain import (the loader has checked it is there)
    image = tf.image.resize(tf.cast(example["image"], "float32"), (image_size, image_size), antialias=True)
    # tfds boxes are (y_min, x_min, y_max, x_max) in [0, 1] of the image, so a square resize keeps them.
    boxes = example["objects"]["bbox"][:MAX_BOXES] * image_size
    labels = tf.cast(example["objects"]["label"][:MAX_BOXES], "int32")
    padding = MAX_BOXES - tf.shape(labels)[0]
    boxes = tf.pad(boxes, [[0, padding], [0, 0]], constant_values=-1.0)
    labels = tf.pad(labels, [[0, padding]], constant_values=-1)
    image = tf.ensure_shape(tf.clip_by_value(image, 0.0, 255.0), (image_size, image_size, 3))
    return image, {"boxes": tf.ensure_shape(boxes, (MAX_BOXES, 4)), "labels": tf.ensure_shape(labels, (MAX_BOXES,))}


def _voc_data(image_size, train_count, held_out_count, batch_size, seed, data_dir=None):
    tf = tasks.tensorflow()
    name, train_split, held_out_split = VOC_SPLITS
    train, held_out, info = tasks.load_tfds_splits(
        name, train_split, held_out_split, train_count, held_out_count, data_dir
    )
    prepare = lambda example: _voc_example(example, image_size)  # noqa: E731
    held_out = list(held_out.map(prepare).as_numpy_iterator())
    return DetectionData(
        train=tasks.batches(train.map(prepare, num_parallel_calls=tf.data.AUTOTUNE), batch_size, seed),
        held_out=BoxSet(
            np.stack([np.rint(image).astype("uint8") for image, _ in held_out]),
            np.stack([target["boxes"] for _, target in held_out]),
            np.stack([target["labels"] for _, target in held_out]),
        ),
        class_names=tuple(info.features["objects"]["label"].names),
        anchor_size=4.0,  # keras-hub's default: anchors from 32 pixels
    )


def load_detection_data(data="digit_canvases", image_size=128, train_count=2000, held_out_count=400,
                        batch_size=16, seed=0, data_dir=None, digits=None):
    """Training batches and a held-out `BoxSet` for `data` ("digit_canvases" or "voc")."""
    if digits is not None and data != "digit_canvases":
        raise ValueError(f"digits chooses the digits of the digit canvases; {data!r} has its own classes.")
    if data == "digit_canvases":
        return _canvas_data(image_size, train_count, held_out_count, batch_size, seed, digits)
    if data == "voc":
        return _voc_data(image_size, train_count, held_out_count, batch_size, seed, data_dir)
    raise ValueError(f"detection data must be one of {', '.join(DATA_CHOICES)}; got {data!r}.")


def build_detector(encoder, num_classes, anchor_size=4.0, head_conv_layers=2, head_group_norm=True):
    """A RetinaNet on `encoder` whose predictions keep up to 100 boxes scoring over 0.05 per image.

    Args:
        encoder: a keras_convnext model built with `include_top=False`.
        num_classes: object classes.
        anchor_size: the anchors at pyramid level `l` are `2**l * anchor_size`
            pixels (times 2**(0, 1/3, 2/3), at aspect ratios 1:2, 1:1, 2:1).
        head_conv_layers: 3x3 convolutions (256 channels) in each head before
            its output (RetinaNet's paper uses 4).
        head_group_norm: group normalization (32 groups) after each of those
            convolutions. From random weights the heads then learn from the
            first steps; without it they sit at the class prior for dozens of
            steps and diverge at learning rates much above 3e-3.
    """
    from keras_convnext import hub  # imports Keras: here, so that the command line's --help needs none

    keras_hub = hub.import_keras_hub()
    anchor_generator = keras_hub.layers.AnchorGenerator(
        bounding_box_format="yxyx", min_level=3, max_level=7, num_scales=3, aspect_ratios=[0.5, 1.0, 2.0],
        anchor_size=anchor_size,
    )
    prediction_decoder = keras_hub.layers.NonMaxSuppression(
        bounding_box_format="yxyx", from_logits=True, confidence_threshold=SCORE_THRESHOLD,
        max_detections=MAX_DETECTIONS,
    )
    return hub.retinanet_detector(
        encoder, num_classes, bounding_box_format="yxyx", anchor_generator=anchor_generator,
        prediction_decoder=prediction_decoder, pre_logits_num_conv_layers=head_conv_layers,
        use_prediction_head_norm=head_group_norm,
    )


def predict_boxes(detector, images, batch_size=16):
    """The detector's boxes on `images` as numpy `{"boxes", "labels", "scores"}`, -1 where no detection."""
    predictions = detector.predict(images.astype("float32"), batch_size=batch_size, verbose=0)
    labels = np.asarray(predictions["labels"]).astype("int64")
    scores = np.asarray(predictions["confidence"], "float32")
    kept = np.arange(labels.shape[1])[None, :] < np.asarray(predictions["num_detections"])[:, None]
    return {
        "boxes": np.asarray(predictions["boxes"], "float32"),
        "labels": np.where(kept, labels, -1),
        "scores": np.where(kept, scores, -1.0),
    }


def evaluate_detector(detector, held_out, batch_size=16, seed=0):
    """COCO mAP of the detector on `held_out`, and of random boxes (chance), by pycocotools.

    Returns:
        `{"map", "map50", "chance_map", "chance_map50", "images", "objects"}`
        and the raw `"predictions"`.
    """
    predictions = predict_boxes(detector, held_out.images, batch_size)
    scores = coco.box_map(held_out.boxes, held_out.labels, predictions["boxes"], predictions["labels"],
                          predictions["scores"])
    chance = coco.box_map(held_out.boxes, held_out.labels,
                          **coco.random_boxes(held_out, MAX_DETECTIONS, seed))
    return {
        "map": scores["map"], "map50": scores["map50"],
        "chance_map": chance["map"], "chance_map50": chance["map50"],
        "images": len(held_out.images), "objects": int((held_out.labels >= 0).sum()),
        "predictions": predictions,
    }


def finetune_detector(data="digit_canvases", model="ConvNeXtV2Atto", depths=None, dims=None, weights=None,
                      image_size=128, train_count=2000, held_out_count=400, epochs=5, batch_size=16,
                      learning_rate=1e-3, weight_decay=0.05, seed=0, output_dir="detection_run", digits=None,
                      anchor_size=None, head_conv_layers=2, verbose=True):
    """Fine-tunes a RetinaNet on a ConvNeXt encoder and scores it on held-out images.

    Writes into `output_dir`: `model.keras`, `metrics.json` (mAP@[.5:.95],
    mAP@.5, their chance levels, the scale and the time) and
    `predictions.png` (held-out images with true and predicted boxes).

    Args:
        data: "digit_canvases" (offline) or "voc" (tensorflow-datasets).
        model, depths, dims, weights: the encoder (`tasks.build_encoder`).
        image_size: square input side in pixels.
        train_count, held_out_count: images used from each split.
        digits: for the canvases, the digits drawn (None: all ten).
        anchor_size: anchors at pyramid level `l` are `2**l * anchor_size`
            pixels; None: the smallest digit's side / 8 for the canvases,
            keras-hub's 4 (32-pixel anchors and up) for VOC.
        head_conv_layers: 3x3 convolutions, each followed by group
            normalization, in each RetinaNet head.

    Returns:
        `{"model", "history", "evaluation", "plot"}`.
    """
    import keras

    keras.utils.set_random_seed(seed)
    dataset = load_detection_data(data, image_size, train_count, held_out_count, batch_size, seed,
                                  digits=digits)
    encoder = tasks.build_encoder(model, image_size, weights, depths, dims)
    detector = build_detector(encoder, len(dataset.class_names), anchor_size or dataset.anchor_size,
                              head_conv_layers)
    steps = tasks.steps_per_epoch(dataset.train)
    tasks.compile_for_fine_tuning(detector, learning_rate, weight_decay, epochs * steps)
    history, seconds = tasks.fit(detector, dataset.train, epochs, verbose)
    evaluation = evaluate_detector(detector, dataset.held_out, batch_size, seed)
    predictions = evaluation.pop("predictions")
    os.makedirs(output_dir, exist_ok=True)
    plot = task_plots.plot_detections(
        dataset.held_out, predictions, dataset.class_names, os.path.join(output_dir, "predictions.png")
    )
    evaluation.update(train_seconds=seconds, train_images=steps * batch_size, epochs=epochs, image_size=image_size,
                      model=model, backend=keras.backend.backend())
    tasks.save_keras_file(detector, output_dir)
    tasks.write_json(dict(evaluation, history=history), os.path.join(output_dir, "metrics.json"))
    return {"model": detector, "history": history, "evaluation": evaluation, "plot": plot,
            "predictions": predictions, "held_out": dataset.held_out}
