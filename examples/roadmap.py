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
import json
import os
import sys
import time

if __name__ == "__main__":  # the backend must be chosen before keras is imported
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import select_backend

    select_backend(sys.argv[1:])

import numpy as np

import keras

from keras_convnext import roadmap
from keras_convnext.data import digits_arrays


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
    parser.add_argument("--output-dir", default="docs")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.width_divisor < 1:
        parser.error("--epochs, --batch-size and --width-divisor must be positive integers.")
    if args.image_size < 32:
        parser.error(f"--image-size must be at least 32 (the networks downsample by 32); got {args.image_size}.")
    return args


def load_digits(image_size):
    """Train and held-out images, standardized, `(n, size, size, 3)`, and integer labels."""
    x_train, y_train, x_val, y_val = digits_arrays(image_size)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_val - mean) / std, y_val


def train_step(step, seed, data, args):
    """Held-out accuracy, parameters and FLOPs of `step` trained with seed `seed`."""
    x_train, y_train, x_val, y_val = data
    keras.utils.set_random_seed(seed)
    width = roadmap.step_config(step).width // args.width_divisor
    model = roadmap.build(step, classes=10, input_shape=x_train.shape[1:], width=width)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
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
    )
    one_hot = keras.utils.to_categorical(y_train, 10)
    model.fit(x_train, one_hot, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0)
    logits = model.predict(x_val, batch_size=256, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_val))
    return accuracy, roadmap.count_parameters(model), roadmap.count_flops(model)


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


def main(argv=None):
    """Runs the study; returns the per-step results it wrote."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    data = load_digits(args.image_size)
    steps = {step.name: step for step in roadmap.STEPS}
    results = []
    for name in args.steps:
        step = steps[name]
        started = time.time()
        runs = [train_step(name, seed, data, args) for seed in args.seeds]
        accuracies = [accuracy for accuracy, _, _ in runs]
        results.append(
            {
                "step": name,
                "label": step.label,
                "accuracies": accuracies,
                "parameters": runs[0][1],
                "gflops": runs[0][2] / 1e9,
                "gflops_224": roadmap.count(name).flops / 1e9,
                "paper_gflops": step.paper_gflops,
                "paper_top1": step.paper_top1,
            }
        )
        print(
            f"{step.label:40s} accuracy {100 * np.mean(accuracies):5.1f} +- {100 * np.std(accuracies):4.1f} %  "
            f"({len(accuracies)} seeds, {time.time() - started:.0f} s)",
            flush=True,
        )
    os.makedirs(args.output_dir, exist_ok=True)
    record = {"settings": {key: value for key, value in vars(args).items() if key != "output_dir"}, "results": results}
    record["settings"]["backend"] = keras.backend.backend()
    json_path = os.path.join(args.output_dir, "roadmap_digits.json")
    with open(f"{json_path}.partial", "w") as file:
        json.dump(record, file, indent=1)
    os.replace(f"{json_path}.partial", json_path)
    plot(results, os.path.join(args.output_dir, "roadmap_digits.png"))
    return results


if __name__ == "__main__":
    main()
