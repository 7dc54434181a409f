"""Train and evaluate a ConvNeXt classifier with `fit` on any Keras backend.

    python examples/fit_evaluate.py --backend jax --data digits --epochs 10
    python examples/fit_evaluate.py --backend tensorflow --data tf_flowers --model ConvNeXtV2Atto
    python examples/fit_evaluate.py --data path/to/images  # one folder per class
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python examples/fit_evaluate.py --backend jax --data digits --distribute

`--distribute` trains data-parallel on every local device:
`keras.distribution.DataParallel` on JAX, `tf.distribute.MirroredStrategy`
on TensorFlow (PyTorch: not supported by Keras' trainer; run without it).
Writes `model.keras`, `history.json`, `confusion_matrix.csv` and
`training_curves.png` to `--output-dir`.
"""

import contextlib
import os
import sys

if __name__ == "__main__":  # the backend must be chosen before keras is imported
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import select_backend

    select_backend(sys.argv[1:])

from common import base_parser, build_classifier, fit_and_save, parse
from evaluate import evaluate_classifier


def distribution_scope(enabled):
    """Context for building and compiling the model: data-parallel over local devices if enabled.

    Returns `(scope, replicas)`.
    """
    import keras

    if not enabled:
        return contextlib.nullcontext(), 1
    backend = keras.backend.backend()
    if backend == "jax":
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return contextlib.nullcontext(), len(devices)
    if backend == "tensorflow":
        import tensorflow as tf

        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        strategy = tf.distribute.MirroredStrategy(devices)
        return strategy.scope(), strategy.num_replicas_in_sync
    raise SystemExit(
        f"--distribute is supported on the jax and tensorflow backends; got {backend}. "
        "Run without --distribute."
    )


def main(argv=None):
    """Runs the example; returns a dict with `model`, `history` (dict of lists), `evaluation`, `replicas`."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--weights", help="start from a checkpoint file or registry tag (new head).")
    parser.add_argument("--distribute", action="store_true", help="data-parallel over all local devices.")
    parser.add_argument("--no-evaluation", action="store_true",
                        help="skip the confusion matrix and plots (training and validation loss only).")
    args = parse(parser, argv)

    import keras

    from keras_convnext import data

    keras.utils.set_random_seed(args.seed)
    scope, replicas = distribution_scope(args.distribute)
    if args.batch_size % replicas:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {replicas} devices.")
    datasets = data.load_dataset(args.data, args.image_size, args.batch_size, args.seed, limit=args.limit)
    with scope:
        model = build_classifier(args, datasets.num_classes, weights=args.weights)
        model.compile(
            optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=args.weight_decay),
            loss=keras.losses.CategoricalCrossentropy(),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
    history = fit_and_save(model, datasets, args)
    evaluation = None
    if not args.no_evaluation:
        evaluation = evaluate_classifier(
            model, datasets.validation, datasets.class_names, args.output_dir, history, verbose=not args.quiet
        )
    return {"model": model, "history": history, "evaluation": evaluation, "replicas": replicas}


if __name__ == "__main__":
    main()
