"""FCMAE pre-training step time: fast path (visible tokens) vs dense masked path.

One training step is `model.train_on_batch(images)` (forward, masked loss,
backward, AdamW update), compiled the way Keras compiles on the current
backend (XLA on JAX; a graph on TensorFlow, where Keras turns XLA off on
machines without a GPU; eager on PyTorch). Both paths run
the same encoder, decoder and masks; the fast path runs the pointwise
layers only on the visible positions.

    KERAS_BACKEND=jax python benchmarks/fcmae_fast_path.py --models ConvNeXtV2Atto ConvNeXtV2Tiny

Writes `benchmarks/results/fcmae_fast_path_<backend>.json` and `.md`.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ConvNeXtV2Atto", "ConvNeXtV2Tiny"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--output", default=RESULTS)
    return parser.parse_args(argv)


def build(model_name, fast_path, images, args):
    import keras

    import keras_convnext as kc

    model = kc.FCMAE(
        model_name,
        input_shape=images.shape[1:],
        mask_ratio=args.mask_ratio,
        fast_path=fast_path,
        seed=0,
    )
    model.compile(optimizer=keras.optimizers.AdamW(1e-4))
    start = time.perf_counter()
    for _ in range(args.warmup):
        model.train_on_batch(images)
    print(f"  {model_name} fast_path={fast_path}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    return model


def timed_step(model, images):
    start = time.perf_counter()
    loss = model.train_on_batch(images)
    float(np.asarray(loss))  # wait for the device
    return time.perf_counter() - start


def step_times(model_name, images, args):
    """Step times `(dense, fast)` in seconds, the two paths' steps alternating.

    The load of a shared machine drifts over a run; alternating the steps
    puts each drift on both paths alike instead of on whichever ran later.
    """
    import keras

    keras.backend.clear_session()
    dense_model = build(model_name, False, images, args)
    fast_model = build(model_name, True, images, args)
    dense, fast = [], []
    for _ in range(args.steps):
        dense.append(timed_step(dense_model, images))
        fast.append(timed_step(fast_model, images))
    return dense, fast


def _atomic_write(text, path):
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.chmod(temporary, 0o644)  # mkstemp creates files readable by their owner only
    os.replace(temporary, path)


def markdown(report):
    lines = [
        f"# FCMAE fast path vs dense masked path ({report['backend']})",
        "",
        f"Training step (`train_on_batch`, AdamW), batch {report['batch_size']}, "
        f"{report['image_size']}x{report['image_size']} images, mask ratio {report['mask_ratio']}, "
        f"median of {report['steps']} steps per path, the paths alternating, after "
        f"{report['warmup']} warm-up steps each. "
        f"Device: {report['device']}.",
        "",
        "| model | dense masked (ms/step) | fast path (ms/step) | speedup |",
        "|---|---:|---:|---:|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['model']} | {row['dense_ms']:.1f} | {row['fast_ms']:.1f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    import keras

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype("float32")
    results = []
    for name in args.models:
        dense_times, fast_times = step_times(name, images, args)
        dense = statistics.median(dense_times) * 1000
        fast = statistics.median(fast_times) * 1000
        results.append(
            {
                "model": name,
                "dense_ms": dense,
                "fast_ms": fast,
                "speedup": dense / fast,
                "dense_step_ms": [round(t * 1000, 1) for t in dense_times],
                "fast_step_ms": [round(t * 1000, 1) for t in fast_times],
            }
        )
        print(f"{backend} {name}: dense {dense:.1f} ms, fast {fast:.1f} ms, speedup {dense / fast:.2f}x", flush=True)
    report = {
        "backend": backend,
        "keras": keras.__version__,
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        if not _has_accelerator(backend) else "accelerator",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "mask_ratio": args.mask_ratio,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, f"fcmae_fast_path_{backend}")
    _atomic_write(json.dumps(report, indent=2) + "\n", stem + ".json")
    _atomic_write(markdown(report), stem + ".md")
    return report


def _has_accelerator(backend):
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


if __name__ == "__main__":
    main(sys.argv[1:])
