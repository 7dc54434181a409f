"""Train and evaluate a ConvNeXt classifier with `fit` on any Keras backend.

    python examples/fit_evaluate.py --backend jax --data digits --epochs 10
    python examples/fit_evaluate.py --data tf_flowers --model ConvNeXtV2Atto
    python examples/fit_evaluate.py --data path/to/images  # one folder per class
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python examples/fit_evaluate.py --backend jax --data digits --distribute

The same as `keras-convnext train`: `keras_convnext.workflows.train` does the
work. `--distribute` trains data-parallel on every local device (JAX and
TensorFlow). Writes `model.keras`, `history.json`, `confusion_matrix.csv`
and `training_curves.png` to `--output-dir`.
"""

import os
import sys

if __name__ == "__main__" and "--backend" in sys.argv[:-1]:  # Keras reads its backend once, when imported
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]

from keras_convnext import workflows  # noqa: E402
from keras_convnext.workflows.arguments import options, train_parser  # noqa: E402


def main(argv=None):
    """Returns a dict with `model`, `history` (dict of lists), `evaluation`, `replicas`."""
    args = train_parser(prog="fit_evaluate.py").parse_args(argv)
    result = workflows.train(**options(args))
    print(f"held-out top-1: {result['evaluation']['top1']:.3f}" if result["evaluation"] else "trained")
    return result


if __name__ == "__main__":
    main()
