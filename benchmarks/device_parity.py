"""Agreement with the PyTorch reference on the device the benchmarks run on.

The test suite proves parity on the CPU; this checks the same on a GPU, where
other kernels run (cuDNN, cuBLAS, XLA:GPU) and float32 products may use TF32:

    python benchmarks/device_parity.py --device cuda --backends jax torch

HF transformers' ConvNeXt V2 and V1 Atto get random, non-trivial weights
(GRN gamma and beta, layer scale clearly nonzero: tests/conftest.py), go
through a safetensors file into keras_convnext's models, and both predict the
same images on the device. Reported per backend and model: the largest
absolute logit difference and ||keras - ref|| / ||ref||, with full float32
products (TF32 off in PyTorch, "highest" matmul precision in JAX) and with
each framework's defaults, and for mixed_bfloat16 against the float32
reference. Results go to `benchmarks/results/device_parity_<device>.json` and `.md`.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from keras_convnext.benchmark.throughput import (  # noqa: E402
    _versions,
    machine,
    run_in_backend,
    set_tf32,
    write_report,
)

BACKENDS = ("tensorflow", "jax", "torch")
ATTO = ((2, 2, 6, 2), (40, 80, 160, 320))
SHAPES = ((4, 224, 224), (2, 45, 70))
TINY_SHAPES = ((2, 32, 32),)  # --tiny: a check of the script itself


def _errors(logits, expected):
    return {
        "max_abs": float(np.abs(logits - expected).max()),
        "relative": float(np.linalg.norm(logits - expected) / np.linalg.norm(expected)),
    }


def worker(args):
    import keras
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    from safetensors.torch import save_file

    import keras_convnext as kc
    from conftest import hf_reference

    device = torch.device(args.device)
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for version, seed in (("v2", 1), ("v1", 2)):
            reference = hf_reference(version, *ATTO, seed=seed).to(device)
            path = os.path.join(directory, f"{version}.safetensors")
            save_file({k: v.detach().cpu().contiguous() for k, v in reference.state_dict().items()}, path)
            constructor = kc.ConvNeXtV2Atto if version == "v2" else kc.ConvNeXtAtto
            rows = {}
            for setting in ("full_float32", "defaults", "mixed_bfloat16"):
                for framework in {"torch", keras.backend.backend()}:  # the reference's and the backend's
                    set_tf32("off" if setting == "full_float32" else "default", framework)
                keras.config.set_dtype_policy("mixed_bfloat16" if setting == "mixed_bfloat16" else "float32")
                model = constructor(weights=path, include_preprocessing=False, classifier_activation=None)
                worst = {"max_abs": 0.0, "relative": 0.0}
                for batch, height, width in TINY_SHAPES if args.tiny else SHAPES:
                    rng = np.random.default_rng(height)
                    images = rng.normal(size=(batch, height, width, 3)).astype("float32")
                    with torch.no_grad():
                        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
                        expected = reference(pixel_values=pixels).logits.double().cpu().numpy()
                    logits = np.asarray(model.predict_on_batch(images), "float32")
                    errors = _errors(logits.astype("float64"), expected)
                    worst = {key: max(worst[key], errors[key]) for key in worst}
                rows[setting] = worst
            results[f"ConvNeXt{'V2' if version == 'v2' else ''}Atto"] = rows
    keras.config.set_dtype_policy("float32")
    return results


def markdown(report):
    lines = [
        f"### Logits against the PyTorch reference on {report['device']}",
        "",
        f"{report['date']}, {report['machine']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "Atto with random non-trivial weights; images "
        + ", ".join(f"{b}x{h}x{w}" for b, h, w in report.get("shapes", SHAPES))
        + "; the worst of them. Each cell: max |keras - ref| / ||keras - ref|| over ||ref||.",
        "",
        "| backend | model | full float32 | framework defaults (TF32) | mixed_bfloat16 vs float32 ref |",
        "|---|---|---|---|---|",
    ]
    for backend, models in report["results"].items():
        if "error" in models:
            lines.append(f"| {backend} | failed: {' '.join(models['error'])} | | | |")
            continue
        for name, rows in models.items():
            cells = " | ".join(
                f"{rows[key]['max_abs']:.2e} / {rows[key]['relative']:.2e}"
                for key in ("full_float32", "defaults", "mixed_bfloat16")
            )
            lines.append(f"| {backend} | {name} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--tiny", action="store_true", help=f"only {TINY_SHAPES[0][0]} images of 32x32")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return 0
    results = {}
    for backend in args.backends:
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--device", args.device] + (
            ["--tiny"] if args.tiny else [])
        results[backend] = run_in_backend(command, backend, args.device)
    report = {
        "device": args.device, "date": datetime.date.today().isoformat(),
        "machine": machine(args.device),
        "versions": _versions(), "results": results, "shapes": TINY_SHAPES if args.tiny else SHAPES,
    }
    write_report(f"device_parity_{args.device}", report, markdown(report), args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
