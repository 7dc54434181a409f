"""Peak host memory of loading official checkpoints, each case in a fresh process.

    python benchmarks/memory.py --model ConvNeXtV2Base [--backend jax] [--json out.json]

The script writes a checkpoint with random weights in Meta's official naming
(`{"model": {"stages.0.0.dwconv.weight": ...}}`, as `torch.save` writes the
official `.pt` files), then measures, each in its own process:

- `build`: `ConvNeXtV2Base()` with no weights (the model alone);
- `file`: `ConvNeXtV2Base(weights="<local .pt>")`;
- `tag-first`: `ConvNeXtV2Base(weights="imagenet")` with the file supplied in
  `KERAS_CONVNEXT_WEIGHTS_DIR` and an empty cache (read, convert, cache, load);
- `tag-cached`: the same call again, reading the cache only.

Memory is the process's resident set: `VmRSS` after importing Keras and
keras_convnext (the baseline) and the kernel's high-water mark `VmHWM` at
the end (the same figure as `ru_maxrss`). "Added" is peak minus baseline; the
goal is added <= (model bytes + checkpoint bytes) * 1.2. Every figure is in MB
(2**20 bytes). `--import-first torch` imports PyTorch before the baseline, to
separate the load path's own memory from that of importing the reader's
library (PyTorch alone adds about 150 MB when a JAX or TensorFlow process
first reads a `.pt` file with it).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2**20
CASES = ("build", "file", "tag-first", "tag-cached")
GOAL_FACTOR = 1.2


def _status_mb(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"/proc/self/status has no {field}")


def official_state_dict(depths, dims, classes=1000, seed=0):
    """`{official key: float32 array}` of a V2 classifier, written from Meta's layout."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def tensor(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    state = {
        "downsample_layers.0.0.weight": tensor(dims[0], 3, 4, 4),
        "downsample_layers.0.0.bias": tensor(dims[0]),
        "downsample_layers.0.1.weight": tensor(dims[0]),
        "downsample_layers.0.1.bias": tensor(dims[0]),
    }
    for stage in range(1, 4):
        state[f"downsample_layers.{stage}.0.weight"] = tensor(dims[stage - 1])
        state[f"downsample_layers.{stage}.0.bias"] = tensor(dims[stage - 1])
        state[f"downsample_layers.{stage}.1.weight"] = tensor(dims[stage], dims[stage - 1], 2, 2)
        state[f"downsample_layers.{stage}.1.bias"] = tensor(dims[stage])
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        for block in range(depth):
            prefix = f"stages.{stage}.{block}."
            state[prefix + "dwconv.weight"] = tensor(dim, 1, 7, 7)
            state[prefix + "dwconv.bias"] = tensor(dim)
            state[prefix + "norm.weight"] = tensor(dim)
            state[prefix + "norm.bias"] = tensor(dim)
            state[prefix + "pwconv1.weight"] = tensor(4 * dim, dim)
            state[prefix + "pwconv1.bias"] = tensor(4 * dim)
            state[prefix + "grn.gamma"] = tensor(1, 1, 1, 4 * dim)
            state[prefix + "grn.beta"] = tensor(1, 1, 1, 4 * dim)
            state[prefix + "pwconv2.weight"] = tensor(dim, 4 * dim)
            state[prefix + "pwconv2.bias"] = tensor(dim)
    state["norm.weight"] = tensor(dims[-1])
    state["norm.bias"] = tensor(dims[-1])
    state["head.weight"] = tensor(classes, dims[-1])
    state["head.bias"] = tensor(classes)
    return state


def write_checkpoint(path, depths, dims):
    """Writes `{"model": state dict}` with torch.save, as the official files are."""
    import torch

    state = {key: torch.from_numpy(array) for key, array in official_state_dict(depths, dims).items()}
    torch.save({"model": state}, path)


def child(case, model_name, checkpoint, import_first):
    """Runs one case in this process; prints one JSON line."""
    import importlib

    import keras_convnext

    for module in filter(None, import_first.split(",")):
        importlib.import_module(module)
    baseline = _status_mb("VmRSS")
    constructor = keras_convnext.CONSTRUCTORS[model_name]
    weights = {"build": None, "file": checkpoint}.get(case, "imagenet")
    model = constructor(weights=weights)
    model_bytes = sum(_variable_bytes(v) for v in model.weights)
    print(json.dumps({
        "case": case,
        "baseline_mb": baseline,
        "peak_mb": _status_mb("VmHWM"),
        "model_mb": model_bytes / MB,
    }))


def _variable_bytes(variable):
    import numpy as np

    count = 1
    for size in variable.shape:
        count *= int(size)
    return count * np.dtype(variable.dtype).itemsize


def run_case(case, args, checkpoint, cache, weights_dir):
    env = dict(os.environ, KERAS_BACKEND=args.backend, KERAS_CONVNEXT_CACHE_DIR=cache,
               KERAS_CONVNEXT_WEIGHTS_DIR=weights_dir, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.environ.get("PYTHONPATH") or ROOT)
    command = [sys.executable, os.path.abspath(__file__), "--child", case,
               "--model", args.model, "--checkpoint", checkpoint, "--import-first", args.import_first]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"case": case, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(report):
    lines = [
        f"Peak host memory, {report['model']}, {report['backend']} backend "
        f"(checkpoint {report['checkpoint_mb']:.0f} MB, official naming, float32"
        + (f"; {report['import_first']} imported before the baseline" if report["import_first"] else "") + ")",
        "",
        "| Case | Baseline MB | Peak MB | Added MB | Model MB | Added / (model + checkpoint) |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        if "error" in row:
            lines.append(f"| {row['case']} | failed: {' '.join(row['error'])} |")
            continue
        added = row["peak_mb"] - row["baseline_mb"]
        budget = row["model_mb"] + report["checkpoint_mb"]
        lines.append(
            f"| {row['case']} | {row['baseline_mb']:.0f} | {row['peak_mb']:.0f} | {added:.0f} "
            f"| {row['model_mb']:.0f} | {added / budget:.2f} |"
        )
    lines.append(f"\nGoal: added <= {GOAL_FACTOR:.1f} x (model + checkpoint).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ConvNeXtV2Base")
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--import-first", default="", help="modules imported before the baseline, e.g. torch")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.model, args.checkpoint, args.import_first)
        return 0

    # PYTHONPATH, when set, picks the keras_convnext under test (for before/after runs).
    sys.path.append(ROOT)
    from keras_convnext.models.variants import VARIANTS
    from keras_convnext.weights import registry

    variant = VARIANTS[args.model]
    if variant.version != "v2":
        parser.error("the official-naming writer covers ConvNeXt V2 models")
    entry = registry.REGISTRY[(args.model, "imagenet")]
    with tempfile.TemporaryDirectory() as root:
        weights_dir = os.path.join(root, "by_hand")
        os.makedirs(weights_dir)
        checkpoint = os.path.join(weights_dir, entry.filename)
        write_checkpoint(checkpoint, variant.stage_depths, variant.stage_dims)
        cache = os.path.join(root, "cache")
        results = [run_case(case, args, checkpoint, cache, weights_dir) for case in args.cases.split(",")]
        report = {"model": args.model, "backend": args.backend, "import_first": args.import_first,
                  "checkpoint_mb": os.path.getsize(checkpoint) / MB, "results": results}
    text = markdown(report)
    sys.stdout.write(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
