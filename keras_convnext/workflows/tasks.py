"""What the detection and segmentation workflows share: the encoder, the optimizer, fitting, tfds, flags."""

import argparse
import os
import time

from keras_convnext._deps import require
from keras_convnext.workflows.arguments import BACKENDS, _four_ints, _positive_int
from keras_convnext.workflows.common import write_json  # noqa: F401  (the workflows' JSON writer)

SHUFFLE_BUFFER = 1024


def build_encoder(model_name, image_size, weights=None, depths=None, dims=None):
    """A ConvNeXt without its classifier, the image encoder of a detector or segmenter.

    Args:
        model_name: a keras_convnext constructor name, e.g. "ConvNeXtV2Atto".
        image_size: square input side in pixels; images are `(batch,
            image_size, image_size, 3)` with pixels in [0, 255].
        weights: None (random initialization), a checkpoint file (official,
            timm, HF or Keras naming) or a registry tag such as "imagenet".
        depths, dims: optional four stage depths / widths replacing the
            variant's (then `weights` must be a file or None).
    """
    import keras_convnext

    if model_name not in keras_convnext.CONSTRUCTORS:
        raise ValueError(
            f"model {model_name!r} is not a keras_convnext model; choose one of "
            f"{', '.join(keras_convnext.CONSTRUCTORS)}."
        )
    common = dict(include_top=False, input_shape=(image_size, image_size, 3), weights=weights)
    if not (depths or dims):
        return keras_convnext.CONSTRUCTORS[model_name](**common)
    if weights and not os.path.exists(weights):
        raise ValueError("with custom depths/dims, weights must be a checkpoint file.")
    variant = keras_convnext.VARIANTS[model_name]
    return keras_convnext.ConvNeXt(
        tuple(depths or variant.stage_depths), tuple(dims or variant.stage_dims),
        version=variant.version, name="custom_" + variant.version, **common,
    )


def compile_for_fine_tuning(task_model, learning_rate, weight_decay, total_steps, **compile_kwargs):
    """Compiles with AdamW: a linear warm-up over the first tenth of `total_steps`, then cosine decay to 0.

    Gradients are clipped to a global norm of 5, which keeps the first steps
    of a randomly initialized head from wrecking a pretrained encoder.
    """
    import keras

    warmup_steps = max(1, total_steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, total_steps - warmup_steps),
        warmup_target=learning_rate, warmup_steps=warmup_steps,
    )
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay, global_clipnorm=5.0)
    task_model.compile(optimizer=optimizer, **compile_kwargs)


def steps_per_epoch(train):
    """Batches in one pass over the `train` pipeline, or raises if tf.data cannot tell."""
    steps = int(train.cardinality())
    if steps < 1:
        raise ValueError(
            "the training data has fewer examples than one batch (or an unknown number); "
            "use more training images or a smaller batch size."
        )
    return steps


def fit(task_model, train, epochs, verbose=True):
    """Fits on the `train` pipeline; returns `({metric: [float per epoch]}, seconds)`."""
    start = time.perf_counter()
    # The pipeline shuffles itself (`batches`); Keras cannot shuffle a tf.data.Dataset.
    history = task_model.fit(train, epochs=epochs, shuffle=False, verbose="auto" if verbose else 0).history
    seconds = time.perf_counter() - start
    return {key: [float(value) for value in values] for key, values in history.items()}, seconds


def save_keras_file(task_model, output_dir):
    """Writes `task_model` to `output_dir/model.keras` (a temporary file, then a rename); returns the path."""
    path = os.path.join(output_dir, "model.keras")
    task_model.save(path + ".partial.keras")
    os.replace(path + ".partial.keras", path)
    return path


def tensorflow():
    # tf.data feeds `fit` on every backend, so the pipelines need TensorFlow even on JAX and PyTorch.
    return require("tensorflow", "the tf.data input pipelines of detection and segmentation")


def load_tfds_splits(name, train_split, held_out_split, train_count=None, held_out_count=None, data_dir=None):
    """Two splits of a tensorflow-datasets set as dict-example `tf.data` pipelines, plus its info.

    Under `tfds.testing.mock_data` this reads generated examples and
    nothing is downloaded. Counts cap the examples taken from each split.
    """
    tensorflow()
    tfds = require("tensorflow_datasets", f"the tensorflow-datasets set {name!r}")
    (train, held_out), info = tfds.load(
        name, split=[train_split, held_out_split], with_info=True, data_dir=data_dir, shuffle_files=False,
    )
    if train_count:
        train = train.take(train_count)
    if held_out_count:
        held_out = held_out.take(held_out_count)
    return train, held_out, info


def batches(dataset, batch_size, seed):
    """Shuffled, batched (last partial batch dropped) and prefetched training batches."""
    tf = tensorflow()
    dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _digit_list(text):
    try:
        digits = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated digits such as 0,1; got {text!r}") from None
    if not digits or min(digits) < 0 or max(digits) > 9:
        raise argparse.ArgumentTypeError(f"expected digits from 0 to 9 such as 0,1; got {text!r}")
    return digits


def task_parser(prog, description, data_choices, default_output_dir):
    """Flags of a detection or segmentation example; destinations are the workflow's keyword arguments."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--backend", choices=BACKENDS,
                        help="Keras backend (default: KERAS_BACKEND, else Keras' configured one).")
    parser.add_argument("--data", default=data_choices[0], choices=data_choices,
                        help=f"'{data_choices[0]}' (offline, scanned digits on canvases) or a "
                             "tensorflow-datasets set you have or can download.")
    parser.add_argument("--model", default="ConvNeXtV2Atto",
                        help="a keras_convnext constructor name, e.g. ConvNeXtV2Atto or ConvNeXtV2Femto.")
    parser.add_argument("--depths", type=_four_ints, help="custom stage depths 'a,b,c,d' (overrides --model's).")
    parser.add_argument("--dims", type=_four_ints, help="custom stage widths 'a,b,c,d' (overrides --model's).")
    parser.add_argument("--weights", default=None,
                        help="pretrained encoder: a checkpoint file or a registry tag such as 'imagenet'.")
    parser.add_argument("--digits", type=_digit_list, default=None,
                        help=f"for {data_choices[0]}: the digits drawn, e.g. '0,1' (default: all ten).")
    parser.add_argument("--image-size", type=_positive_int, default=128, help="square input side in pixels.")
    parser.add_argument("--train-count", type=_positive_int, default=2000, help="training images.")
    parser.add_argument("--held-out-count", type=_positive_int, default=400, help="held-out images scored.")
    parser.add_argument("--epochs", type=_positive_int, default=5)
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak AdamW learning rate.")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=default_output_dir,
                        help="where the model, metrics.json and the prediction plot go.")
    parser.add_argument("--quiet", dest="verbose", action="store_false", help="no progress bars.")
    return parser


def options(args):
    """The parsed flags as the workflow's keyword arguments (without `--backend`)."""
    values = vars(args).copy()
    values.pop("backend", None)
    return values
