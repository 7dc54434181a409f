"""Evaluate a trained ConvNeXt classifier: top-1/top-5, confusion matrix, training curves.

    python examples/evaluate.py --model-path convnext_run/model.keras --data digits \
        --history convnext_run/history.json

Prints top-1 and top-5 accuracy and the confusion matrix, and writes
`confusion_matrix.csv` and (with a history) `training_curves.png` to
`--output-dir`. `fit_evaluate.py` and `finetune.py` call the same functions.
"""

import json
import os
import sys

if __name__ == "__main__":  # the backend must be chosen before keras is imported
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import select_backend

    select_backend(sys.argv[1:])

import numpy as np

from common import base_parser, parse


def predict_dataset(model, dataset, verbose=0):
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
    names = [str(name)[:8] for name in class_names]
    width = max(6, max(len(n) for n in names) + 1, len(str(matrix.max())) + 1)
    lines = ["true\\pred".ljust(10) + "".join(n.rjust(width) for n in names)]
    for name, row in zip(names, matrix):
        lines.append(name.ljust(10) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def plot_history(history, path):
    """Writes the loss and accuracy curves per epoch (train and validation) as a PNG."""
    import matplotlib

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
    temporary = path + ".tmp.png"
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def evaluate_classifier(model, dataset, class_names, output_dir=None, history=None, verbose=True):
    """Top-1/top-5 accuracy and confusion matrix on `dataset`; plots `history` if given.

    Returns a dict: `top1`, `top5`, `confusion_matrix` (numpy), `plot` (PNG
    path or None).
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
        np.savetxt(os.path.join(output_dir, "confusion_matrix.csv"), results["confusion_matrix"],
                   fmt="%d", delimiter=",", header=",".join(map(str, class_names)))
        if history:
            results["plot"] = plot_history(history, os.path.join(output_dir, "training_curves.png"))
            if verbose:
                print(f"training curves: {results['plot']}")
    return results


def main(argv=None):
    """Evaluates a saved `.keras` classifier on the held-out split of `--data`."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="a .keras model saved by fit_evaluate/finetune.")
    parser.add_argument("--history", help="history.json written by the training examples, to plot.")
    args = parse(parser, argv)

    import keras

    import keras_convnext  # noqa: F401  (registers the layers for loading)
    from keras_convnext import data

    model = keras.saving.load_model(args.model_path, safe_mode=True)
    datasets = data.load_dataset(args.data, args.image_size, args.batch_size, args.seed, limit=args.limit)
    history = None
    if args.history:
        with open(args.history) as f:
            history = json.load(f)
    return evaluate_classifier(model, datasets.validation, datasets.class_names, args.output_dir, history)


if __name__ == "__main__":
    main()
