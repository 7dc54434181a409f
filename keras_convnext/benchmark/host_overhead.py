"""The host-overhead preset: where per-call Python, not arithmetic, decides the speed.

    python benchmarks/run.py --preset host-overhead

Two paired measurements (every implementation's process alive at once, timed
in turns; see `throughput.paired_latency`), on the CPU, so that every machine
can track them:

- inference: ConvNeXt V2 Atto at 32x32, batch 1, as a user's eager call
  (`predict_on_batch`), on every Keras backend and on the PyTorch backend with
  `jit_compile=True` (`torch.compile`), against the PyTorch reference (HF
  transformers' ConvNextV2 in eager float32). A model this small does little
  arithmetic, so the ratio shows each implementation's host work per call.
- training: the quickstart's step (`examples/quickstart.py`): V2 Atto with 10
  classes on 32x32 images, AdamW, batch 64, one `fit` epoch over as many images
  as the digits' training split (1437) per timed call; steps/s per backend
  and each backend's ratio to JAX.

Ratios are medians of the turns' ratios, with their quartiles. Results go to
`<--output-dir>/<--name>.json` and `.md`.
"""

import argparse
import datetime
import math
import sys
import time

import numpy as np

from keras_convnext.benchmark import throughput

PRESET = "host-overhead"
MODEL = "ConvNeXtV2Atto"
RESOLUTION = 32
# The quickstart's training: scikit-learn's 1797 digits, four fifths for
# training, batch 64, 10 classes.
QUICKSTART_TRAIN_IMAGES = 1437
QUICKSTART_BATCH_SIZE = 64
QUICKSTART_CLASSES = 10
TRAINING_REFERENCE = "keras_convnext/jax"


def requested(argv):
    """Whether the command line `argv` asks for this preset (`--preset host-overhead`)."""
    return any(
        word == f"--preset={PRESET}" or (word == "--preset" and argv[i + 1 : i + 2] == [PRESET])
        for i, word in enumerate(argv)
    )


def build_parser(output_dir=throughput.DEFAULT_OUTPUT_DIR):
    parser = argparse.ArgumentParser(prog=f"run.py --preset {PRESET}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=[PRESET], default=PRESET)
    parser.add_argument("--turns", type=int, default=20, help="turns of the paired inference latency")
    parser.add_argument("--train-turns", type=int, default=5, help="turns of the paired training (0 skips it)")
    parser.add_argument("--train-images", type=int, default=QUICKSTART_TRAIN_IMAGES,
                        help="images per timed fit epoch (the quickstart's training split)")
    parser.add_argument("--train-batch-size", type=int, default=QUICKSTART_BATCH_SIZE)
    parser.add_argument("--backends", nargs="+", default=list(throughput.BACKENDS), choices=throughput.BACKENDS)
    parser.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the PyTorch backend with jit_compile=True at inference (default: yes)")
    parser.add_argument("--omp-wait-policy", choices=["default", "passive"], default="default",
                        help="OpenMP's waiting in every process: the system's, or OMP_WAIT_POLICY=PASSIVE "
                             "(PyTorch's threads sleep instead of spinning between operations; on a machine "
                             "busy with other work, spinning threads hold back the one doing the work)")
    parser.add_argument("--name", default="host_overhead", help="results file name")
    parser.add_argument("--output-dir", default=output_dir,
                        help=f"where <name>.json and .md go (default: {output_dir})")
    parser.add_argument("--serve-training", help=argparse.SUPPRESS)  # a training worker's own flag
    return parser


def inference_arguments(args):
    """The throughput benchmark's arguments for this preset's inference rows (batch 1, no training)."""
    argv = ["--model", MODEL, "--batch-size", "1", "--resolution", str(RESOLUTION), "--train-batch-size", "0",
            "--no-matmul-peak", "--backends", *args.backends]
    if args.jit_compile:
        argv.append("--torch-compile")
    return throughput.build_parser().parse_args(argv)


def worker_environment(args, backend):
    """A worker's environment: `throughput.backend_environment` on the CPU, with `--omp-wait-policy`."""
    environment = throughput.backend_environment(backend)
    if args.omp_wait_policy == "passive":
        environment["OMP_WAIT_POLICY"] = "PASSIVE"
    return environment


def inference_workers(args):
    """`{row name: (command, environment)}` of the paired inference processes, the reference first."""
    inference = inference_arguments(args)
    return {
        name: (throughput._worker_command(inference, ["--serve", implementation]),
               worker_environment(args, backend))
        for name, backend, implementation in throughput._implementations(inference)
    }


def training_workers(args):
    """`{row name: (command, environment)}` of the paired training processes, one per backend."""
    command = [sys.executable, "-m", "keras_convnext.benchmark.host_overhead", "--serve-training", "fit",
               "--train-images", str(args.train_images), "--train-batch-size", str(args.train_batch_size)]
    return {f"keras_convnext/{backend}": (command, worker_environment(args, backend))
            for backend in args.backends}


def quickstart_fit(train_images, batch_size):
    """`fit_epoch()`: one `fit` epoch of the quickstart's model on `train_images` random 32x32 images."""
    import keras

    import keras_convnext

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(train_images, RESOLUTION, RESOLUTION, 3)).astype("float32")
    labels = rng.integers(0, QUICKSTART_CLASSES, size=(train_images,))
    model = keras_convnext.ConvNeXtV2Atto(input_shape=(RESOLUTION, RESOLUTION, 3), classes=QUICKSTART_CLASSES)
    model.compile(
        optimizer=keras.optimizers.AdamW(2e-3, weight_decay=0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return lambda: model.fit(images, labels, epochs=1, batch_size=batch_size, verbose=0)


def serve_training(fit_epoch, commands, output):
    """`throughput.serve`'s protocol for training: each timed call is one `fit` epoch.

    Two epochs first (building and compiling the step), then `READY`; each
    `TIME <batch> <calls>` line gets `TIMES <JSON seconds per epoch>`, until
    `EXIT`. No untimed call before a request: an epoch is long enough that
    the caches' state at its start does not matter.
    """
    throughput.serve(lambda batch: fit_epoch(), [None], commands, output, untimed_first=False)


def quartiles(values):
    """(lower quartile, median, upper quartile) of `values`."""
    low, middle, high = np.percentile(values, [25, 50, 75])
    return float(low), float(middle), float(high)


def training_table(training):
    """Markdown rows of the paired training: steps/s per backend and its ratio to JAX."""
    steps, batch = training["steps_per_epoch"], training["batch_size"]
    latency = training["latency_ms"]
    ratios = throughput.paired_ratios(latency, batch, reference=TRAINING_REFERENCE)
    lines = [
        f"Training: the quickstart's step (V2 Atto, 10 classes, AdamW, batch {batch}), one `fit` epoch of "
        f"{steps} steps per timed call, {training['turns']} turns. steps/s: from the median of the turns' "
        "epochs; x JAX: median of the turns' ratios (JAX's epoch time / this one's), with their quartiles.",
        "",
        "| implementation | steps/s | x JAX | quartiles |",
        "|---|---|---|---|",
    ]
    for name, value in latency.items():
        epochs_ms = value[str(batch)]
        steps_per_s = f"{steps / (np.median(epochs_ms) / 1000):.2f}" if epochs_ms else "-"
        turn_ratios = ratios.get(name)
        if turn_ratios:
            low, middle, high = quartiles(turn_ratios)
            cells = [f"{middle:.2f}x", f"{low:.2f}x-{high:.2f}x"]
        else:
            cells = ["1.00x" if name == TRAINING_REFERENCE else "-", "-"]
        lines.append(f"| {name} | {steps_per_s} | " + " | ".join(cells) + " |")
    for name, error in training["errors"].items():
        lines.append(f"| {name} | failed: {' '.join(error)} | | |")
    return "\n".join(lines) + "\n"


def markdown(report):
    """The preset's tables: paired inference latency, then paired training steps/s."""
    lines = [
        f"### Host overhead: {MODEL}, {RESOLUTION}x{RESOLUTION}, float32, CPU",
        "",
        f"{report['date']}, {report['machine']}, "
        + ", ".join(f"{key} {value}" for key, value in report["versions"].items()),
        "",
        "Inference: batch 1, `predict_on_batch` (eager; `+jit_compile`: the model compiled with "
        "`jit_compile=True`) against the PyTorch reference in eager float32.",
    ]
    if report.get("omp_wait_policy") == "passive":
        lines.append("Every process ran with `OMP_WAIT_POLICY=PASSIVE`.")
    text = "\n".join(lines) + "\n" + throughput.paired_markdown(report)
    if report.get("training"):
        text += "\n" + training_table(report["training"])
    return text


def run(args, write=lambda report: None):
    """Both measurements; the report (a dict) as written to JSON. `write(report)` runs after
    each, so that the inference table is kept if the training is stopped."""
    report = {
        "preset": PRESET,
        "model": MODEL,
        "resolution": RESOLUTION,
        "date": datetime.date.today().isoformat(),
        "machine": throughput.machine("cpu"),
        "versions": throughput._versions(),
        "omp_wait_policy": args.omp_wait_policy,
    }
    calls = {1: throughput.PAIRED_CALLS[1]}
    report["paired"] = {"turns": args.turns, "calls": {"1": calls[1]},
                        **throughput.paired_latency(inference_workers(args), [1], args.turns, calls)}
    write(report)
    if args.train_turns:
        batch = args.train_batch_size
        measured = throughput.paired_latency(training_workers(args), [batch], args.train_turns, {batch: 1})
        report["training"] = {"turns": args.train_turns, "batch_size": batch, "images": args.train_images,
                              "steps_per_epoch": math.ceil(args.train_images / batch), **measured}
        write(report)
    return report


def main(argv=None, output_dir=throughput.DEFAULT_OUTPUT_DIR):
    """Runs the preset (or, with `--serve-training`, one training worker); returns 0."""
    args = build_parser(output_dir).parse_args(argv)
    if args.serve_training:
        serve_training(quickstart_fit(args.train_images, args.train_batch_size), sys.stdin, sys.stdout)
        return 0
    start = time.perf_counter()

    def write(report):
        report["seconds"] = time.perf_counter() - start
        throughput.write_report(args.name, report, markdown(report), args.output_dir)

    run(args, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
