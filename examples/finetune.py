"""Fine-tune a pretrained ConvNeXt with the official ConvNeXt V2 recipe, on any Keras backend.

    python examples/finetune.py --backend torch --model ConvNeXtV2Atto \\
        --weights convnextv2_atto_1k_224_ema.pt --data tf_flowers --epochs 10
    python examples/finetune.py --data digits --epochs 3   # offline, from scratch

The same as `keras-convnext finetune`; `keras_convnext.workflows.finetune`
runs the recipe of `keras_convnext.training`: AdamW (weight decay 0.05, none
on biases, norms, GRN and layer scale), linear warm-up then cosine decay,
layer-wise learning-rate decay (official "group" levels, 0.9 per level),
label smoothing 0.1, RandAugment + RandomErasing per image, MixUp/CutMix per
batch, drop path, and an EMA of the weights (`--ema`).
"""

import os
import sys

if __name__ == "__main__" and "--backend" in sys.argv[:-1]:  # Keras reads its backend once, when imported
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]

from keras_convnext import workflows  # noqa: E402
from keras_convnext.workflows.arguments import finetune_parser, options  # noqa: E402


def main(argv=None):
    """Returns a dict with `model`, `optimizer`, `history`, `evaluation`."""
    args = finetune_parser(prog="finetune.py").parse_args(argv)
    result = workflows.finetune(**options(args))
    print(f"held-out top-1 after fine-tuning: {result['evaluation']['top1']:.3f}")
    return result


if __name__ == "__main__":
    main()
