"""mixed_bfloat16 against float32: top-1 agreement on real images and speed, every backend.

Top-1 agreement needs a model whose predictions mean something, and no
pretrained weights can be downloaded here, so a ConvNeXt V2 classifier is
first trained in float32 on scikit-learn's digits (real handwritten digits,
upscaled), by `examples/fit_evaluate.py`. Each backend then loads those
weights twice, into a float32 model and into a `mixed_bfloat16` one, and
predicts the held-out images with both:

    python benchmarks/bf16_agreement.py --model ConvNeXtV2Atto --image-size 64

On a machine without TensorFlow (whose image resizing prepares the
digits), train and prepare the images elsewhere, then bring both:

    python benchmarks/bf16_agreement.py --save-weights atto.keras --arrays digits64.npz
    python benchmarks/bf16_agreement.py --weights atto.keras --arrays digits64.npz \
        --device cuda --backends jax torch

Reported per backend: top-1 agreement between the two precisions, held-out
accuracy of each, and inference images/s of each at `--batch-size` (the
speed at ImageNet resolution is `run.py --precision mixed_bfloat16`).
Results go to `benchmarks/results/bf16_agreement_<model>.json` and `.md` (or `--name`).
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = ("tensorflow", "jax", "torch")
sys.path.insert(0, ROOT)

from keras_convnext.benchmark.throughput import (  # noqa: E402
    _versions,
    device_environment,
    machine,
    run_in_backend,
    write_report,
)


def _images_per_s(model, images, batch_size, repeats=5):
    batch = images[:batch_size]
    model.predict_on_batch(batch)
    start = time.perf_counter()
    for _ in range(repeats):
        np.asarray(model.predict_on_batch(batch))
    return batch_size * repeats / (time.perf_counter() - start)


def evaluate_worker(args):
    """Predicts the held-out digits in float32 and in mixed_bfloat16 with the trained weights."""
    import keras

    sys.path.insert(0, ROOT)
    import keras_convnext
    from keras_convnext.data import digits_arrays

    if args.arrays:
        with np.load(args.arrays) as arrays:
            images, labels = arrays["images"], arrays["labels"]
    else:
        _, _, images, labels = digits_arrays(args.image_size)
    images = images.astype("float32")
    outputs = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.config.set_dtype_policy(policy)
        model = keras_convnext.CONSTRUCTORS[args.model](
            input_shape=(args.image_size, args.image_size, 3), classes=10, classifier_activation=None
        )
        model.load_weights(args.weights)
        logits = np.concatenate([
            keras.ops.convert_to_numpy(keras.ops.cast(model.predict_on_batch(images[i : i + 64]), "float32"))
            for i in range(0, len(images), 64)
        ])
        outputs[policy] = {
            "predictions": logits.argmax(-1),
            "images_per_s": _images_per_s(model, images, args.batch_size),
        }
    fp32, bf16 = outputs["float32"], outputs["mixed_bfloat16"]
    return {
        "examples": int(len(labels)),
        "top1_agreement": float(np.mean(fp32["predictions"] == bf16["predictions"])),
        "float32_accuracy": float(np.mean(fp32["predictions"] == labels)),
        "bfloat16_accuracy": float(np.mean(bf16["predictions"] == labels)),
        "float32_images_per_s": fp32["images_per_s"],
        "bfloat16_images_per_s": bf16["images_per_s"],
    }


def _train(args, directory):
    """float32 training on the digits by `keras-convnext train`, on the fastest backend for small images."""
    command = [
        sys.executable, "-m", "keras_convnext.cli", "--backend", args.train_backend, "train",
        "--data", "digits", "--model", args.model, "--epochs", str(args.epochs), "--batch-size", "64",
        "--image-size", str(args.image_size), "--learning-rate", "1e-3", "--quiet", "--output-dir", directory,
    ]
    python_path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    environment = dict(os.environ, PYTHONPATH=python_path, **device_environment(args.device))
    subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
    return os.path.join(directory, "model.keras")


def _save_arrays(path, image_size):
    """Writes the held-out digits (`images`, `labels`) to `path`, through a temporary file."""
    sys.path.insert(0, ROOT)
    from keras_convnext.data import digits_arrays

    _, _, images, labels = digits_arrays(image_size)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, images=images, labels=labels)
    os.replace(path + ".tmp", path)


def markdown(report):
    lines = [
        f"### {report['model']} trained on digits ({report['image_size']}x{report['image_size']}), "
        "mixed_bfloat16 against float32",
        "",
        f"{report['date']}, {report['machine']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| backend | held-out images | top-1 agreement | float32 accuracy | bfloat16 accuracy "
        f"| float32 images/s | bfloat16 images/s (batch {report['batch_size']}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, row in report["results"].items():
        if "error" in row:
            lines.append(f"| {backend} | failed: {' '.join(row['error'])} | | | | | |")
            continue
        lines.append(
            f"| {backend} | {row['examples']} | {row['top1_agreement']:.2%} | {row['float32_accuracy']:.2%} "
            f"| {row['bfloat16_accuracy']:.2%} | {row['float32_images_per_s']:.0f} "
            f"| {row['bfloat16_images_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ConvNeXtV2Atto")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the speed measurement")
    parser.add_argument("--train-backend", default="torch", choices=BACKENDS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--weights", help="trained weights (.keras or .weights.h5); skips training")
    parser.add_argument("--save-weights", help="also keep the trained model here (.keras)")
    parser.add_argument("--arrays", help="held-out images and labels (.npz); written first if missing")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--name", help="results file name (default: bf16_agreement_<model>, _cuda added on a GPU)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(evaluate_worker(args)))
        return 0

    if args.arrays and not os.path.exists(args.arrays):
        _save_arrays(args.arrays, args.image_size)
    with tempfile.TemporaryDirectory() as directory:
        weights = args.weights or _train(args, directory)
        if args.save_weights and not args.weights:
            shutil.copyfile(weights, args.save_weights + ".tmp")
            os.replace(args.save_weights + ".tmp", args.save_weights)
        results = {}
        for backend in args.backends:
            command = [
                sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model,
                "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--weights", weights,
            ] + (["--arrays", args.arrays] if args.arrays else [])
            results[backend] = run_in_backend(command, backend, args.device)
    report = {
        "model": args.model, "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
        "date": datetime.date.today().isoformat(),
        "machine": machine(args.device),
        "versions": _versions(), "results": results,
    }
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    write_report(args.name or f"bf16_agreement_{args.model}{suffix}", report, markdown(report),
                 os.path.join(HERE, "results"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
