"""The `keras-convnext` command line (the console script runs `keras_convnext.cli.main`).

    keras-convnext predict cat.jpg dog.png --model ConvNeXtV2Tiny --weights convnextv2_tiny.pt
    keras-convnext export --model ConvNeXtV2Atto --weights w.pt --format onnx --format tflite -o out/
    keras-convnext convert ...          (keras_convnext.convert)
    keras-convnext benchmark ...        (keras_convnext.benchmark)
    keras-convnext train ...            (keras_convnext.workflows.train)
    keras-convnext finetune ...         (keras_convnext.workflows.finetune)
    keras-convnext evaluate ...         (keras_convnext.workflows.evaluate)
    keras-convnext fcmae-pretrain ...   (keras_convnext.workflows.pretrain_fcmae)

Every command takes `--help`. `--backend` (before or after the command)
picks the Keras backend; the package sets it before Keras is imported
(`keras_convnext._startup`). Exit status: 0 on success, 2 for a usage
error, 1 for a failure, each error one line on stderr.
"""

import argparse
import os
import sys

from keras_convnext._startup import BACKENDS, backend_argument

PROG = "keras-convnext"


class UsageError(Exception):
    """The command line was wrong (exit status 2)."""


class CommandFailed(Exception):
    """The command could not do its work (exit status 1)."""


def _check_backend(backend):
    """Sets `--backend` for Keras, or fails when Keras already runs on another backend."""
    if backend is None:
        return
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = backend
        return
    import keras

    if keras.backend.backend() != backend:
        raise CommandFailed(
            f"Keras already runs on {keras.backend.backend()} in this process; run "
            f"`{PROG} --backend {backend} ...` as its own process."
        )


# ---------------------------------------------------------------- predict and export


def _add_model_arguments(parser):
    parser.add_argument("--model", default="ConvNeXtV2Atto", help="constructor name, e.g. ConvNeXtV2Tiny.")
    parser.add_argument("--weights", default="imagenet",
                        help="checkpoint file (official, timm, HF, .weights.h5), registry tag (default: "
                             "imagenet), or 'none' for random weights.")
    parser.add_argument("--model-path", help="a saved .keras model instead of --model/--weights.")
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels (default 224).")
    parser.add_argument("--backend", choices=BACKENDS, help="Keras backend.")


def _build_model(args):
    import keras

    import keras_convnext

    if args.model_path:
        if not os.path.isfile(args.model_path):
            raise FileNotFoundError(f"--model-path {args.model_path!r} does not exist.")
        return keras.saving.load_model(args.model_path, safe_mode=True, compile=False)
    if args.model not in keras_convnext.CONSTRUCTORS:
        raise UsageError(f"--model {args.model!r} is unknown; choose one of {', '.join(keras_convnext.CONSTRUCTORS)}.")
    weights = None if args.weights in (None, "", "none") else args.weights
    return keras_convnext.CONSTRUCTORS[args.model](input_shape=(args.image_size, args.image_size, 3), weights=weights)


def run_predict(argv):
    parser = argparse.ArgumentParser(prog=f"{PROG} predict", description="Top-5 ImageNet classes of images.")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    _add_model_arguments(parser)
    parser.add_argument("--top", type=int, default=5, help="classes per image (default 5).")
    args = parser.parse_args(argv)
    _check_backend(args.backend)
    from keras_convnext._deps import require
    from keras_convnext.workflows.prediction import predict_images

    require("PIL", "reading images")
    model = _build_model(args)
    # A progress bar only on a terminal: piped output stays one line per result.
    for path, best in predict_images(model, args.images, top=args.top, verbose=sys.stdout.isatty()):
        print(path)
        for rank, (_, name, score) in enumerate(best, 1):
            print(f"  {rank}. {name:30s} {score:.4f}")
    return 0


def _require_exporters(formats, verify):
    from keras_convnext._deps import require

    require("tensorflow", "exporting (every format is written by TensorFlow)")
    if "onnx" in formats:
        require("tf2onnx", "exporting to ONNX")
        require("onnx", "exporting to ONNX")
        if verify:
            require("onnxruntime", "verifying the ONNX export")
    if verify:
        require("skimage", "verifying the export on sample photographs")


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _calibration_images(path, count, image_size):
    """Up to `count` float32 images from a folder of image files or a `.npy` array `(n, h, w, 3)`."""
    import numpy as np

    if os.path.isdir(path):
        from keras_convnext._deps import require
        from keras_convnext.workflows.prediction import load_image

        require("PIL", "reading calibration images")
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(_IMAGE_SUFFIXES))[:count]
        if not names:
            raise UsageError(f"--calibration-images {path!r} holds no image files ({', '.join(_IMAGE_SUFFIXES)}).")
        return np.stack([load_image(os.path.join(path, name), image_size) for name in names])
    if path.endswith(".npy") and os.path.isfile(path):
        try:
            images = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise UsageError(f"--calibration-images {path!r} is not a plain array file: {error}") from None
        if images.ndim != 4:
            raise UsageError(f"--calibration-images {path!r} must hold images (n, height, width, channels); "
                             f"it holds shape {images.shape}.")
        return images[:count].astype("float32")
    raise UsageError(f"--calibration-images {path!r} must be a folder of images or a .npy file of them.")


def run_export(argv):
    from keras_convnext.export import _SUFFIX, ALL_FORMATS, FORMATS, FULL_INTEGER

    parser = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description="Export a model to SavedModel / TFLite / ONNX and verify each artifact on real images.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--format", action="append", choices=ALL_FORMATS,
                        help=f"repeatable; default: every format but {FULL_INTEGER}.")
    parser.add_argument("-o", "--output", required=True,
                        help="output directory (artifacts named model, model.tflite, model.onnx, ...).")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against the Keras model.")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing artifacts (once the new ones are written and verified).")
    parser.add_argument("--calibration-images", metavar="PATH",
                        help=f"for {FULL_INTEGER}: a folder of your training images, or a .npy array of them "
                             "(n, height, width, 3) in [0, 255].")
    parser.add_argument("--calibration-count", type=int, default=100,
                        help="calibration images to use (default 100).")
    parser.add_argument("--min-agreement", type=float, default=1.0, metavar="FRACTION",
                        help="top-1 agreement with the Keras model that quantized formats need (default 1.0).")
    args = parser.parse_args(argv)
    _check_backend(args.backend)
    formats = args.format or list(FORMATS)
    if FULL_INTEGER in formats and not args.calibration_images:
        raise UsageError(f"--format {FULL_INTEGER} needs --calibration-images: a folder of about 100 of your "
                         "training images (or a .npy array of them).")
    if args.calibration_count < 1:
        raise UsageError(f"--calibration-count must be at least 1; got {args.calibration_count}.")
    _require_exporters(formats, not args.no_verify)
    from keras_convnext.export import export_formats

    model = _build_model(args)
    calibration = None
    if FULL_INTEGER in formats:
        size = model.input_shape[1] or args.image_size
        calibration = _calibration_images(args.calibration_images, args.calibration_count, size)
    targets = {f: os.path.join(args.output, "model" + _SUFFIX[f]) for f in formats}
    print(f"Exporting {model.name} to {', '.join(formats)} ...")
    reports = export_formats(
        model, targets, verify_artifacts=not args.no_verify, min_top1_agreement=args.min_agreement, verbose=False,
        overwrite=args.overwrite, calibration_images=calibration,
    )
    for report in reports.values():
        print(report)
    return 0


# ---------------------------------------------------------------- the other commands


def run_convert(argv):
    from keras_convnext import convert

    return convert.main(argv)


def run_benchmark(argv):
    from keras_convnext.benchmark import throughput

    args = throughput.build_parser().parse_args(argv)
    _check_backend(args.backend)
    if args.reference:
        from keras_convnext._deps import require

        require("torch", "the benchmark's PyTorch reference (or pass --no-reference)")
        require("transformers", "the benchmark's PyTorch reference (or pass --no-reference)")
    # Each implementation runs in its own process, started by the benchmark.
    return throughput.main(argv)


def _workflow_command(parser_name, workflow_name):
    def run(argv):
        from keras_convnext.workflows import arguments

        args = getattr(arguments, parser_name)().parse_args(argv)
        _check_backend(args.backend)
        from keras_convnext import workflows

        getattr(workflows, workflow_name)(**arguments.options(args))
        return 0

    return run


COMMANDS = {
    "predict": (run_predict, "top-5 ImageNet classes of images"),
    "export": (run_export, "SavedModel / TFLite / ONNX export with verification"),
    "convert": (run_convert, "convert checkpoints to .weights.h5 and .keras"),
    "benchmark": (run_benchmark, "throughput per backend against the PyTorch reference"),
    "train": (_workflow_command("train_parser", "train"), "train and evaluate a classifier with fit"),
    "finetune": (_workflow_command("finetune_parser", "finetune"),
                 "fine-tune with the official ConvNeXt V2 recipe"),
    "evaluate": (_workflow_command("evaluate_parser", "evaluate"),
                 "top-1/top-5, confusion matrix and curves of a saved model"),
    "fcmae-pretrain": (_workflow_command("pretrain_parser", "pretrain_fcmae"),
                       "FCMAE masked-autoencoder pre-training"),
}


def _top_level_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="ConvNeXt V1/V2 for Keras 3: predict, export, convert, train, benchmark.",
        epilog="`keras-convnext COMMAND --help` describes a command. Exit status: 0 success, 2 usage error, "
               "1 failure.",
    )
    parser.add_argument("--backend", choices=BACKENDS, help="Keras backend for the command.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _pop_leading_backend(argv):
    """`(backend, rest)`: a `--backend X` / `--backend=X` before the command, removed from `argv`."""
    if argv and argv[0] == "--backend":
        if len(argv) < 2:
            raise UsageError("--backend needs a value: one of " + ", ".join(BACKENDS) + ".")
        return argv[1], argv[2:]
    if argv and argv[0].startswith("--backend="):
        return argv[0].split("=", 1)[1], argv[1:]
    return None, argv


def _expected_errors():
    """Errors that are the user's situation, not a bug: reported in one line, exit status 1."""
    from keras_convnext._deps import MissingDependencyError
    from keras_convnext.weights import CheckpointError

    return (CommandFailed, MissingDependencyError, CheckpointError, OSError, ValueError)


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def main(argv=None):
    """Entry point of the `keras-convnext` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    try:
        backend, argv = _pop_leading_backend(argv)
        _check_backend(backend)
        if not argv:
            _top_level_parser().print_help(sys.stderr)
            return 2
        if argv[0] in ("-h", "--help"):
            _top_level_parser().print_help()
            return 0
        command, rest = argv[0], argv[1:]
        if command not in COMMANDS:
            raise UsageError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}.")
        _check_backend(backend_argument(rest))
        return COMMANDS[command][0](rest)
    except SystemExit:  # argparse's own exits (--help, usage errors), before the list below is imported
        raise
    except UsageError as error:
        print(f"{PROG}{' ' + command if command else ''}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as error:  # an optional package that no require() named in advance
        from keras_convnext._deps import install_command

        module = (error.name or "").split(".")[0]
        if not module or module == "keras_convnext":
            raise
        print(f"{PROG}{' ' + command if command else ''}: error: this needs the Python package {module!r}, "
              f"which is not installed; install it with: {install_command(module)}", file=sys.stderr)
        return 1
    except _expected_errors() as error:
        print(f"{PROG}{' ' + command if command else ''}: error: {_one_line(error)}", file=sys.stderr)
        return 1

