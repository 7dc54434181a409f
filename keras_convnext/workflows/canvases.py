"""An offline detection and segmentation set of real images: scanned digits placed on larger canvases.

scikit-learn ships 1797 real handwritten digits, scanned at 8x8 pixels with
ink counts 0..16. `digit_canvases` scales some of them up and places them,
without overlap, on a noisy canvas of another colour, and returns what both
tasks need: each digit's box and class (detection) and each pixel's class
(segmentation, from the digit's ink). Everything is deterministic from the
seed, and the train and held-out canvases draw on disjoint sets of scans.
"""

from typing import NamedTuple

import numpy as np

from keras_convnext._deps import require

DIGIT_CLASS_NAMES = tuple(str(digit) for digit in range(10))
"""Detection classes 0..9 are the digits; segmentation class `1 + d` is digit `d`, 0 is background."""

SEGMENTATION_CLASS_NAMES = ("background",) + DIGIT_CLASS_NAMES

INK_THRESHOLD = 0.25
"""Fraction of full ink (16) above which a scaled pixel belongs to the digit's mask."""

HELD_OUT_FRACTION = 0.2
"""Share of scikit-learn's scans kept for held-out canvases (a fixed permutation)."""


class Canvases(NamedTuple):
    """Canvases with digits; `n` canvases of `size x size` pixels, at most `m` digits each.

    images: uint8 `(n, size, size, 3)`, pixels in [0, 255].
    masks: uint8 `(n, size, size)`, 0 for background, `1 + d` for digit `d`'s ink.
    boxes: float32 `(n, m, 4)`, each digit's ink box as `(y_min, x_min, y_max, x_max)`
        in pixels (the max edge exclusive); rows past a canvas' digits are -1.
    labels: int32 `(n, m)`, the digit 0..9 of each box; -1 past a canvas' digits.
    """

    images: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


def scanned_digits(split="train"):
    """scikit-learn's scans of one split as `(ink, digits)`.

    Returns:
        ink: float32 `(n, 8, 8)` in [0, 1] (the scans' 0..16 ink counts / 16).
        digits: int `(n,)`, the digit each scan shows.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', not {split!r}.")
    datasets = require("sklearn.datasets", "the scanned digits of the canvases")
    scans = datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(scans.target))
    cut = int(round(len(order) * (1.0 - HELD_OUT_FRACTION)))
    chosen = order[:cut] if split == "train" else order[cut:]
    return (scans.images[chosen] / 16.0).astype("float32"), scans.target[chosen]


def _scaled_ink(ink, side):
    """An 8x8 scan scaled to `side x side` pixels by linear interpolation, in [0, 1]."""
    ndimage = require("scipy.ndimage", "scaling the scanned digits")
    return np.clip(ndimage.zoom(ink, side / ink.shape[0], order=1), 0.0, 1.0)


def _free_spot(rng, size, side, taken, attempts=20):
    """A top-left corner where a `side`-pixel square overlaps no square in `taken`, or None."""
    for _ in range(attempts):
        top, left = rng.integers(0, size - side + 1, size=2)
        if all(top >= b or top + side <= t or left >= r or left + side <= l for t, l, b, r in taken):
            return int(top), int(left)
    return None


def _background(rng, size):
    """A canvas of one dark random colour with pixel noise, float32 `(size, size, 3)` in [0, 255]."""
    colour = rng.uniform(0, 110, size=3)
    return np.clip(colour + rng.normal(0.0, 10.0, size=(size, size, 3)), 0, 255)


def default_digit_sizes(canvas_size):
    """`(smallest, largest)` digit side for a canvas: 3/16 and 3/8 of it, 24 and 48 pixels on 128."""
    return max(4, 3 * canvas_size // 16), max(4, 3 * canvas_size // 8)


def digit_canvases(count, canvas_size=128, digits_per_canvas=(1, 4), digit_sizes=None, split="train",
                   seed=0, digits=None):
    """Builds `count` canvases of scanned digits with their boxes, classes and masks.

    Args:
        count: number of canvases.
        canvas_size: side of each square canvas in pixels.
        digits_per_canvas: `(fewest, most)` digits on a canvas, inclusive;
            a digit that finds no free place is left out.
        digit_sizes: `(smallest, largest)` side in pixels, inclusive, that an
            8x8 scan is scaled to; the ink box is within that square.
            None: `default_digit_sizes(canvas_size)`.
        split: `"train"` or `"held_out"`: which of scikit-learn's scans to
            use (disjoint sets, so held-out canvases show unseen handwriting).
        seed: the canvases, the scans chosen and their places follow from it.
        digits: the digits drawn, e.g. `(0, 1)`; None: all ten. Class ids
            stay the digits themselves.

    Returns:
        A `Canvases` tuple of numpy arrays.
    """
    fewest, most = digits_per_canvas
    smallest, largest = digit_sizes or default_digit_sizes(canvas_size)
    if not 1 <= fewest <= most or not 4 <= smallest <= largest <= canvas_size:
        raise ValueError(
            f"need 1 <= digits_per_canvas[0] <= digits_per_canvas[1] and 4 <= digit_sizes[0] <= "
            f"digit_sizes[1] <= canvas_size; got digits_per_canvas={digits_per_canvas}, "
            f"digit_sizes={digit_sizes}, canvas_size={canvas_size}."
        )
    ink_scans, scan_digits = scanned_digits(split)
    if digits is not None:
        chosen = np.isin(scan_digits, digits)
        if not chosen.any():
            raise ValueError(f"digits must name some of 0..9; got {digits!r}.")
        ink_scans, scan_digits = ink_scans[chosen], scan_digits[chosen]
    rng = np.random.default_rng(seed)
    images = np.zeros((count, canvas_size, canvas_size, 3), "uint8")
    masks = np.zeros((count, canvas_size, canvas_size), "uint8")
    boxes = np.full((count, most, 4), -1.0, "float32")
    labels = np.full((count, most), -1, "int32")
    for index in range(count):
        canvas = _background(rng, canvas_size)
        taken = []
        for _ in range(rng.integers(fewest, most + 1)):
            side = int(rng.integers(smallest, largest + 1))
            spot = _free_spot(rng, canvas_size, side, taken)
            if spot is None:
                continue
            top, left = spot
            scan = int(rng.integers(len(scan_digits)))
            ink = _scaled_ink(ink_scans[scan], side)[..., None]
            colour = rng.uniform(150, 255, size=3)
            window = canvas[top:top + side, left:left + side]
            canvas[top:top + side, left:left + side] = window * (1.0 - ink) + colour * ink
            rows, columns = np.nonzero(ink[..., 0] > INK_THRESHOLD)
            masks[index, top + rows, left + columns] = 1 + scan_digits[scan]
            slot = len(taken)
            boxes[index, slot] = (top + rows.min(), left + columns.min(), top + rows.max() + 1,
                                  left + columns.max() + 1)
            labels[index, slot] = scan_digits[scan]
            taken.append((top, left, top + side, left + side))
        images[index] = np.rint(canvas).astype("uint8")
    return Canvases(images, masks, boxes, labels)
