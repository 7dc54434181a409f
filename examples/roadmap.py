"""Train every step of the ResNet-50 -> ConvNeXt-T roadmap with one recipe, offline, and plot it.

    python examples/roadmap.py --backend jax --epochs 8 --seeds 0 1 --output-dir docs

Each step of Figure 2 of "A ConvNet for the 2020s" is trained from scratch on
scikit-learn's handwritten digits (1,438 training and 359 held-out images,
upscaled to `--image-size` pixels, gray to RGB), with the same recipe for
every step: AdamW, one epoch of warm-up then cosine decay, label smoothing 0.1, no
augmentation. `--width-divisor` divides every step's widths (stem, stages)
to fit a CPU; each step still makes its one change. Writes
`roadmap_digits.json` (per step: accuracy per seed, parameters, FLOPs) and
`roadmap_digits.png` (GFLOPs at 224x224 and held-out accuracy per step, next
to the paper's numbers) into `--output-dir`.
"""

import argparse
import os
import sys
import time



def select_backend(argv):
    """Sets KERAS_BACKEND from `--backend` before Keras is imported."""
    for index, argument in enumerate(argv):
        if argument.startswith("--backend="):
            os.environ["KERAS_BACKEND"] = argument.split("=", 1)[1]
        elif argument == "--backend" and index + 1 < len(argv):
            os.environ["KERAS_BACKEND"] = argv[index + 1]


if __name__ == "__main__":  # the backend must be chosen before keras is imported
    select_backend(sys.argv[1:])

import numpy as np

import keras

from keras_convnext import roadmap
from keras_convnext.data import digits_arrays
from keras_convnext.workflows.common import load_record, write_json


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"), help="Keras backend.")
    parser.add_argument("--steps", nargs="+", default=list(roadmap.STEP_NAMES), choices=roadmap.STEP_NAMES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8, help="BatchNorm steps need over 100 batches.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate.")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--image-size", type=int, default=32, help="pixels per side, at least 32.")
    parser.add_argument("--width-divisor", type=int, default=4, help="divides every step's widths.")
    parser.add_argument("--no-jit-compile", dest="jit_compile", action="store_false",
                        help="run the training step without XLA: on TensorFlow on a CPU, compiling each "
                        "network costs more than training it at this scale.")
    parser.add_argument("--train-images", type=int, default=None,
                        help="training images (default: all 1,438 of the training split).")
    parser.add_argument("--output-dir", default="docs")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.width_divisor < 1:
        parser.error("--epochs, --batch-size and --width-divisor must be positive integers.")
    if args.image_size < 32:
        parser.error(f"--image-size must be at least 32 (the networks downsample by 32); got {args.image_size}.")
    return args


def load_digits(image_size, train_images=None):
    """Train and held-out images, standardized, `(n, size, size, 3)`, and integer labels."""
    x_train, y_train, x_val, y_val = digits_arrays(image_size)
    x_train, x_val = x_train.astype("float32"), x_val.astype("float32")
    mean, std = x_train.mean(), x_train.std()
    x_train, y_train = x_train[:train_images], y_train[:train_images]
    return (x_train - mean) / std, y_train, (x_val - mean) / std, y_val


def compile_for(model, steps_per_epoch, args):
    """AdamW, one epoch of linear warm-up then cosine decay, label smoothing 0.1."""
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = steps_per_epoch if args.epochs > 1 else 0
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup_steps else args.learning_rate,
        decay_steps=total_steps - warmup_steps,
        warmup_target=args.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        metrics=["accuracy"],
        jit_compile="auto" if args.jit_compile else False,
    )


def train_seeds(step, seeds, data, args):
    """Trains `step` once per seed; yields `(seed, held-out accuracy, parameters, FLOPs)`.

    The seed sets the initial weights and the order of the batches. The
    first seed's model is compiled; later seeds load their own initial
    weights into it and start its optimizer afresh, which trains exactly as
    a new model would, without compiling the same network again (on a CPU,
    compiling costs more than training at this scale).
    """
    x_train, y_train, x_val, y_val = data
    # Whole batches only: a last, smaller batch would compile the training step again.
    whole = len(x_train) // args.batch_size * args.batch_size or len(x_train)
    x_train, one_hot = x_train[:whole], keras.utils.to_categorical(y_train[:whole], 10)
    width = roadmap.step_config(step).width // args.width_divisor
    trainer = None
    for seed in seeds:
        keras.utils.set_random_seed(seed)
        model = roadmap.build(step, classes=10, input_shape=x_train.shape[1:], width=width)
        if trainer is None:
            trainer = model
            compile_for(trainer, -(-len(x_train) // args.batch_size), args)
        else:
            trainer.set_weights(model.get_weights())
            for variable in trainer.optimizer.variables:  # step count and moments: a fresh AdamW
                if variable.name != "learning_rate":  # a constant rate is a variable too; keep it
                    variable.assign(np.zeros(variable.shape, variable.dtype))
        trainer.fit(x_train, one_hot, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0)
        logits = trainer.predict(x_val, batch_size=len(x_val), verbose=0)
        accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_val))
        yield seed, accuracy, roadmap.count_parameters(trainer), roadmap.count_flops(trainer)


def plot(results, path):
    """GFLOPs (224x224, full width) and held-out accuracy per step, beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in results]
    positions = np.arange(len(results))
    figure, (flops_axis, paper_axis, digits_axis) = plt.subplots(
        1, 3, figsize=(14, 5.5), sharey=True, gridspec_kw={"width_ratios": [1.2, 1, 1]}
    )
    flops_axis.barh(positions, [row["gflops_224"] for row in results], color="#8fb3d9", label="ours (paper rules)")
    flops_axis.plot([row["paper_gflops"] for row in results], positions, "k|", markersize=14, label="paper")
    flops_axis.set_xlabel("GFLOPs at 224x224 (multiply-accumulates)")
    flops_axis.set_yticks(positions, labels)
    flops_axis.invert_yaxis()
    flops_axis.legend(loc="lower right", fontsize=8)

    paper_axis.plot([row["paper_top1"] for row in results], positions, "ks-")
    paper_axis.set_xlabel("paper: ImageNet-1K top-1 (%)")

    accuracies = [100 * np.array(row["accuracies"]) for row in results]
    for position, values in zip(positions, accuracies):
        digits_axis.plot(values, [position] * len(values), ".", color="#c0504d", alpha=0.5)
    digits_axis.errorbar(
        [values.mean() for values in accuracies],
        positions,
        xerr=[values.std() for values in accuracies],
        fmt="o-",
        color="#c0504d",
    )
    digits_axis.set_xlabel(f"ours: digits held-out accuracy (%), {len(accuracies[0])} seeds")
    figure.tight_layout()
    temporary = f"{path}.partial.png"
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, path)


def summarize(record):
    """Per step with at least one run: its accuracies over the seeds, sizes and the paper's numbers."""
    results = []
    for step in roadmap.STEPS:
        runs = [run for run in record["runs"].values() if run["step"] == step.name]
        if not runs:
            continue
        accuracies = [run["accuracy"] for run in sorted(runs, key=lambda run: run["seed"])]
        results.append(
            {
                "step": step.name,
                "label": step.label,
                "accuracies": accuracies,
                "accuracy_mean": float(np.mean(accuracies)),
                "accuracy_std": float(np.std(accuracies)),
                "parameters": runs[0]["parameters"],
                "gflops": runs[0]["gflops"],
                "gflops_224": roadmap.count(step.name).flops / 1e9,
                "paper_gflops": step.paper_gflops,
                "paper_top1": step.paper_top1,
                "seconds": [run["seconds"] for run in runs],
            }
        )
    return results


def main(argv=None):
    """Runs the study; returns the per-step results it wrote.

    `roadmap_digits.json` is rewritten after every run, and a (step, seed)
    already in it with the same settings is not trained again: an
    interrupted study resumes where it stopped.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    data = load_digits(args.image_size, args.train_images)
    settings = {key: value for key, value in vars(args).items() if key not in ("output_dir", "steps", "seeds")}
    settings["backend"] = keras.backend.backend()
    settings["train_images"] = len(data[0])
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "roadmap_digits.json")
    record = load_record(json_path, settings)
    steps = {step.name: step for step in roadmap.STEPS}
    for name in args.steps:
        seeds = [seed for seed in args.seeds if f"{name}, seed {seed}" not in record["runs"]]
        started = time.time()
        for seed, accuracy, parameters, flops in train_seeds(name, seeds, data, args):
            record["runs"][f"{name}, seed {seed}"] = {
                "step": name, "seed": seed, "accuracy": accuracy, "parameters": parameters,
                "gflops": flops / 1e9, "seconds": round(time.time() - started, 1),
            }
            record["results"] = summarize(record)
            write_json(record, json_path)
            print(f"{steps[name].label:40s} seed {seed}: accuracy {100 * accuracy:5.1f} % "
                  f"({time.time() - started:.0f} s)", flush=True)
            started = time.time()
    record["results"] = summarize(record)
    write_json(record, json_path)
    plot(record["results"], os.path.join(args.output_dir, "roadmap_digits.png"))
    for row in record["results"]:
        print(f"{row['label']:40s} {100 * row['accuracy_mean']:5.1f} +- {100 * row['accuracy_std']:4.1f} %  "
              f"({len(row['accuracies'])} seeds)  paper {row['paper_top1']} %")
    return record["results"]


if __name__ == "__main__":
    main()
