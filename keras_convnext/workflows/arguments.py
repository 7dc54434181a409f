"""Command-line flags of the workflows, shared by `keras-convnext` and the example scripts.

Each parser's destinations are the keyword arguments of its workflow
function, so `workflow(**options(args))` runs it. Nothing here imports Keras.
"""

import argparse
import sys

BACKENDS = ("tensorflow", "jax", "torch")


def _four_ints(text):
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected four comma-separated integers, got {text!r}") from None
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected four positive integers such as 2,2,6,2; got {text!r}")
    return values


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser(prog, description, backend_flag):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if backend_flag:
        parser.add_argument("--backend", choices=BACKENDS,
                            help="Keras backend (default: KERAS_BACKEND, else Keras' configured one).")
    return parser


def _common(parser, default_data="auto", data_help=None):
    parser.add_argument("--data", default=default_data, help=data_help or (
        "'digits' (offline), tf_flowers, imagenette, cifar10, or an image folder (one sub-directory per "
        "class); 'auto': tf_flowers when online, else digits."))
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--image-size", type=_positive_int, default=None,
                        help="square input side in pixels (default 224; 32 for digits).")
    parser.add_argument("--limit", type=_positive_int, default=None, help="use at most this many examples per split.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", dest="verbose", action="store_false", help="no progress bars.")


def _training(parser):
    parser.add_argument("--model", default="ConvNeXtV2Atto",
                        help="a keras_convnext constructor name, e.g. ConvNeXtV2Atto or ConvNeXtTiny.")
    parser.add_argument("--depths", type=_four_ints, help="custom stage depths 'a,b,c,d' (overrides --model's).")
    parser.add_argument("--dims", type=_four_ints, help="custom stage widths 'a,b,c,d' (overrides --model's).")
    parser.add_argument("--epochs", type=_positive_int, default=5)
    parser.add_argument("--steps-per-epoch", type=_positive_int, default=None)
    parser.add_argument("--output-dir", default="convnext_run", help="where the model, history and plots go.")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="keep freed memory in the process (glibc): faster training steps on JAX and "
                             "PyTorch, at the cost of holding the peak memory (docs/workflows.md).")


def train_parser(prog="keras-convnext train", backend_flag=True):
    """Flags of `keras_convnext.workflows.train`."""
    parser = _parser(prog, "Train and evaluate a ConvNeXt classifier with fit.", backend_flag)
    _common(parser)
    _training(parser)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--weights", help="start from a checkpoint file or registry tag (new head).")
    parser.add_argument("--distribute", action="store_true", help="data-parallel over all local devices.")
    parser.add_argument("--no-evaluation", dest="evaluation", action="store_false",
                        help="skip the confusion matrix and plots (training and validation loss only).")
    return parser


def finetune_parser(prog="keras-convnext finetune", backend_flag=True):
    """Flags of `keras_convnext.workflows.finetune` (the official ConvNeXt V2 recipe)."""
    parser = _parser(prog, "Fine-tune a ConvNeXt with the official ConvNeXt V2 recipe.", backend_flag)
    _common(parser)
    _training(parser)
    parser.add_argument("--weights", help="pretrained checkpoint file or registry tag (a new head is trained).")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate.")
    parser.add_argument("--min-learning-rate", type=float, default=1e-6)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--layer-decay", type=float, default=0.9)
    parser.add_argument("--layer-decay-scheme", choices=("group", "single"), default="group")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--drop-path-rate", type=float, default=0.1)
    parser.add_argument("--mixup", type=float, default=0.8, help="MixUp alpha (0 disables).")
    parser.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0 disables).")
    parser.add_argument("--no-randaugment", dest="randaugment", action="store_false")
    parser.add_argument("--random-erasing", type=float, default=0.25, help="RandomErasing probability.")
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the weights (use_ema).")
    parser.add_argument("--ema-momentum", type=float, default=0.9999)
    return parser


def evaluate_parser(prog="keras-convnext evaluate", backend_flag=True):
    """Flags of `keras_convnext.workflows.evaluate`."""
    parser = _parser(prog, "Evaluate a saved classifier: top-1/top-5, confusion matrix, training curves.",
                     backend_flag)
    parser.add_argument("--model-path", required=True, help="a .keras model saved by train/finetune.")
    _common(parser)
    parser.add_argument("--history", help="history.json written by train/finetune, to plot.")
    parser.add_argument("--output-dir", default=None, help="where confusion_matrix.csv and the plot go.")
    return parser


def pretrain_parser(prog="keras-convnext fcmae-pretrain", backend_flag=True):
    """Flags of `keras_convnext.workflows.pretrain_fcmae`."""
    parser = _parser(prog, "Pre-train a ConvNeXt V2 encoder with FCMAE and draw its reconstructions.",
                     backend_flag)
    parser.add_argument("--model", default="ConvNeXtV2Atto", help="ConvNeXt V2 constructor name")
    parser.add_argument("--depths", type=_four_ints, help="custom stage depths 'a,b,c,d' (overrides --model's).")
    parser.add_argument("--dims", type=_four_ints, help="custom stage widths 'a,b,c,d' (overrides --model's).")
    parser.add_argument("--epochs", type=_positive_int, default=10)
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--steps-per-epoch", type=_positive_int, default=None)
    parser.add_argument("--data", default="digits",
                        help="digits | photos | tfds:<dataset name> (for example tfds:tf_flowers)")
    parser.add_argument("--image-size", type=_positive_int, default=64, help="pixels, a multiple of 32")
    parser.add_argument("--num-images", type=_positive_int, default=512)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--decoder-dim", type=_positive_int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--norm-pix-loss", action="store_true")
    parser.add_argument("--samples", type=_positive_int, default=4, help="rows of the reconstruction grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", "--output", dest="output_dir", default="fcmae_output",
                        help="where the figures, history and encoder weights go.")
    parser.add_argument("--quiet", dest="verbose", action="store_false", help="no progress output.")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="keep freed memory in the process (glibc): faster training steps on JAX and "
                             "PyTorch, at the cost of holding the peak memory (docs/workflows.md).")
    return parser


def options(args):
    """The parsed flags as the workflow's keyword arguments.

    `--backend` is the process's, not the workflow's: it must name the
    backend Keras runs on (a script sets it before importing Keras).
    """
    backend = getattr(args, "backend", None)
    if backend and "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise SystemExit(
                f"Keras runs on {keras.backend.backend()} in this process; it reads its backend once, when "
                f"imported. Run in a new process with KERAS_BACKEND={backend} (or keras-convnext --backend {backend})."
            )
    return {key: value for key, value in vars(args).items() if key != "backend"}
