"""The `keras-convnext` command line.

    keras-convnext predict cat.jpg dog.png --model ConvNeXtV2Tiny --weights convnextv2_tiny.pt
    keras-convnext export --model ConvNeXtV2Atto --weights w.pt --format onnx --format tflite -o out/
    keras-convnext convert ...          (keras_convnext.convert)
    keras-convnext benchmark ...        (benchmarks/run.py)
    keras-convnext train ...            (examples/fit_evaluate.py)
    keras-convnext finetune ...         (examples/finetune.py)
    keras-convnext evaluate ...         (examples/evaluate.py)
    keras-convnext fcmae-pretrain ...   (examples/fcmae_pretrain.py)

Every command takes `--help`. `--backend` (before or after the command)
picks the Keras backend; Keras is imported only after it is set.
"""

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys

BACKENDS = ("tensorflow", "jax", "torch")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Commands handed to a script's own `main(argv)`, with all their arguments.
PASS_THROUGH = {
    "train": ("examples/fit_evaluate.py", "train and evaluate a classifier with fit (examples/fit_evaluate.py)"),
    "finetune": ("examples/finetune.py", "fine-tune with the official ConvNeXt V2 recipe (examples/finetune.py)"),
    "evaluate": ("examples/evaluate.py", "top-1/top-5, confusion matrix and curves of a saved model"),
    "fcmae-pretrain": ("examples/fcmae_pretrain.py", "FCMAE masked-autoencoder pre-training (examples/fcmae_pretrain.py)"),
}


class CommandError(SystemExit):
    """A user-facing error: printed without a traceback, exit code 2."""

    def __init__(self, message):
        super().__init__(f"keras-convnext: error: {message}")


def _set_backend(backend):
    if backend is None:
        return
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise CommandError(
                f"Keras already runs on {keras.backend.backend()}; start a new process for --backend {backend}."
            )
        return
    os.environ["KERAS_BACKEND"] = backend


def _pop_backend(argv):
    """Removes a leading `--backend X` / `--backend=X` (before the command) and returns it."""
    argv = list(argv)
    if argv and argv[0] == "--backend" and len(argv) > 1:
        return argv[1], argv[2:]
    if argv and argv[0].startswith("--backend="):
        return argv[0].split("=", 1)[1], argv[1:]
    return None, argv


def _load_script(relative_path, command):
    path = os.path.join(REPOSITORY, relative_path)
    if not os.path.exists(path):
        raise CommandError(
            f"'{command}' runs {relative_path}, which is not in {REPOSITORY}. It ships with the "
            "keras_convnext source repository; run from a source checkout (pip install -e .)."
        )
    examples = os.path.dirname(path)
    if examples not in sys.path:
        sys.path.insert(0, examples)  # the examples import their shared helpers
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        raise CommandError(f"{relative_path} has no main(argv) function.")
    return module


def run_pass_through(command, argv):
    """Runs an example's `main(argv)`; the example's own flags (and `--help`) apply."""
    relative_path = PASS_THROUGH[command][0]
    for index, arg in enumerate(argv):
        if arg == "--backend" and index + 1 < len(argv):
            _set_backend(argv[index + 1])
        elif arg.startswith("--backend="):
            _set_backend(arg.split("=", 1)[1])
    return _load_script(relative_path, command).main(argv)


def run_convert(argv):
    try:
        convert = importlib.import_module("keras_convnext.convert")
    except ModuleNotFoundError as error:
        if error.name != "keras_convnext.convert":
            raise
        raise CommandError(
            "'convert' needs keras_convnext.convert, which this installation does not have. "
            "Install a keras_convnext version with the checkpoint converter."
        ) from None
    return convert.main(argv)


def run_benchmark(argv):
    script = os.path.join(REPOSITORY, "benchmarks", "run.py")
    if not os.path.exists(script):
        raise CommandError(
            f"'benchmark' runs benchmarks/run.py, which is not in {REPOSITORY}; it ships with "
            "the source repository (pip install -e . from a checkout)."
        )
    # Its own process: the benchmark starts one process per backend itself.
    return subprocess.call([sys.executable, script, *argv])


# ---------------------------------------------------------------- predict and export


def _add_model_arguments(parser):
    parser.add_argument("--model", default="ConvNeXtV2Atto", help="constructor name, e.g. ConvNeXtV2Tiny.")
    parser.add_argument("--weights", default="imagenet",
                        help="checkpoint file (official, timm, HF, .weights.h5) or registry tag (default: imagenet).")
    parser.add_argument("--model-path", help="a saved .keras model instead of --model/--weights.")
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels (default 224).")
    parser.add_argument("--backend", choices=BACKENDS, help="Keras backend.")


def _build_model(args):
    import keras

    import keras_convnext

    if args.model_path:
        if not os.path.exists(args.model_path):
            raise CommandError(f"--model-path {args.model_path!r} does not exist.")
        return keras.saving.load_model(args.model_path, safe_mode=True, compile=False)
    if args.model not in keras_convnext.CONSTRUCTORS:
        raise CommandError(
            f"--model {args.model!r} is unknown; choose one of {', '.join(keras_convnext.CONSTRUCTORS)}."
        )
    weights = None if args.weights in (None, "", "none") else args.weights
    try:
        return keras_convnext.CONSTRUCTORS[args.model](
            input_shape=(args.image_size, args.image_size, 3), weights=weights
        )
    except (ValueError, keras_convnext.CheckpointError, FileNotFoundError) as error:
        raise CommandError(str(error)) from None


def load_image(path, image_size, crop_fraction=0.875):
    """An RGB image as float32 `(image_size, image_size, 3)` pixels in [0, 255].

    Resizes the short side to `image_size / crop_fraction` and crops the
    centre, as the official evaluation does.
    """
    from PIL import Image

    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot read image {path!r}: {error}") from None
    scale = image_size / crop_fraction / min(image.size)
    resized = image.resize((max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))),
                           Image.BICUBIC)
    left = (resized.width - image_size) // 2
    top = (resized.height - image_size) // 2
    import numpy as np

    return np.asarray(resized.crop((left, top, left + image_size, top + image_size)), dtype="float32")


def run_predict(argv):
    parser = argparse.ArgumentParser(prog="keras-convnext predict", description="Top-5 ImageNet classes of images.")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    _add_model_arguments(parser)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    _set_backend(args.backend)
    import keras
    import numpy as np

    import keras_convnext

    model = _build_model(args)
    size = model.input_shape[1] or args.image_size
    progress = keras.utils.Progbar(len(args.images), unit_name="image", verbose=1 if len(args.images) > 1 else 0)
    results = []
    for index, path in enumerate(args.images):
        image = load_image(path, size)
        scores = np.asarray(model.predict(image[None], verbose=0))
        if scores.shape[-1] == 1000:
            top = keras_convnext.decode_predictions(scores, top=args.top)[0]
        else:
            best = np.argsort(scores[0])[::-1][: args.top]
            top = [(str(i), f"class {i}", float(scores[0, i])) for i in best]
        results.append((path, top))
        progress.update(index + 1)
    for path, top in results:
        print(path)
        for rank, (_, name, score) in enumerate(top, 1):
            print(f"  {rank}. {name:30s} {score:.4f}")
    return results


def run_export(argv):
    from keras_convnext.export import FORMATS

    parser = argparse.ArgumentParser(
        prog="keras-convnext export",
        description="Export a model to SavedModel / TFLite / ONNX and verify each artifact on real images.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--format", action="append", choices=FORMATS,
                        help="repeatable; default: every format.")
    parser.add_argument("-o", "--output", required=True,
                        help="output directory (artifacts named model, model.tflite, model.onnx, ...).")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against the Keras model.")
    args = parser.parse_args(argv)
    _set_backend(args.backend)
    import keras

    from keras_convnext.export import _SUFFIX, export_formats

    formats = args.format or list(FORMATS)
    model = _build_model(args)
    targets = {f: os.path.join(args.output, "model" + _SUFFIX[f]) for f in formats}
    progress = keras.utils.Progbar(2, unit_name="stage")
    print(f"Exporting {model.name} to {', '.join(formats)} ...")
    progress.update(0)
    reports = export_formats(model, targets, verify_artifacts=not args.no_verify, verbose=False)
    progress.update(2)
    for report in reports.values():
        print(report)
    return reports


COMMANDS = {
    "predict": (run_predict, "top-5 ImageNet classes of images"),
    "export": (run_export, "SavedModel / TFLite / ONNX export with verification"),
    "convert": (run_convert, "convert checkpoints (keras_convnext.convert)"),
    "benchmark": (run_benchmark, "throughput per backend (benchmarks/run.py)"),
}


def _top_level_parser():
    parser = argparse.ArgumentParser(
        prog="keras-convnext", description="ConvNeXt V1/V2 for Keras 3: predict, export, train, convert.",
    )
    parser.add_argument("--backend", choices=BACKENDS, help="Keras backend for the command.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    for name, (_, help_text) in PASS_THROUGH.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None):
    """Entry point of the `keras-convnext` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    backend, argv = _pop_backend(argv)
    if backend is not None and backend not in BACKENDS:
        raise CommandError(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    _set_backend(backend)
    if not argv or argv[0] in ("-h", "--help"):
        _top_level_parser().print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in PASS_THROUGH:
        return run_pass_through(command, rest)
    if command in COMMANDS:
        return COMMANDS[command][0](rest)
    raise CommandError(f"unknown command {command!r}; see keras-convnext --help.")


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
