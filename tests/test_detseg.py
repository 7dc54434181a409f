"""The detection and segmentation examples end to end, small: the offline digit canvases and mock tfds.

The mock tensorflow-datasets sets (`tfds.testing.mock_data`) hold digit
canvases written in each set's own format (VOC's normalized boxes on
non-square images, the pets' 1/2/3 trimaps), so a model can learn from them
and the loaders' conversions are checked by the scores. Each mIoU is
compared with its chance level, every pixel background, computed by the same
metric, and each mAP with that of random boxes of the true sizes, scored
by pycocotools like the detector (checked against known answers first: the
true boxes score 1).
"""

import os
import sys

import numpy as np
import pytest

import keras

from keras_convnext.workflows import canvases, coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import detection  # noqa: E402
import segmentation  # noqa: E402

SIZE = 64
# Two digits of the ten keep the tasks learnable in a few dozen steps.
DIGITS = (0, 1)
TINY = ["--image-size", str(SIZE), "--depths", "1,1,1,1", "--dims", "16,32,64,128", "--quiet"]
TRAINING = ["--train-count", "96", "--held-out-count", "16", "--epochs", "4", "--batch-size", "8",
            "--learning-rate", "3e-3"]
# RetinaNet needs more images than DeepLabV3 to place boxes better than chance in its first epochs.
DETECTION_TRAINING = ["--train-count", "144", "--held-out-count", "32", "--epochs", "3", "--batch-size", "8",
                      "--learning-rate", "3e-3", "--head-conv-layers", "1"]
OFFLINE = ["--digits", ",".join(map(str, DIGITS))]
# Each digit pixel found adds to the chance level (every pixel background): a margin that a model
# marking the digits' pixels clears and one calling everything background cannot.
MIOU_MARGIN = 0.03


BACKEND = keras.backend.backend()


def _run_under(*backends):
    """Each backend trains one segmentation and one detection example; together they cover every source."""
    return pytest.mark.skipif(
        BACKEND not in backends, reason=f"this data source is trained under {' and '.join(backends)}"
    )


def _needs(*modules):
    for module in modules:
        pytest.importorskip(module, reason=f"needs {module}")


def test_digit_canvases_are_deterministic_with_boxes_around_their_ink():
    first = canvases.digit_canvases(6, SIZE, digit_sizes=(12, 24), seed=3)
    again = canvases.digit_canvases(6, SIZE, digit_sizes=(12, 24), seed=3)
    other = canvases.digit_canvases(6, SIZE, digit_sizes=(12, 24), seed=4)
    for name in canvases.Canvases._fields:
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.images, other.images)
    assert first.images.shape == (6, SIZE, SIZE, 3) and first.images.dtype == np.uint8
    for masks, boxes, labels in zip(first.masks, first.boxes, first.labels):
        assert (labels >= 0).sum() >= 1
        for box, label in zip(boxes, labels):
            if label < 0:
                assert (box == -1).all()
                continue
            y_min, x_min, y_max, x_max = box.astype(int)
            inside = masks[y_min:y_max, x_min:x_max] == 1 + label
            # The box is the tight box of the digit's ink: every edge row and column has ink.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert 12 * 0.25 <= y_max - y_min <= 24
    train_ink, _ = canvases.scanned_digits("train")
    held_out_ink, _ = canvases.scanned_digits("held_out")
    assert len(train_ink) + len(held_out_ink) == 1797


def test_coco_map_scores_the_truth_one_and_random_boxes_low():
    _needs("pycocotools")
    truth = canvases.digit_canvases(20, 128, split="held_out", seed=1)
    labels = truth.labels
    perfect = coco.box_map(truth.boxes, labels, truth.boxes, labels, np.where(labels >= 0, 1.0, -1.0))
    assert perfect == {"map": 1.0, "map50": 1.0}
    wrong_class = coco.box_map(truth.boxes, labels, truth.boxes, np.where(labels >= 0, (labels + 1) % 10, -1),
                               np.ones(labels.shape))
    assert wrong_class == {"map": 0.0, "map50": 0.0}
    chance = coco.box_map(truth.boxes, labels, **coco.random_boxes(truth, 100, seed=0))
    assert 0.0 < chance["map"] < chance["map50"] < 0.1


def _canvas_stream(count, split, seed, to_example):
    """A tf.data pipeline of `to_example(canvas arrays)` dicts, as a mocked tfds split yields them."""
    import tensorflow as tf

    made = canvases.digit_canvases(count, SIZE, split=split, seed=seed, digits=DIGITS)
    examples = [to_example(*arrays) for arrays in zip(made.images, made.masks, made.boxes, made.labels)]
    signature = tf.nest.map_structure(lambda a: tf.TensorSpec((None,) * a.ndim, tf.as_dtype(a.dtype)),
                                      examples[0])
    dataset = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(count))  # as a tfds split knows its size


def _voc_example(image, mask, boxes, labels):
    """VOC's format: an image twice as wide, boxes in [0, 1] of its height and width, labels of 20 classes."""
    kept = labels >= 0
    return {"image": np.repeat(image, 2, axis=1), "objects": {
        "bbox": (boxes[kept] / SIZE).astype("float32"), "label": labels[kept].astype("int64")}}


def _pet_example(image, mask, boxes, labels):
    """The pets' format: trimap 1 on the digits, 3 on their edge pixels, 2 elsewhere."""
    ink = np.pad(mask > 0, 1)
    inner = ink[1:-1, 1:-1] & ink[:-2, 1:-1] & ink[2:, 1:-1] & ink[1:-1, :-2] & ink[1:-1, 2:]
    trimap = np.where(inner, 1, np.where(mask > 0, 3, 2)).astype("uint8")
    return {"image": image, "segmentation_mask": trimap[..., None]}


def _mock_tfds(to_example, count):
    import tensorflow_datasets as tfds

    def as_dataset(builder, split, *args, **kwargs):
        train = str(split).startswith("train")
        return _canvas_stream(count, "train" if train else "held_out", 0 if train else 1, to_example)

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def _segment(tmp_path, *flags):
    return segmentation.main([*TINY, "--output-dir", str(tmp_path), *flags])["evaluation"]


@pytest.mark.slow
@_run_under("jax", "torch")
def test_segmentation_example_beats_chance_on_canvases(tmp_path):
    _needs("keras_hub", "sklearn", "matplotlib")
    scores = _segment(tmp_path, *TRAINING, *OFFLINE)
    assert scores["miou"] > scores["chance_miou"] + MIOU_MARGIN, scores
    for name in ("model.keras", "metrics.json", "predictions.png"):
        assert os.path.getsize(tmp_path / name) > 0, name


@pytest.mark.slow
@_run_under("tensorflow")
def test_segmentation_example_beats_chance_on_mock_oxford_iiit_pet(tmp_path):
    _needs("keras_hub", "tensorflow_datasets", "matplotlib")
    with _mock_tfds(_pet_example, 96):
        scores = _segment(tmp_path, "--data", "oxford_iiit_pet", *TRAINING)
    assert scores["images"] == 16
    assert scores["miou"] > scores["chance_miou"] + MIOU_MARGIN, scores


def test_detector_starts_at_the_class_prior_with_unshifted_boxes():
    _needs("keras_hub")
    from keras_convnext.hub import tasks as hub_tasks
    from keras_convnext.workflows import detection as detection_workflow, tasks

    encoder = tasks.build_encoder("ConvNeXtV2Atto", SIZE, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    detector = detection_workflow.build_detector(encoder, num_classes=2, anchor_size=1.5, head_conv_layers=1)
    class_bias = keras.ops.convert_to_numpy(detector.classification_head.prediction_layer.bias)
    box_bias = keras.ops.convert_to_numpy(detector.box_head.prediction_layer.bias)
    np.testing.assert_allclose(1.0 / (1.0 + np.exp(-class_bias)), hub_tasks.CLASS_PRIOR, rtol=1e-5)
    np.testing.assert_array_equal(box_bias, np.zeros_like(box_bias))
    # keras-hub's own initialization puts the prior's bias on the box head: class probabilities near 0.5.
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    logits = keras.ops.convert_to_numpy(detector(images)["cls_logits"])
    assert 1.0 / (1.0 + np.exp(-np.median(logits))) < 0.05


def _assert_detector_beats_chance(scores, history):
    assert history["loss"][-1] < 0.5 * history["loss"][0], history
    assert scores["map"] > scores["chance_map"] and scores["map50"] > scores["chance_map50"], scores
    assert 0.0 < scores["chance_map"] < scores["chance_map50"] < 0.1, scores


@pytest.mark.slow
@_run_under("tensorflow")
def test_detection_example_beats_chance_on_canvases(tmp_path):
    _needs("keras_hub", "pycocotools", "sklearn", "matplotlib")
    result = detection.main([*TINY, "--output-dir", str(tmp_path), *DETECTION_TRAINING, *OFFLINE])
    _assert_detector_beats_chance(result["evaluation"], result["history"])
    assert result["evaluation"]["images"] == 32
    for name in ("model.keras", "metrics.json", "predictions.png"):
        assert os.path.getsize(tmp_path / name) > 0, name


@pytest.mark.slow
@_run_under("jax", "torch")
def test_detection_example_beats_chance_on_mock_voc(tmp_path):
    _needs("keras_hub", "pycocotools", "tensorflow_datasets", "matplotlib")
    with _mock_tfds(_voc_example, 144):
        # The canvases' digits are 12 to 24 pixels: anchors from 12 (VOC's default starts at 32).
        result = detection.main([*TINY, "--output-dir", str(tmp_path), "--data", "voc", *DETECTION_TRAINING,
                                 "--anchor-size", "1.5"])
    scores = result["evaluation"]
    assert scores["images"] == 32 and scores["objects"] > 32
    _assert_detector_beats_chance(scores, result["history"])
