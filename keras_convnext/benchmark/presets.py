"""GPU presets: ConvNeXt as users serve and fine-tune it on a GPU, against PyTorch as a tuned user runs it.

    python benchmarks/run.py --preset gpu-inference   # inference at batch 256
    python benchmarks/run.py --preset gpu-train       # training at batch 128, the fine-tuning recipe's AdamW

Each preset times V2 Tiny and V2 Base at 224x224 in `mixed_bfloat16`,
`float32` (TF32 wherever the framework itself uses it, recorded per row) and
`mixed_float16` (training with loss scaling: Keras' `LossScaleOptimizer`,
PyTorch's `GradScaler`). The reference is HF transformers' ConvNeXt twice:
eager (under autocast in the mixed precisions) and tuned (channels_last,
autocast, `torch.compile`); every ratio is to the faster of the two in the
same cell. Each implementation runs in its own process (`throughput`'s
workers). Reported: images/s, peak GPU memory as the framework's allocator
counts it, first-call time (compilation included) and the share of the
GPU's matrix-multiply peak in the cell's precision, measured once per run.

Cells run in order of importance (mixed_bfloat16 first, Tiny before Base)
and the presets given together take turns per cell, so a run cut short by
`--budget-s` still has the most important rows of each table; the cells it
did not reach are listed under the table. The tables are written again
after every cell.
"""

import argparse
import datetime
import json
import sys
import time

from keras_convnext.benchmark import throughput

PRESETS = {
    "gpu-inference": {"batch_size": 256, "train": False, "title": "inference"},
    "gpu-train": {"batch_size": 128, "train": True, "title": "training, the fine-tuning recipe's AdamW"},
}
MODELS = ("ConvNeXtV2Tiny", "ConvNeXtV2Base")
PRECISIONS = ("mixed_bfloat16", "float32", "mixed_float16")
REFERENCES = ("eager", "tuned")
REFERENCE_PREFIX = "pytorch-reference/"
# The matrix-multiply peak a cell's products are measured against: float32
# inputs against TF32, the fastest product a GPU offers for them.
PEAK_OF_PRECISION = {"float32": "tf32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
# A cell is started only with this many seconds of the budget left.
MIN_CELL_SECONDS = 30.0


def build_parser(prog="benchmarks/run.py --preset", output_dir=throughput.DEFAULT_OUTPUT_DIR):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", required=True, choices=list(PRESETS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="keras_convnext constructor names")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--backends", nargs="+", default=list(throughput.BACKENDS), choices=throughput.BACKENDS)
    parser.add_argument("--references", nargs="+", default=list(REFERENCES), choices=REFERENCES,
                        help="reference configurations: eager, and tuned (channels_last + autocast + torch.compile)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time the PyTorch backend with jit_compile=True (torch.compile)")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, help="instead of the preset's (256 inference, 128 training)")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, help="stop starting cells after this many seconds (default: none)")
    parser.add_argument("--matmul-sizes", type=int, nargs="+",
                        help="square product sizes of the peak (default: 2048 4096 8192 on a GPU; 256 512 on "
                             "the CPU, where the presets only check themselves)")
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--matmul-peaks", action="store_true", help=argparse.SUPPRESS)  # the worker's role
    return parser


def cells(models, precisions):
    """(model, precision) pairs in the order they run: precision first, then model."""
    return [(model, precision) for precision in precisions for model in models]


def implementations(options, precision):
    """[(row name, Keras backend of its process, throughput worker)], the references first."""
    rows = []
    if "eager" in options.references:
        eager = "reference" if precision == "float32" else "reference_autocast"
        rows.append((REFERENCE_PREFIX + "eager", "torch", eager))
    if "tuned" in options.references:
        rows.append((REFERENCE_PREFIX + "tuned", "torch", "reference_tuned"))
    for backend in options.backends:
        rows.append((f"keras_convnext/{backend}", backend, "keras_convnext"))
        if options.torch_compile and backend == "torch":
            rows.append(("keras_convnext/torch+jit_compile", backend, "keras_convnext_jit"))
    return rows


def worker_arguments(options, preset, model, precision):
    """The `throughput` worker's arguments for one cell of `preset`."""
    batch = options.batch_size or PRESETS[preset]["batch_size"]
    train = PRESETS[preset]["train"]
    return throughput.build_parser().parse_args([
        "--model", model, "--precision", precision, "--resolution", str(options.resolution),
        "--batch-size", str(batch), "--train-batch-size", str(batch if train else 0),
        "--repeats", str(options.repeats), "--device", options.device, "--optimizer", "finetune",
        "--no-matmul-peak", "--no-batch1-latency", "--inference" if not train else "--no-inference",
    ])


def run_cell(options, preset, model, precision, deadline):
    """`{row name: worker result}` of one cell; each worker gets the time left before `deadline`."""
    args = worker_arguments(options, preset, model, precision)
    results = {}
    for name, backend, implementation in implementations(options, precision):
        args.implementation = implementation
        command = throughput._worker_command(args, ["--worker", implementation])
        left = None if deadline is None else max(1.0, deadline - time.monotonic())
        results[name] = throughput.run_in_backend(command, backend, options.device, timeout=left)
    return results


def matmul_peaks(device, sizes):
    """`{"float32", "tf32", "bfloat16", "float16": GFLOP/s}`: the best square products through PyTorch.

    "float32" is full float32, "tf32" allows TF32 (on the CPU the same products).
    """
    import torch

    device = torch.device(device)
    allowed = torch.backends.cuda.matmul.allow_tf32
    peaks = {}
    for name, dtype, tf32 in (("float32", "float32", False), ("tf32", "float32", True),
                              ("bfloat16", "bfloat16", False), ("float16", "float16", False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        best = 0.0
        for size in sizes:
            a, b = (torch.rand(size, size, device=device).to(getattr(torch, dtype)) for _ in range(2))
            _, seconds = throughput._timed(lambda: (torch.mm(a, b), throughput._synchronize(device)), 5)
            best = max(best, 2 * size**3 / seconds / 1e9)
        peaks[name] = best
    torch.backends.cuda.matmul.allow_tf32 = allowed
    return peaks


def _matmul_sizes(options):
    return options.matmul_sizes or (throughput.GPU_MATMUL_SIZES if options.device == "cuda" else (256, 512))


def measure_matmul_peaks(options, deadline):
    sizes = _matmul_sizes(options)
    command = [sys.executable, "-m", "keras_convnext.benchmark.presets", "--preset", "gpu-train", "--matmul-peaks",
               "--device", options.device, "--matmul-sizes", *map(str, sizes)]
    left = None if deadline is None else max(1.0, deadline - time.monotonic())
    return throughput.run_in_backend(command, "torch", options.device, timeout=left)


def cell_rows(preset, cell, peak_gflops, multiply_adds, batch):
    """Table rows of one cell: `[(row name, images/s, x best ref, peak MB, x best ref, first s, share of peak)]`.

    Training counts 3x the forward pass's products (the backward pass needs two per forward one).
    """
    train = PRESETS[preset]["train"]
    keys = (("train_steps_per_s", "train_peak_memory_mb", "train_first_call_s") if train
            else ("inference_images_per_s", "peak_memory_mb", "first_call_s"))
    speed, memory, first = keys

    def images_per_s(row):
        return row[speed] * batch if train else row[speed]

    measured = {name: row for name, row in cell["results"].items() if speed in row}
    references = [name for name in measured if name.startswith(REFERENCE_PREFIX)]
    best = max(references, key=lambda name: images_per_s(measured[name])) if references else None
    rows = []
    for name, row in cell["results"].items():
        if name not in measured:
            rows.append((name, row.get("error", ["no result"])))
            continue
        rate = images_per_s(row)
        share = rate * 2 * multiply_adds * (3 if train else 1) / 1e9 / peak_gflops if peak_gflops else None
        ratio = rate / images_per_s(measured[best]) if best else None
        memory_ratio = row[memory] / measured[best][memory] if best and measured[best][memory] else None
        rows.append((name, rate, ratio, row[memory], memory_ratio, row[first], share, name == best))
    return rows


def markdown(report):
    preset = report["preset"]
    batch = report["batch_size"]
    lines = [
        f"### {preset}: {PRESETS[preset]['title']}, batch {batch}, {report['resolution']}x{report['resolution']}",
        "",
        f"{report['date']}, {report['machine']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| model | precision | implementation | images/s | x best ref | peak MB | x best ref | first call s "
        "| of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    peaks = report.get("matmul_peaks") or {}

    def times(value):
        return "-" if value is None else f"{value:.2f}x"

    for cell in report["cells"]:
        peak = peaks.get(PEAK_OF_PRECISION[cell["precision"]])
        for row in cell_rows(preset, cell, peak, cell["multiply_adds"], batch):
            if len(row) == 2:
                lines.append(f"| {cell['model']} | {cell['precision']} | {row[0]} | failed: {' '.join(row[1])} "
                             "| | | | | |")
                continue
            name, rate, ratio, memory, memory_ratio, first, share, best = row
            lines.append(
                f"| {cell['model']} | {cell['precision']} | {name}{' (best ref)' if best else ''} | {rate:.1f} "
                f"| {times(ratio)} | {memory:.0f} | {times(memory_ratio)} | {first:.1f} "
                f"| {'-' if share is None else f'{share:.0%}'} |"
            )
    lines.append("")
    if "error" in peaks:
        lines.append(f"Matrix-multiply peak: failed: {' '.join(peaks['error'])}.")
    elif peaks:
        lines.append(
            "Matrix-multiply peaks, GFLOP/s (PyTorch, best square product of "
            f"{'/'.join(map(str, report['matmul_sizes']))}): "
            + ", ".join(f"{name} {value:.4g}" for name, value in peaks.items())
            + ". A float32 row's share is of the TF32 peak; training counts 3x the forward pass's products."
        )
    settings = {}
    for cell in report["cells"]:
        if cell["precision"] == "float32":
            for row in cell["results"].values():
                settings.update({k: v for k, v in row.items() if "tf32" in k or "matmul_precision" in k})
    if settings:
        lines.append("float32, as each framework runs it by default: "
                     + ", ".join(f"{key} {value}" for key, value in sorted(settings.items())) + ".")
    lines.append(
        "The reference: HF transformers' ConvNeXt, eager (under autocast in the mixed precisions) and tuned "
        "(channels_last + autocast + torch.compile); ratios are to the faster of the two in each cell. "
        + ("Peak MB: GPU memory the framework's allocator handed out above what it held before the model was "
           "built (JAX: since the process started)." if report["device"] == "cuda"
           else "Peak MB: resident host memory above the process's memory before the model was built.")
        + (" Training: the fine-tuning recipe's AdamW (layer decay, weight decay 0.05) in Keras; in the reference "
           "AdamW with its learning rate and weight decay; mixed_float16 with loss scaling. First call: the first "
           "training step, the first two under torch.compile (it compiles the second again)."
           if PRESETS[preset]["train"] else "")
    )
    if report["skipped"]:
        lines.append(
            f"Not reached within the time budget ({report['budget_s']:.0f} s): "
            + ", ".join(f"{model} {precision}" for model, precision in report["skipped"]) + "."
        )
    return "\n".join(lines) + "\n"


def run_presets(options, deadline=None):
    """Runs `options.preset`'s cells, taking turns between the presets; returns `{preset: report}`.

    Writes each preset's `<output_dir>/<preset>_<device>.json` and `.md`
    after every cell. `deadline` (time.monotonic()) stops starting cells.
    """
    from keras_convnext.models.variants import VARIANTS, multiply_adds

    for model in options.models:
        if model not in VARIANTS:
            raise ValueError(f"--models {model!r} is unknown; choose among {', '.join(VARIANTS)}.")
    base = {
        "resolution": options.resolution, "date": datetime.date.today().isoformat(),
        "machine": throughput.machine(options.device), "device": options.device,
        "versions": throughput._versions(), "budget_s": options.budget_s,
        "matmul_sizes": list(_matmul_sizes(options)),
        "matmul_peaks": measure_matmul_peaks(options, deadline),
    }
    reports = {
        preset: dict(base, preset=preset, batch_size=options.batch_size or PRESETS[preset]["batch_size"],
                     cells=[], skipped=[])
        for preset in options.preset
    }
    for model, precision in cells(options.models, options.precisions):
        variant = VARIANTS[model]
        operations = multiply_adds(variant.stage_depths, variant.stage_dims, (options.resolution,) * 2)
        for preset, report in reports.items():
            if deadline is not None and deadline - time.monotonic() < MIN_CELL_SECONDS:
                report["skipped"].append((model, precision))
            else:
                results = run_cell(options, preset, model, precision, deadline)
                report["cells"].append({"model": model, "precision": precision, "multiply_adds": operations,
                                        "results": results})
            name = f"{preset.replace('-', '_')}_{options.device}"
            throughput.write_report(name, report, markdown(report), options.output_dir)
    return reports


def main(argv=None, output_dir=throughput.DEFAULT_OUTPUT_DIR):
    """`run.py --preset gpu-inference|gpu-train ...`; returns the exit status."""
    options = build_parser(output_dir=output_dir).parse_args(argv)
    if options.matmul_peaks:
        print("RESULT " + json.dumps(matmul_peaks(options.device, options.matmul_sizes)))
        return 0
    deadline = None if options.budget_s is None else time.monotonic() + options.budget_s
    try:
        run_presets(options, deadline)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
