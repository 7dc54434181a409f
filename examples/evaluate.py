"""Evaluate a trained ConvNeXt classifier: top-1/top-5, confusion matrix, training curves.

    python examples/evaluate.py --model-path convnext_run/model.keras --data digits \\
        --history convnext_run/history.json --output-dir convnext_run

The same as `keras-convnext evaluate` (`keras_convnext.workflows.evaluate`):
prints top-1 and top-5 accuracy and the confusion matrix, and writes
`confusion_matrix.csv` and (with a history) `training_curves.png` to
`--output-dir`.
"""

import os
import sys

if __name__ == "__main__" and "--backend" in sys.argv[:-1]:  # Keras reads its backend once, when imported
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]

from keras_convnext import workflows  # noqa: E402
from keras_convnext.workflows.arguments import evaluate_parser, options  # noqa: E402


def main(argv=None):
    """Returns the dict of `keras_convnext.workflows.evaluate_classifier`."""
    args = evaluate_parser(prog="evaluate.py").parse_args(argv)
    return workflows.evaluate(**options(args))


if __name__ == "__main__":
    main()
