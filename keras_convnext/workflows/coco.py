"""COCO-style box mAP by pycocotools, and the boxes of a guesser that sets its chance level.

Boxes are `(y_min, x_min, y_max, x_max)` in pixels, padded with -1 labels;
pycocotools takes `[x, y, width, height]` and category ids, which here are
the class id plus one.
"""

import contextlib
import io

import numpy as np

from keras_convnext._deps import require


def _coco_tools():
    require("pycocotools", "COCO mAP")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def _xywh(box):
    y_min, x_min, y_max, x_max = (float(value) for value in box)
    return [x_min, y_min, x_max - x_min, y_max - y_min]


def box_map(true_boxes, true_labels, boxes, labels, scores):
    """COCO mAP@[.5:.95] and mAP@.5 of predicted boxes against the true ones, by pycocotools.

    Args:
        true_boxes: `(n, m, 4)` true boxes per image; true_labels `(n, m)`
            their class ids, -1 for padding.
        boxes: `(n, k, 4)` predicted boxes; labels `(n, k)` their class ids
            (-1: no detection); scores `(n, k)` their confidences.

    Returns:
        `{"map": mAP@[.5:.95], "map50": mAP@.5}`, each in [0, 1]; 0 when
        nothing was detected.
    """
    COCO, COCOeval = _coco_tools()
    truth, detections = [], []
    for image, (image_boxes, image_labels) in enumerate(zip(true_boxes, true_labels)):
        for box, label in zip(image_boxes, image_labels):
            if label >= 0:
                xywh = _xywh(box)
                truth.append({"id": len(truth) + 1, "image_id": image, "category_id": int(label) + 1,
                              "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
        for box, label, score in zip(boxes[image], labels[image], scores[image]):
            if label >= 0:
                detections.append({"image_id": image, "category_id": int(label) + 1, "bbox": _xywh(box),
                                   "score": float(score)})
    if not detections:
        return {"map": 0.0, "map50": 0.0}
    categories = sorted({row["category_id"] for row in truth} | {row["category_id"] for row in detections})
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": image} for image in range(len(true_boxes))],
        "annotations": truth,
        "categories": [{"id": category} for category in categories],
    }
    # pycocotools reports its progress and the summary table on stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # -1 marks "no true boxes at all"; there is then nothing to find.
    return {"map": max(0.0, float(evaluation.stats[0])), "map50": max(0.0, float(evaluation.stats[1]))}


def random_boxes(held_out, boxes_per_image, seed=0):
    """The detections of a guesser that knows the true box sizes but not where or what the objects are.

    For each image it draws `boxes_per_image` boxes whose (height, width)
    are those of random true boxes of the whole set, at uniformly random
    places inside the image, with classes drawn uniformly from those the
    set holds, and uniformly random scores.
    Scored like a detector, its mAP is the chance level.

    Args:
        held_out: a set with `images` `(n, size, size, 3)`, `boxes` and `labels`.

    Returns:
        `{"boxes": (n, boxes_per_image, 4), "labels", "scores"}`.
    """
    rng = np.random.default_rng(seed)
    count, height, width = held_out.images.shape[:3]
    true = held_out.boxes[held_out.labels >= 0]
    sizes = (true[:, 2:] - true[:, :2])[rng.integers(len(true), size=(count, boxes_per_image))]
    corners = rng.uniform(0.0, 1.0, size=(count, boxes_per_image, 2)) * (np.array([height, width]) - sizes)
    return {
        "boxes": np.concatenate([corners, corners + sizes], axis=-1).astype("float32"),
        "labels": rng.choice(np.unique(held_out.labels[held_out.labels >= 0]), size=(count, boxes_per_image)),
        "scores": rng.uniform(size=(count, boxes_per_image)).astype("float32"),
    }
