"""Pictures of detections and segmentations on held-out images, written as PNG files."""

import os

import numpy as np

from keras_convnext._deps import require

SHOWN_SCORE = 0.3
"""Detections scoring at least this are drawn (at most `SHOWN_DETECTIONS`, best first); mAP counts all."""

SHOWN_DETECTIONS = 10


def _pyplot():
    matplotlib = require("matplotlib", "plotting predictions")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path):
    """Saves under a temporary name, then renames; returns `path`."""
    plt = _pyplot()
    temporary = path + ".partial.png"
    figure.savefig(temporary, dpi=80)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def _draw_box(axis, box, colour, text=None, dashed=False):
    y_min, x_min, y_max, x_max = box
    patch = _pyplot().Rectangle((x_min, y_min), x_max - x_min, y_max - y_min, fill=False, edgecolor=colour,
                                linewidth=1.5, linestyle="--" if dashed else "-")
    axis.add_patch(patch)
    if text:
        axis.text(x_min, y_min - 1, text, color=colour, fontsize=8, verticalalignment="bottom", clip_on=True)


def plot_detections(held_out, predictions, class_names, path, count=4):
    """Held-out images with true boxes (white, dashed) and the best detections (yellow, class:score).

    Args:
        held_out: a set with `images` uint8 `(n, size, size, 3)`, `boxes`, `labels`.
        predictions: `{"boxes", "labels", "scores"}` of those images.
        class_names: name of each class id.
        path: the PNG file to write.
    """
    plt = _pyplot()
    count = min(count, len(held_out.images))
    figure, axes = plt.subplots(1, count, figsize=(3 * count, 3.2), squeeze=False)
    for index, axis in enumerate(axes[0]):
        axis.imshow(held_out.images[index])
        for box, label in zip(held_out.boxes[index], held_out.labels[index]):
            if label >= 0:
                _draw_box(axis, box, "white", dashed=True)
        scores = predictions["scores"][index]
        for best in np.argsort(-scores)[:SHOWN_DETECTIONS]:
            label = predictions["labels"][index][best]
            if label >= 0 and scores[best] >= SHOWN_SCORE:
                text = f"{class_names[label]}:{scores[best]:.2f}"
                _draw_box(axis, predictions["boxes"][index][best], "yellow", text)
        height, width = held_out.images[index].shape[:2]
        axis.set_xlim(0, width)
        axis.set_ylim(height, 0)
        axis.axis("off")
    figure.suptitle("true boxes (dashed) and detections (class:score)", fontsize=10)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05)
    return _save(figure, path)


def _class_colours(num_classes, background_class):
    """A colour map with black for the background class and matplotlib's ten distinct colours for the rest."""
    plt = _pyplot()
    colours = [plt.get_cmap("tab10")(index % 10) for index in range(num_classes)]
    colours[background_class] = (0.0, 0.0, 0.0, 1.0)
    cmap = plt.matplotlib.colors.ListedColormap(colours)
    return dict(cmap=cmap, vmin=-0.5, vmax=num_classes - 0.5, interpolation="nearest")


def plot_masks(held_out, predicted_masks, num_classes, background_class, path, count=4):
    """Rows of held-out image, true mask and predicted mask, one colour per class (background black).

    Args:
        held_out: a set with `images` uint8 `(n, size, size, 3)` and `masks` `(n, size, size)`.
        predicted_masks: `(n, size, size)` class ids.
        num_classes: classes, for a fixed colour per class.
        background_class: the class drawn black.
        path: the PNG file to write.
    """
    plt = _pyplot()
    count = min(count, len(held_out.images))
    figure, axes = plt.subplots(3, count, figsize=(2.5 * count, 7.5), squeeze=False)
    colours = _class_colours(num_classes, background_class)
    for index in range(count):
        axes[0, index].imshow(held_out.images[index])
        axes[1, index].imshow(np.asarray(held_out.masks[index]), **colours)
        axes[2, index].imshow(np.asarray(predicted_masks[index]), **colours)
    for row, title in enumerate(("image", "true mask", "predicted mask")):
        axes[row, 0].set_ylabel(title)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    return _save(figure, path)
