"""Peak training memory with and without gradient checkpointing (`remat`), each case in a fresh process.

    python benchmarks/remat_memory.py --model ConvNeXtV2Base --batch-size 32 --backends torch jax

Each case builds the model from the same seed, builds AdamW's slots, then
runs `--steps` training steps (`train_on_batch`, cross-entropy on random
224x224 images and labels) and records each step's loss. Memory is host
memory (Linux's /proc, as in `memory.py`), in MB (2**20 bytes):

- `model MB`: resident memory added by the model and the optimizer's slots;
- `training MB`: the high-water mark of the steps after the first, above the
  memory held before them (the first step traces and compiles on JAX and
  TensorFlow; its own peak is left out by restarting the kernel's counter);
- `total MB`: the same high-water mark above the process's memory before
  the model was built.

The losses of every case are listed: remat must give the same curve. On a
GPU (`--device cuda`) the memory is the framework allocator's instead, as in
`run.py`. Results: `benchmarks/results/<name>.json` and `.md`.
"""

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from keras_convnext.benchmark.throughput import (  # noqa: E402
    ResidentMemory,
    _versions,
    machine,
    run_in_backend,
    write_report,
)

CASES = {"no remat": False, "remat (every stage)": True}


def _device_memory(device):
    import keras

    if device == "cpu":
        return ResidentMemory()
    from keras_convnext.benchmark import throughput

    return {"jax": throughput.JaxDeviceMemory, "torch": throughput.TorchDeviceMemory,
            "tensorflow": throughput.TensorFlowDeviceMemory}[keras.backend.backend()]()


def child(args):
    """Runs one case in this process; returns its row."""
    import numpy as np
    import keras

    import keras_convnext

    memory = _device_memory(args.device)
    baseline = memory.baseline()
    keras.utils.set_random_seed(0)
    remat = CASES[args.case]
    model = keras_convnext.CONSTRUCTORS[args.model](
        input_shape=(args.resolution, args.resolution, 3), classifier_activation=None, remat=remat
    )
    model.compile(optimizer=keras.optimizers.AdamW(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (args.batch_size, args.resolution, args.resolution, 3)).astype("float32")
    labels = rng.integers(0, 1000, (args.batch_size,))
    losses, seconds = [], []
    for step in range(args.steps):
        if step == 1:
            memory.reset()
            before_steps = memory.baseline()
        start = time.perf_counter()
        losses.append(float(model.train_on_batch(images, labels)))
        seconds.append(time.perf_counter() - start)
    after_build = before_steps if args.steps > 1 else memory.baseline()
    peak = memory.high_water()
    return {
        "case": args.case, "remat": remat, "losses": losses, "step_seconds": seconds,
        "model_mb": after_build - baseline, "training_mb": peak - after_build, "total_mb": peak - baseline,
        "peak_reset": args.steps > 1,
    }


def markdown(report):
    rows = report["results"]
    plain = rows.get("no remat", {})
    lines = [
        f"### Training memory with remat: {report['model']}, batch {report['batch_size']}, "
        f"{report['resolution']}x{report['resolution']}, float32, {report['backend']} backend",
        "",
        f"{report['date']}, {report['machine']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| case | held between steps MB | training MB | total MB | total, x no remat | s/step | losses |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {' '.join(row['error'])} | | | | | |")
            continue
        lower = f"{plain['total_mb'] / row['total_mb']:.2f}x lower" if "total_mb" in plain and row is not plain else "-"
        later = row["step_seconds"][1:] or row["step_seconds"]
        lines.append(
            f"| {name} | {row['model_mb']:.0f} | {row['training_mb']:.0f} | {row['total_mb']:.0f} | {lower} "
            f"| {sum(later) / len(later):.1f} | {', '.join(f'{loss:.5f}' for loss in row['losses'])} |"
        )
    lines += [
        "",
        "Held between steps MB: memory added by the model, AdamW's slots and what the first step left "
        "(gradients, compiled programs). Training MB: the high-water mark of the "
        "training steps after the first, above that. Total MB: the same high-water mark above the memory "
        "before the model was built. Memory is "
        + ("resident host memory (Linux /proc VmHWM)." if report["device"] == "cpu"
           else "what the framework's GPU allocator handed out."),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ConvNeXtV2Base")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["torch", "jax"], choices=["tensorflow", "jax", "torch"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--name", help="results file name, before _<backend> (default: derived from the settings)")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(child(args)))
        return 0
    for backend in args.backends:
        results = {}
        for case in CASES:
            command = [sys.executable, os.path.abspath(__file__), "--case", case, "--model", args.model,
                       "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
                       "--steps", str(args.steps), "--device", args.device]
            results[case] = run_in_backend(command, backend, args.device)
        report = {
            "model": args.model, "batch_size": args.batch_size, "resolution": args.resolution,
            "backend": backend, "device": args.device, "steps": args.steps,
            "date": datetime.date.today().isoformat(), "machine": machine(args.device),
            "versions": _versions(), "results": results,
        }
        name = args.name or f"remat_memory_{args.model}_b{args.batch_size}_{args.resolution}"
        write_report(f"{name}_{backend}", report, markdown(report), args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
