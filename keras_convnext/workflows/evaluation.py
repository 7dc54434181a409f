"""Evaluation of a classifier: top-1/top-5 accuracy, confusion matrix, training curves."""

import json
import os

import numpy as np

from keras_convnext._deps import require
from keras_convnext.workflows.common import default_image_size, resolve_data


def predict_dataset(model, dataset):
    """(probabilities `(n, classes)`, integer labels `(n,)`) over a dataset of one-hot batches."""
    probabilities, labels = [], []
    for images, one_hot in dataset:
        probabilities.append(np.asarray(model.predict_on_batch(images.numpy())))
        labels.append(np.argmax(one_hot.numpy(), axis=-1))
    return np.concatenate(probabilities), np.concatenate(labels)


def top_k_accuracy(probabilities, labels, k):
    """Fraction of examples whose label is among the k highest scores."""
    k = min(k, probabilities.shape[-1])
    best = np.argsort(probabilities, axis=-1)[:, ::-1][:, :k]
    return float(np.mean(np.any(best == labels[:, None], axis=-1)))


def confusion_matrix(predicted, labels, num_classes):
    """Counts `(num_classes, num_classes)`: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype="int64")
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def format_matrix(matrix, class_names):
    """The confusion matrix as aligned text, class names cut to 8 characters."""
    names = [str(name)[:8] for name in class_names]
    width = max(6, max(len(n) for n in names) + 1, len(str(matrix.max())) + 1)
    lines = ["true\\pred".ljust(10) + "".join(n.rjust(width) for n in names)]
    for name, row in zip(names, matrix):
        lines.append(name.ljust(10) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def plot_history(history, path):
    """Writes the loss and accuracy curves per epoch (train and validation) as a PNG; returns `path`."""
    matplotlib = require("matplotlib", "plotting training curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("loss", "accuracy") if m in history]
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        epochs = np.arange(1, len(history[metric]) + 1)
        axis.plot(epochs, history[metric], marker="o", label="train")
        if "val_" + metric in history:
            axis.plot(epochs, history["val_" + metric], marker="o", label="validation")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    temporary = path + ".partial.png"
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def evaluate_classifier(model, dataset, class_names, output_dir=None, history=None, verbose=True):
    """Top-1/top-5 accuracy and confusion matrix on `dataset`; plots `history` if given.

    Args:
        model: a classifier of `(batch, size, size, 3)` pixels in [0, 255].
        dataset: tf.data batches of `(images, one_hot_labels)`.
        class_names: one name per class, in label order.
        output_dir: where `confusion_matrix.csv` and `training_curves.png` go (None: nowhere).
        history: `{metric: [value per epoch]}` to plot, or None.

    Returns:
        A dict: `top1`, `top5`, `confusion_matrix` (numpy), `examples`,
        `plot` (PNG path or None).
    """
    probabilities, labels = predict_dataset(model, dataset)
    predicted = np.argmax(probabilities, axis=-1)
    results = {
        "top1": top_k_accuracy(probabilities, labels, 1),
        "top5": top_k_accuracy(probabilities, labels, 5),
        "confusion_matrix": confusion_matrix(predicted, labels, len(class_names)),
        "examples": int(len(labels)),
        "plot": None,
    }
    if verbose:
        print(f"held-out examples: {results['examples']}  top-1: {results['top1']:.4f}  top-5: {results['top5']:.4f}")
        print(format_matrix(results["confusion_matrix"], class_names))
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "confusion_matrix.csv")
        np.savetxt(path + ".partial", results["confusion_matrix"], fmt="%d", delimiter=",",
                   header=",".join(map(str, class_names)))
        os.replace(path + ".partial", path)
        if history:
            results["plot"] = plot_history(history, os.path.join(output_dir, "training_curves.png"))
            if verbose:
                print(f"training curves: {results['plot']}")
    return results


def evaluate(model_path, data="auto", image_size=None, batch_size=32, limit=None, seed=0, history=None,
             output_dir=None, verbose=True):
    """Evaluates a saved `.keras` classifier on the held-out split of `data`.

    Args:
        model_path: a `.keras` file (loaded with `safe_mode=True`).
        data: "digits", a tensorflow-datasets name, an image folder, or
            "auto" (tf_flowers when online, else digits).
        image_size: input side in pixels (default: the model's, else 32 for
            digits and 224 otherwise).
        history: a `history.json` written by `train`/`finetune`, to plot.
        output_dir: where `confusion_matrix.csv` (and the plot) go.

    Returns:
        The dict of `evaluate_classifier`.
    """
    import keras

    import keras_convnext  # noqa: F401  (registers the layers for loading)
    from keras_convnext import data as datasets_module

    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"model file {model_path!r} does not exist.")
    model = keras.saving.load_model(model_path, safe_mode=True)
    data = resolve_data(data, verbose)
    image_size = image_size or model.input_shape[1] or default_image_size(data, None)
    datasets = datasets_module.load_dataset(data, image_size, batch_size, seed, limit=limit)
    curves = None
    if history:
        with open(history) as file:
            curves = json.load(file)
    return evaluate_classifier(model, datasets.validation, datasets.class_names, output_dir, curves, verbose)
