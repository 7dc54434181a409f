"""tf.data input pipelines for training and evaluating ConvNeXt classifiers.

Every pipeline yields `(images, one_hot_labels)` batches: images float32
`(batch, size, size, 3)` with pixels in [0, 255] (the models normalize by
themselves), labels float32 `(batch, num_classes)`. tf.data feeds `fit` on
every Keras backend.

Sources (`load_dataset(name, ...)`):
- `"digits"`: scikit-learn's 8x8 handwritten digits (real data shipped with
  scikit-learn, no network), upscaled and turned gray-to-RGB;
- a tensorflow-datasets name from `TFDS_SPLITS` (`"tf_flowers"`, `"imagenette"`,
  `"cifar10"`), optionally prefixed with `"tfds:"`;
- a directory of images, one sub-directory per class.
"""

import os
from typing import NamedTuple

import numpy as np

from keras_convnext._deps import require

# (train split, held-out split) per tensorflow-datasets name; tf_flowers has
# only a train split, so 10% of it is held out.
TFDS_SPLITS = {
    "tf_flowers": ("train[:90%]", "train[90%:]"),
    "imagenette": ("train", "validation"),
    "cifar10": ("train", "test"),
}


class Datasets(NamedTuple):
    train: object  # tf.data.Dataset of (images, one_hot_labels)
    validation: object
    num_classes: int
    class_names: list
    train_size: int  # examples per epoch (None if unknown)


def _tf():
    # tf.data feeds `fit` on every backend, so the pipelines need TensorFlow even on JAX and PyTorch.
    return require("tensorflow", "the tf.data input pipelines (train, finetune, evaluate)")


def _prepare(images, labels, image_size, num_classes):
    tf = _tf()
    images = tf.cast(images, "float32")
    if images.shape[-1] == 1:
        images = tf.image.grayscale_to_rgb(images)
    images = tf.image.resize(images, (image_size, image_size), antialias=True)
    images = tf.clip_by_value(images, 0.0, 255.0)
    labels = tf.one_hot(tf.cast(labels, "int32"), num_classes)
    return images, labels


def _finish(dataset, image_size, num_classes, batch_size, shuffle, seed, augment=None, batch_augment=None):
    """Per-example preparation, optional augmentation, batching and prefetch."""
    tf = _tf()
    if shuffle:
        dataset = dataset.shuffle(4096, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(
        lambda x, y: _prepare(x, y, image_size, num_classes), num_parallel_calls=tf.data.AUTOTUNE
    )
    dataset = dataset.batch(batch_size, drop_remainder=shuffle)
    if augment:
        dataset = dataset.map(
            lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    if batch_augment:
        dataset = dataset.map(batch_augment, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def digits_arrays(image_size=32, validation_fraction=0.2, seed=0):
    """scikit-learn's digits as RGB arrays upscaled to `image_size`.

    Returns:
        `(x_train, y_train, x_val, y_val)`: images uint8
        `(n, image_size, image_size, 3)` in [0, 255], labels int `(n,)`.
        The split is stratified by a fixed permutation (`seed`).
    """
    datasets = require("sklearn.datasets", "the digits dataset")
    tf = _tf()
    digits = datasets.load_digits()
    # Pixels are ink counts 0..16; stretch to the 0..255 range photographs use.
    images = (digits.images[..., None] * (255.0 / 16.0)).astype("float32")
    images = tf.image.resize(images, (image_size, image_size), method="bilinear").numpy()
    images = np.repeat(np.clip(np.rint(images), 0, 255).astype("uint8"), 3, axis=-1)
    labels = digits.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(round(len(labels) * (1.0 - validation_fraction)))
    train, val = order[:cut], order[cut:]
    return images[train], labels[train], images[val], labels[val]


def load_digits_datasets(image_size=32, batch_size=64, seed=0, augment=None, batch_augment=None, limit=None):
    """The offline default: scikit-learn digits as tf.data pipelines (10 classes)."""
    tf = _tf()
    x_train, y_train, x_val, y_val = digits_arrays(image_size, seed=seed)
    if limit:
        x_train, y_train, x_val, y_val = x_train[:limit], y_train[:limit], x_val[:limit], y_val[:limit]
    make = tf.data.Dataset.from_tensor_slices
    return Datasets(
        train=_finish(make((x_train, y_train)), image_size, 10, batch_size, True, seed, augment, batch_augment),
        validation=_finish(make((x_val, y_val)), image_size, 10, batch_size, False, seed),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        train_size=len(y_train),
    )


def load_tfds_datasets(name, image_size=224, batch_size=32, seed=0, augment=None, batch_augment=None,
                       data_dir=None, limit=None, download=True):
    """A tensorflow-datasets classification dataset as tf.data pipelines.

    `name` is a key of `TFDS_SPLITS`. Under `tfds.testing.mock_data` this
    reads generated examples and nothing is downloaded.
    """
    _tf()
    tfds = require("tensorflow_datasets", f"the tensorflow-datasets set {name!r}")
    name = name.removeprefix("tfds:")
    if name not in TFDS_SPLITS:
        raise ValueError(
            f"Unknown tensorflow-datasets name {name!r}; supported: {sorted(TFDS_SPLITS)}. "
            "For other data use an image folder (one sub-directory per class)."
        )
    train_split, val_split = TFDS_SPLITS[name]
    if limit:
        train_split, val_split = f"{train_split}[:{limit}]" if "[" not in train_split else train_split, \
            f"{val_split}[:{limit}]" if "[" not in val_split else val_split
    (train, val), info = tfds.load(
        name, split=[train_split, val_split], as_supervised=True, with_info=True,
        data_dir=data_dir, download=download, shuffle_files=False,
    )
    if limit:
        train, val = train.take(limit), val.take(limit)
    label = info.features["label"]
    num_classes = label.num_classes
    try:
        train_size = int(train.cardinality())
    except (TypeError, ValueError):
        train_size = None
    return Datasets(
        train=_finish(train, image_size, num_classes, batch_size, True, seed, augment, batch_augment),
        validation=_finish(val, image_size, num_classes, batch_size, False, seed),
        num_classes=num_classes,
        class_names=list(label.names),
        train_size=train_size if train_size and train_size > 0 else None,
    )


def load_folder_datasets(directory, image_size=224, batch_size=32, seed=0, validation_fraction=0.2,
                         augment=None, batch_augment=None):
    """Images in `directory/<class name>/*.jpg|png|...` split into train and held-out parts."""
    import keras

    if not os.path.isdir(directory):
        raise ValueError(f"Image folder {directory!r} does not exist.")
    _tf()  # keras.utils.image_dataset_from_directory decodes with TensorFlow
    common = dict(
        validation_split=validation_fraction, seed=seed, image_size=(image_size, image_size),
        batch_size=None, label_mode="int", shuffle=True,
    )
    train = keras.utils.image_dataset_from_directory(directory, subset="training", **common)
    val = keras.utils.image_dataset_from_directory(directory, subset="validation", **common)
    class_names = list(train.class_names)
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError(
            f"{directory!r} holds {num_classes} class folder(s); a classifier needs at least two "
            "sub-directories, one per class."
        )
    return Datasets(
        train=_finish(train, image_size, num_classes, batch_size, True, seed, augment, batch_augment),
        validation=_finish(val, image_size, num_classes, batch_size, False, seed),
        num_classes=num_classes,
        class_names=class_names,
        train_size=int(train.cardinality()) if int(train.cardinality()) > 0 else None,
    )


def load_dataset(name="tf_flowers", image_size=224, batch_size=32, seed=0, augment=None, batch_augment=None,
                 limit=None):
    """Train and held-out pipelines for `name`: "digits", a tfds name or an image folder.

    Args:
        name: `"digits"`, `"tf_flowers"`, `"imagenette"`, `"cifar10"` (or
            `"tfds:<name>"`), or a directory path.
        image_size: square side in pixels the images are resized to.
        batch_size: examples per batch (training drops the last partial batch).
        augment: optional `images -> images` function applied per batch.
        batch_augment: optional `(images, labels) -> (images, labels)` (MixUp/CutMix).
        limit: optional cap on examples per split (quick runs).

    Returns:
        A `Datasets` tuple.
    """
    if name == "digits":
        return load_digits_datasets(image_size, batch_size, seed, augment, batch_augment, limit)
    if name.startswith("tfds:") or name in TFDS_SPLITS:
        return load_tfds_datasets(name, image_size, batch_size, seed, augment, batch_augment, limit=limit)
    if os.path.isdir(name):
        return load_folder_datasets(name, image_size, batch_size, seed, augment=augment,
                                    batch_augment=batch_augment)
    raise ValueError(
        f"--data {name!r} is neither 'digits', a tensorflow-datasets name ({sorted(TFDS_SPLITS)}) "
        "nor an existing image folder."
    )
