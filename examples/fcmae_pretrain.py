"""Pre-train a ConvNeXt V2 encoder with FCMAE and look at its reconstructions.

Offline by default (scikit-learn's handwritten digits); `--data photos` uses
scikit-image's sample photographs and `--data tfds:<name>` any image dataset
of tensorflow-datasets. Writes into `--output-dir`:

- `reconstructions.png`: one row per sample, original | masked input |
  reconstruction | reconstruction with the visible patches pasted back;
- `loss_curve.png` and `history.json`: the training loss per epoch;
- `encoder.weights.h5`: the pre-trained encoder, ready for
  `keras_convnext.transfer_encoder` or fine-tuning.

    python examples/fcmae_pretrain.py --backend jax --epochs 20 --data photos

The same as `keras-convnext fcmae-pretrain` (`keras_convnext.workflows.pretrain_fcmae`).
"""

import os
import sys

if __name__ == "__main__" and "--backend" in sys.argv[:-1]:  # Keras reads its backend once, when imported
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]

from keras_convnext import workflows  # noqa: E402
from keras_convnext.workflows.arguments import options, pretrain_parser  # noqa: E402


def main(argv=None):
    """Returns `{"history": [loss per epoch], "files": {name: path}}`."""
    args = pretrain_parser(prog="fcmae_pretrain.py").parse_args(argv)
    return workflows.pretrain_fcmae(**options(args))


if __name__ == "__main__":
    main()
