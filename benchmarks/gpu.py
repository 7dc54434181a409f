"""Everything a GPU run measures, in one command and a fixed time: parity, the GPU presets, host overhead.

    python benchmarks/gpu.py                      # on a machine with an NVIDIA GPU, about 10 minutes
    python benchmarks/gpu.py --budget-s 2400      # every cell of the presets (about 40 minutes on an H100)
    python benchmarks/gpu.py --device cpu --tiny  # the whole run on the CPU at toy sizes, to check it first

In order, each in its own processes:

1. `device_parity.py`: logits against the PyTorch reference on the device;
2. the host-overhead rows (`run.py --preset host-overhead`), on the CPU;
3. the `gpu-train` and `gpu-inference` presets (`keras_convnext.benchmark.presets`),
   taking turns per cell, most important cells first, with the time left.

Each step writes its own tables into `--output-dir` (`benchmarks/results`
by default); `gpu_summary.md` gathers them, with what was skipped and why.
The exit status is 0 when every step ran (rows that failed are in the
tables), 1 when a step could not run.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from keras_convnext.benchmark import presets, throughput  # noqa: E402

DEFAULT_BUDGET_S = 600.0
# The share of the budget each step may take at most; the presets get the rest.
PARITY_SHARE = 0.2
HOST_OVERHEAD_SHARE = 0.15
# The toy run: the smallest model, at the smallest size it takes, float32 and eager only.
# The host-overhead rows at toy sizes: two turns, one small training epoch, no torch.compile.
HOST_OVERHEAD_TINY = ["--turns", "2", "--train-turns", "1", "--train-images", "128", "--no-jit-compile"]
TINY = ["--models", "ConvNeXtV2Atto", "--precisions", "float32", "--resolution", "32", "--batch-size", "2",
        "--repeats", "2", "--references", "eager", "--matmul-sizes", "128"]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"the whole run's seconds (default: {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--backends", nargs="+", default=list(throughput.BACKENDS), choices=throughput.BACKENDS)
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes: V2 Atto at 32x32, batch 2, float32, eager; parity on 32x32 images")
    parser.add_argument("--steps", nargs="+", default=["parity", "host-overhead", "presets"],
                        choices=["parity", "host-overhead", "presets"])
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    return parser


def _run(command, seconds):
    """(exit status or None when stopped after `seconds`, the output's last lines).

    The command runs in its own process group, so that stopping it stops the
    workers it started too.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None, [f"stopped after {seconds:.0f} s"]
    return process.returncode, output.strip().splitlines()[-3:]


def parity(options, seconds):
    command = [sys.executable, os.path.join(HERE, "device_parity.py"), "--device", options.device,
               "--backends", *options.backends, "--output-dir", options.output_dir]
    command += ["--tiny"] if options.tiny else []
    status, tail = _run(command, seconds)
    if status == 0:
        return "ran", f"device_parity_{options.device}.md"
    return "failed", " ".join(tail)


def host_overhead(options, seconds):
    """The CPU host-overhead rows (`run.py --preset host-overhead`), whatever the device."""
    command = [sys.executable, os.path.join(HERE, "run.py"), "--preset", "host-overhead",
               "--backends", *options.backends, "--output-dir", options.output_dir]
    command += HOST_OVERHEAD_TINY if options.tiny else []
    status, tail = _run(command, seconds)
    return ("ran", "host_overhead.md") if status == 0 else ("failed", " ".join(tail))


def gpu_presets(options, deadline):
    arguments = ["--preset", "gpu-train", "gpu-inference", "--device", options.device,
                 "--backends", *options.backends, "--output-dir", options.output_dir,
                 "--budget-s", f"{max(0.0, deadline - time.monotonic()):.0f}"]
    reports = presets.run_presets(presets.build_parser().parse_args(arguments + (TINY if options.tiny else [])),
                                  deadline)
    skipped = sum(len(report["skipped"]) for report in reports.values())
    files = ", ".join(f"{preset.replace('-', '_')}_{options.device}.md" for preset in reports)
    return "ran", files + (f"; {skipped} cells not reached in the time budget" if skipped else "")


def main(argv=None):
    options = build_parser().parse_args(argv)
    start = time.monotonic()
    deadline = start + options.budget_s
    os.makedirs(options.output_dir, exist_ok=True)
    outcomes = []
    for step in options.steps:
        left = deadline - time.monotonic()
        if step == "parity":
            outcomes.append((step, *parity(options, min(PARITY_SHARE * options.budget_s, left))))
        elif step == "host-overhead":
            outcomes.append((step, *host_overhead(options, min(HOST_OVERHEAD_SHARE * options.budget_s, left))))
        else:
            outcomes.append((step, *gpu_presets(options, deadline)))
    lines = [f"# GPU run on {throughput.machine(options.device)}", "",
             f"{time.monotonic() - start:.0f} s of a {options.budget_s:.0f} s budget.", "",
             "| step | outcome | tables or reason |", "|---|---|---|"]
    lines += [f"| {step} | {outcome} | {detail} |" for step, outcome, detail in outcomes]
    for name in ["device_parity", "gpu_train", "gpu_inference"]:
        path = os.path.join(options.output_dir, f"{name}_{options.device}.md")
        if os.path.exists(path):
            with open(path) as f:
                lines += ["", f.read().strip()]
    throughput.write_report("gpu_summary", {"outcomes": outcomes}, "\n".join(lines) + "\n", options.output_dir)
    return 1 if any(outcome == "failed" for _, outcome, _ in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
