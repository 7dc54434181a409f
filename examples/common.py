"""Command-line pieces shared by the examples: backend choice, flags, model building."""

import argparse
import os
import socket
import sys

BACKENDS = ("tensorflow", "jax", "torch")


def select_backend(argv):
    """Sets KERAS_BACKEND from `--backend` before keras is imported.

    Keras reads the backend once, at import; when it is already imported (the
    examples called as functions) a different `--backend` is an error.
    """
    backend = None
    for index, arg in enumerate(argv):
        if arg == "--backend" and index + 1 < len(argv):
            backend = argv[index + 1]
        elif arg.startswith("--backend="):
            backend = arg.split("=", 1)[1]
    if backend is None:
        return
    if backend not in BACKENDS:
        raise SystemExit(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise SystemExit(
                f"Keras is already running on {keras.backend.backend()!r}; the backend is chosen at "
                f"import, so run this example in a new process with --backend {backend}."
            )
        return
    os.environ["KERAS_BACKEND"] = backend


def network_available(host="storage.googleapis.com", port=443, timeout=2.0):
    """True when the tensorflow-datasets download host answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_data(name):
    """`auto` means tf_flowers with a network (or a local copy), else the offline digits."""
    if name != "auto":
        return name
    tfds_home = os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    if os.path.isdir(os.path.join(tfds_home, "tf_flowers")) or network_available():
        return "tf_flowers"
    print("No network and no local tf_flowers: using the offline scikit-learn digits.")
    return "digits"


def _ints(text):
    return tuple(int(part) for part in text.split(","))


def base_parser(description):
    """The flags every example takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backend", choices=BACKENDS, help="Keras backend (default: KERAS_BACKEND or tensorflow).")
    parser.add_argument("--model", default="ConvNeXtV2Atto",
                        help="a keras_convnext constructor name, e.g. ConvNeXtV2Atto or ConvNeXtTiny.")
    parser.add_argument("--depths", type=_ints, help="custom stage depths 'a,b,c,d' (overrides --model's).")
    parser.add_argument("--dims", type=_ints, help="custom stage widths 'a,b,c,d' (overrides --model's).")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default="auto",
                        help="'digits' (offline), tf_flowers, imagenette, cifar10, or an image folder; "
                             "'auto': tf_flowers when online, else digits.")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input side in pixels (default 224; 32 for digits).")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many examples per split.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="convnext_run", help="where the model, history and plots go.")
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bars.")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="keep freed memory in the process (glibc): faster training steps on JAX and "
                             "PyTorch, at the cost of holding the peak memory (docs/workflows.md).")
    return parser


def parse(parser, argv):
    args = parser.parse_args(argv)
    if args.reuse_freed_memory:
        import keras_convnext

        keras_convnext.reuse_freed_memory()  # before any model is built
    args.data = resolve_data(args.data)
    if args.image_size is None:
        args.image_size = 32 if args.data == "digits" else 224
    return args


def build_classifier(args, num_classes, weights=None, drop_path_rate=0.0):
    """The `--model` classifier (or a custom `--depths/--dims` one) for `num_classes`."""
    import keras_convnext

    if args.model not in keras_convnext.CONSTRUCTORS:
        raise SystemExit(
            f"--model {args.model!r} is not a keras_convnext model; choose one of "
            f"{', '.join(keras_convnext.CONSTRUCTORS)}."
        )
    variant = keras_convnext.VARIANTS[args.model]
    common = dict(
        input_shape=(args.image_size, args.image_size, 3),
        classes=num_classes,
        drop_path_rate=drop_path_rate,
    )
    if args.depths or args.dims:
        if weights and not os.path.exists(weights):
            raise SystemExit("With custom --depths/--dims, --weights must be a checkpoint file.")
        model = keras_convnext.ConvNeXt(
            args.depths or variant.stage_depths, args.dims or variant.stage_dims,
            version=variant.version, name="custom_" + variant.version, **common,
        )
    else:
        model = keras_convnext.CONSTRUCTORS[args.model](**common)
    if weights:
        load_pretrained_body(model, weights, args.model)
    return model


def load_pretrained_body(model, weights, model_name):
    """Loads every pretrained weight except the classifier, which stays freshly initialized.

    `weights` is a checkpoint file (official, timm or HF naming) or a
    registry tag of keras_convnext (e.g. "imagenet" where registered).
    """
    import keras_convnext

    if os.path.exists(weights):
        keras_convnext.load_weights(model, weights, fresh_head=True)
        return
    pretrained = keras_convnext.CONSTRUCTORS[model_name](input_shape=model.input_shape[1:], weights=weights)
    source = {v.path: v for v in pretrained.weights}
    for variable in model.weights:
        if not variable.path.startswith("predictions/"):
            variable.assign(source[variable.path])


def fit_and_save(model, datasets, args):
    """Fits on `datasets` and writes `model.keras` and `history.json` into `--output-dir`.

    Each file is written under a temporary name and then renamed, so an
    interrupted run never leaves a half-written one. Returns the history as
    `{metric: [float per epoch]}`.
    """
    import json

    history = model.fit(
        datasets.train, validation_data=datasets.validation, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, verbose=0 if args.quiet else "auto",
    ).history
    history = {key: [float(v) for v in values] for key, values in history.items()}
    os.makedirs(args.output_dir, exist_ok=True)
    model_path = os.path.join(args.output_dir, "model.keras")
    model.save(model_path + ".partial.keras")
    os.replace(model_path + ".partial.keras", model_path)
    history_path = os.path.join(args.output_dir, "history.json")
    with open(history_path + ".partial", "w") as f:
        json.dump(history, f, indent=1)
    os.replace(history_path + ".partial", history_path)
    return history
