"""The benchmark scripts: their arithmetic (ratios, peaks, memory measurement) and benchmarks/gpu.py end to end at toy sizes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from keras_convnext.benchmark import throughput as run  # noqa: E402


def _row(images_per_s, latency_ms, memory_mb, **extra):
    return {
        "inference_images_per_s": images_per_s, "batch1_latency_ms": latency_ms, "first_call_s": 1.0,
        "first_call_peak_memory_mb": memory_mb * 2, "peak_memory_mb": memory_mb, **extra,
    }


def test_markdown_ratios_and_peaks():
    report = {
        "model": "ConvNeXtV2Tiny", "batch_size": 8, "train_batch_size": 16, "resolution": 224,
        "precision": "mixed_bfloat16", "multiply_adds": 4_455_531_264, "date": "2026-11-25",
        "machine": "test CPU", "versions": {"keras": "3"},
        "results": {
            "pytorch-reference": _row(10.0, 60.0, 300.0, train_steps_per_s=0.2, matmul_peak_gflops=220.0,
                                      bfloat16_matmul_peak_gflops=900.0),
            "keras_convnext/jax": _row(20.0, 30.0, 330.0, train_steps_per_s=0.1, matmul_peak_gflops=480.0,
                                       page_faults_per_call=2500.0),
            "keras_convnext/torch": {"error": ["boom"]},
        },
    }
    text = run.markdown(report)
    jax_row = next(line for line in text.splitlines() if line.startswith("| keras_convnext/jax"))
    cells = [cell.strip() for cell in jax_row.strip("|").split("|")]
    # images/s x ref, batch-1 x ref (reference time / ours), train x ref, memory of ref
    assert cells[2] == "2.00x" and cells[4] == "2.00x" and cells[6] == "0.50x" and cells[9] == "1.10x"
    gflops = 20.0 * 2 * 4_455_531_264 / 1e9
    assert cells[10] == f"{gflops:.1f}" and cells[11] == f"{gflops / 480.0:.0%}"
    assert "Matrix-multiply peak: 480.0 GFLOP/s" in text and "jax 480.0" in text
    assert "bfloat16 square products, GFLOP/s: pytorch-reference 900.0." in text
    assert "| keras_convnext/torch | failed: boom |" in text
    assert "Minor page faults per inference call (batch 8; " in text and "): keras_convnext/jax 2500." in text


def test_rounds_report_medians_and_each_rounds_ratios():
    def round_(reference_ips, jax_ips, torch_row):
        return {
            "pytorch-reference": _row(reference_ips, 60.0, 300.0, train_steps_per_s=0.2),
            "keras_convnext/jax": _row(jax_ips, 30.0, 330.0, train_steps_per_s=0.1),
            "keras_convnext/torch": torch_row,
        }

    rounds = [
        round_(10.0, 20.0, {"error": ["boom"]}),
        round_(20.0, 30.0, _row(25.0, 40.0, 310.0)),
        round_(12.0, 18.0, {"error": ["bang"]}),
    ]
    merged = run.median_results(rounds)
    assert merged["pytorch-reference"]["inference_images_per_s"] == 12.0
    assert merged["keras_convnext/jax"]["inference_images_per_s"] == 20.0
    assert merged["keras_convnext/torch"]["inference_images_per_s"] == 25.0  # the one round it ran
    assert run.median_results([rounds[0]])["keras_convnext/torch"] == {"error": ["boom"]}
    # per round: 20/10, 30/20, 18/12
    assert run.round_ratios(rounds, "inference_images_per_s")["keras_convnext/jax"] == [2.0, 1.5, 1.5]
    report = {
        "model": "ConvNeXtV2Tiny", "batch_size": 8, "train_batch_size": 16, "resolution": 224,
        "precision": "float32", "multiply_adds": 4_455_531_264, "date": "2026-11-25",
        "machine": "test CPU", "versions": {"keras": "3"}, "results": merged, "rounds": rounds,
    }
    text = run.markdown(report)
    assert "Medians of 3 rounds" in text
    assert "- images/s: keras_convnext/jax 1.50x-2.00x, keras_convnext/torch 1.25x-1.25x" in text


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_steady_inference_counts_later_calls_not_the_first():
    kept = []

    def call():
        if not kept:  # the first call: a large transient, as tracing and compiling are
            np.ones(200 * 2**20 // 8).sum()
        buffer = np.ones(40 * 2**20 // 8)  # every call: 40 MB of working memory
        kept.append(float(buffer[0]))

    baseline = run._baseline_mb()
    first, seconds, first_peak, steady_peak = run._steady_inference(call, 2, baseline)
    assert first > 0 and seconds > 0
    assert first_peak >= 190
    assert 30 <= steady_peak < 150


def test_page_faults_count_fresh_pages_of_each_call():
    pytest.importorskip("resource")
    import mmap

    size = 16 * 2**20

    def write_pages(memory):
        for offset in range(0, size, 4096):
            memory[offset] = 1

    kept = mmap.mmap(-1, size)
    write_pages(kept)
    fresh = run._page_faults_per_call(lambda: write_pages(mmap.mmap(-1, size)))
    reused = run._page_faults_per_call(lambda: write_pages(kept))
    # 4096 pages of 4 KB; at least one fault per 2 MB where the system backs them with huge pages
    assert fresh >= size / 2**21
    assert reused <= fresh / 4


def test_medians_keep_settings_and_gpu_markdown_names_its_memory_and_precision():
    def gpu_row(images_per_s, **extra):
        return _row(images_per_s, 5.0, 250.0, device="NVIDIA H100", **{"peak_memory_includes_first_call": False, **extra})

    rounds = [
        {"pytorch-reference": gpu_row(1000.0, torch_cudnn_tf32=True),
         "keras_convnext/jax": gpu_row(1500.0, jax_default_matmul_precision="default",
                                      peak_memory_includes_first_call=True)},
        {"pytorch-reference": gpu_row(1200.0, torch_cudnn_tf32=True),
         "keras_convnext/jax": gpu_row(1300.0, jax_default_matmul_precision="default",
                                      peak_memory_includes_first_call=True)},
    ]
    merged = run.median_results(rounds)
    assert merged["pytorch-reference"]["inference_images_per_s"] == 1100.0
    assert merged["pytorch-reference"]["device"] == "NVIDIA H100"
    assert merged["pytorch-reference"]["torch_cudnn_tf32"] is True
    assert merged["keras_convnext/jax"]["peak_memory_includes_first_call"] is True
    report = {
        "model": "ConvNeXtV2Tiny", "batch_size": 8, "train_batch_size": 16, "resolution": 224,
        "precision": "float32", "multiply_adds": 4_455_531_264, "date": "2026-11-26",
        "machine": "NVIDIA H100", "device": "cuda", "versions": {"keras": "3"}, "results": merged, "rounds": rounds,
    }
    text = run.markdown(report)
    assert "GPU memory that the framework's allocator handed out" in text
    assert "(JAX: since the process started" in text
    assert "jax_default_matmul_precision default, torch_cudnn_tf32 True" in text
    assert "resident memory" not in text


def test_device_environment_hides_or_shares_the_gpu():
    assert run.device_environment("cpu") == {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    cuda = run.device_environment("cuda")
    assert cuda["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and "CUDA_VISIBLE_DEVICES" not in cuda


def test_malloc_reuse_reaches_every_worker_and_the_table_says_so(monkeypatch):
    from keras_convnext.process import REUSE_FREED_MEMORY_ENVIRONMENT

    for key in REUSE_FREED_MEMORY_ENVIRONMENT:  # as a shell that exported them would pass them on
        monkeypatch.delenv(key, raising=False)
    reused = run.backend_environment("jax", "cpu", "reuse")
    assert all(reused[key] == value for key, value in REUSE_FREED_MEMORY_ENVIRONMENT.items())
    default = run.backend_environment("torch", "cpu")
    assert not any(key in default for key in REUSE_FREED_MEMORY_ENVIRONMENT)
    report = {
        "model": "ConvNeXtV2Tiny", "batch_size": 8, "train_batch_size": 16, "resolution": 224,
        "precision": "float32", "multiply_adds": 1, "date": "2026-11-29", "machine": "test CPU",
        "versions": {"keras": "3"}, "results": {"pytorch-reference": _row(10.0, 60.0, 300.0)},
    }
    assert "MALLOC_" not in run.markdown(report)
    text = run.markdown(dict(report, malloc="reuse"))
    assert "in every process, the reference's included: MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0" in text


def test_steady_inference_without_a_resettable_peak_reports_the_first_calls():
    class Meter:  # as JAX's GPU allocator: a peak since the start, no reset
        peak_mb = 0.0

        def peak(self):
            return self.peak_mb

        def reset(self):
            return False

    meter = Meter()

    def call():
        meter.peak_mb = max(meter.peak_mb, 120.0)

    first, seconds, first_peak, steady_peak = run._steady_inference(call, 2, 20.0, meter)
    assert first_peak == 100.0 and steady_peak is None
    result = run._inference_result(
        type("Args", (), {"batch_size": 4})(), first, seconds, seconds, first_peak, steady_peak
    )
    assert result["peak_memory_mb"] == 100.0 and result["peak_memory_includes_first_call"] is True


def test_worker_errors_keep_the_exception_line():
    output = (
        "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
        "RuntimeError: Exception encountered when calling LayerNorm.call().\n\n"
        "expected scalar type BFloat16 but found Float\n\nArguments received by LayerNorm.call():\n"
        "  • inputs=torch.Tensor(shape=torch.Size([8, 56, 56, 96]), dtype=bfloat16)\n"
    )
    assert run._error_lines(output) == [
        "RuntimeError: Exception encountered when calling LayerNorm.call().",
        "expected scalar type BFloat16 but found Float",
        "• inputs=torch.Tensor(shape=torch.Size([8, 56, 56, 96]), dtype=bfloat16)",
    ]
    assert run._error_lines("ValueError: bad\n") == ["ValueError: bad"]
    assert run._error_lines("") == ["no output"]


def test_machine_line_names_the_gpu_before_the_host(monkeypatch):
    monkeypatch.setattr(run, "_cpu", lambda: "Some CPU x2 (AVX2)")
    monkeypatch.setattr(run, "_gpu", lambda: "Some GPU, 80 GiB")
    assert run.machine("cpu") == "Some CPU x2 (AVX2)"
    assert run.machine("cuda") == "Some GPU, 80 GiB, host Some CPU x2 (AVX2)"


def test_serve_warms_then_times_each_request_after_an_untimed_call():
    import io

    calls = []
    output = io.StringIO()
    run.serve(calls.append, [1, 8], io.StringIO("TIME 1 3\nTIME 8 2\nEXIT\nTIME 1 9\n"), output)
    lines = output.getvalue().splitlines()
    assert lines[0] == "READY" and len(lines) == 3
    assert [len(json.loads(line[len("TIMES "):])) for line in lines[1:]] == [3, 2]
    # two warm-up calls per batch size, then one untimed call before each request's timed ones
    assert calls == [1, 1, 8, 8] + [1] * 4 + [8] * 3


_FAKE_WORKER = """
import json, sys
name, latency_ms, failure, log = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
if failure == "at start":
    raise ValueError("no such variant: " + name)
print("a line of framework output")
print("READY", flush=True)
for request, line in enumerate(sys.stdin):
    words = line.split()
    if words[0] == "EXIT":
        break
    if failure == "second request" and request == 1:
        sys.exit("RuntimeError: out of memory in " + name)
    if failure == "hangs" and request == 1:
        import time
        time.sleep(600)
    with open(log, "a") as f:
        f.write(name + " " + words[1] + "\\n")
    scale = 1.0 if words[1] == "1" else 6.0
    print("TIMES " + json.dumps([latency_ms * scale / 1000] * int(words[2])), flush=True)
"""


def test_paired_latency_times_every_worker_in_rotating_turns_and_keeps_failures(tmp_path):
    script, log = tmp_path / "worker.py", tmp_path / "requests.log"
    script.write_text(_FAKE_WORKER)

    def worker(name, latency_ms, failure="none"):
        return [sys.executable, str(script), name, str(latency_ms), failure, str(log)], dict(os.environ)

    workers = {
        "pytorch-reference": worker("reference", 20.0),
        "keras_convnext/jax": worker("jax", 10.0),
        "keras_convnext/tensorflow": worker("tensorflow", 40.0, "second request"),
        "keras_convnext/torch": worker("torch", 5.0, "at start"),
    }
    paired = run.paired_latency(workers, [1, 8], 3, {1: 5, 8: 2}, pause=0.0)
    latency = paired["latency_ms"]
    assert set(latency) == {"pytorch-reference", "keras_convnext/jax"}
    assert latency["pytorch-reference"] == {"1": [20.0] * 3, "8": [120.0] * 3}
    assert run.paired_ratios(latency, 1) == {"keras_convnext/jax": [2.0] * 3}
    assert paired["errors"]["keras_convnext/torch"][0] == "ValueError: no such variant: torch"
    assert paired["errors"]["keras_convnext/tensorflow"][-1] == "RuntimeError: out of memory in tensorflow"
    requests = [line.split() for line in log.read_text().splitlines()]
    # turn 0, batch 1: reference, jax, tensorflow (which dies on its next request); batch 8: reference, jax;
    # turn 1 starts one further on: jax first, then the reference
    assert requests[:5] == [["reference", "1"], ["jax", "1"], ["tensorflow", "1"], ["reference", "8"], ["jax", "8"]]
    assert requests[5:7] == [["jax", "1"], ["reference", "1"]]

    report = {
        "model": "ConvNeXtV2Tiny", "batch_size": 8, "train_batch_size": 0, "resolution": 224,
        "precision": "float32", "multiply_adds": 1, "date": "2026-11-27", "machine": "test CPU",
        "versions": {"keras": "3"}, "results": {}, "rounds": [],
        "paired": {"turns": 3, "calls": {"1": 5, "8": 2}, **paired},
    }
    text = run.markdown(report)
    assert "| images/s |" not in text  # no per-process rounds ran
    assert "3 turns; in each, every implementation timed 5 calls at batch 1 and 2 calls at batch 8" in text
    assert "| keras_convnext/jax | 10.0 | 2.00x | 2.00x-2.00x | 60.0 | 2.00x | 2.00x-2.00x |" in text
    assert "| pytorch-reference | 20.0 | 1.00x | - | 120.0 | 1.00x | - |" in text
    assert "| keras_convnext/torch | failed: ValueError: no such variant: torch |" in text
    assert "Against keras.applications" not in text

    report["paired"]["latency_ms"]["keras.applications/jax"] = {"1": [35.0, 25.0, 30.0], "8": [240.0] * 3}
    text = run.markdown(report)
    assert "keras.applications ms / ours): jax 3.00x at batch 1, 4.00x at batch 8." in text

    # a worker that hangs is stopped; the others are still measured
    workers = {"pytorch-reference": worker("reference", 20.0), "keras_convnext/jax": worker("jax", 10.0, "hangs")}
    paired = run.paired_latency(workers, [1], 3, {1: 2}, pause=0.0, answer_timeout=3.0)
    assert paired["errors"] == {"keras_convnext/jax": ["no answer within 3 s; the worker was stopped"]}
    assert paired["latency_ms"] == {"pytorch-reference": {"1": [20.0] * 3}}


def test_bf16_agreement_writes_its_results_under_the_name_given(monkeypatch, tmp_path):
    import bf16_agreement

    written, commands = [], []
    monkeypatch.setattr(bf16_agreement, "run_in_backend", lambda command, backend, device: commands.append(command))
    monkeypatch.setattr(bf16_agreement, "markdown", lambda report: "table")
    monkeypatch.setattr(bf16_agreement, "write_report",
                        lambda name, report, text, directory: written.append((name, os.path.basename(directory))))
    weights = str(tmp_path / "trained.keras")
    argv = ["--weights", weights, "--backends", "jax"]
    bf16_agreement.main(argv + ["--name", "bf16_agreement_atto_zen5"])
    bf16_agreement.main(argv)
    assert written == [("bf16_agreement_atto_zen5", "results"), ("bf16_agreement_ConvNeXtV2Atto", "results")]
    assert all("--weights" in command and weights in command for command in commands)


def test_workers_import_the_same_package_and_leave_out_what_is_not_asked_for():
    import keras_convnext

    environment = run.backend_environment("jax")
    assert environment["PYTHONPATH"].split(os.pathsep)[0] == os.path.dirname(os.path.dirname(keras_convnext.__file__))
    args = run.build_parser().parse_args(["--backends", "jax", "--no-reference", "--no-matmul-peak"])
    assert run._implementations(args) == [("keras_convnext/jax", "jax", "keras_convnext")]
    command = run._worker_command(args, ["--worker", "keras_convnext"])
    assert command[1:3] == ["-m", "keras_convnext.benchmark"] and "--no-matmul-peak" in command
    assert run.build_parser().parse_args([]).output_dir == "benchmark_results"
    with pytest.raises(ValueError, match="ConvNeXtGiant"):
        run.main(["--model", "ConvNeXtGiant"])


def _preset_cell(model, precision, results):
    return {"model": model, "precision": precision, "multiply_adds": 1_000_000_000, "results": results}


def test_gpu_preset_tables_rank_against_the_best_reference_and_list_what_was_not_reached():
    from keras_convnext.benchmark import presets

    def trained(steps_per_s, memory_mb, **extra):
        return {"train_steps_per_s": steps_per_s, "train_peak_memory_mb": memory_mb, "train_first_call_s": 2.0,
                **extra}

    report = {
        "preset": "gpu-train", "batch_size": 128, "resolution": 224, "date": "2026-12-07", "device": "cuda",
        "machine": "Some GPU", "versions": {"keras": "3"}, "budget_s": 600.0, "matmul_sizes": [8192],
        "matmul_peaks": {"float32": 50_000.0, "tf32": 400_000.0, "bfloat16": 768_000.0, "float16": 800_000.0},
        "cells": [
            _preset_cell("ConvNeXtV2Tiny", "mixed_bfloat16", {
                "pytorch-reference/eager": trained(2.0, 9000.0),
                "pytorch-reference/tuned": trained(4.0, 6000.0),
                "keras_convnext/jax": trained(5.0, 4500.0),
                "keras_convnext/torch": {"error": ["RuntimeError: out of memory"]},
            }),
            _preset_cell("ConvNeXtV2Tiny", "float32", {
                "pytorch-reference/eager": trained(1.0, 9000.0, torch_cudnn_tf32=True, torch_matmul_tf32=False),
                "keras_convnext/jax": trained(1.0, 9000.0, jax_default_matmul_precision="default"),
            }),
        ],
        "skipped": [("ConvNeXtV2Base", "mixed_float16")],
    }
    lines = presets.markdown(report).splitlines()
    tuned = next(line for line in lines if "pytorch-reference/tuned" in line and "bfloat16" in line)
    jax = next(line for line in lines if "keras_convnext/jax" in line and "bfloat16" in line)
    # 5 steps/s of 128 images = 640 images/s, 1.25x the tuned reference's 512; memory 4500 / 6000;
    # 640 images x 2 x 3 x 1e9 multiply-adds = 3.84 TFLOP/s, 0.5% of the bfloat16 peak's 768
    assert "(best ref) | 512.0 | 1.00x | 6000 | 1.00x | 2.0 |" in tuned
    assert jax.endswith("| keras_convnext/jax | 640.0 | 1.25x | 4500 | 0.75x | 2.0 | 0% |")
    assert next(line for line in lines if "pytorch-reference/eager" in line and "bfloat16" in line).startswith(
        "| ConvNeXtV2Tiny | mixed_bfloat16 | pytorch-reference/eager | 256.0 | 0.50x | 9000 | 1.50x |")
    assert "| keras_convnext/torch | failed: RuntimeError: out of memory |" in "\n".join(lines)
    text = "\n".join(lines)
    assert "float32, as each framework runs it by default: jax_default_matmul_precision default, " \
           "torch_cudnn_tf32 True, torch_matmul_tf32 False." in text
    assert "Not reached within the time budget (600 s): ConvNeXtV2Base mixed_float16." in text
    assert "tf32 4e+05" in text and "loss scaling" in text


def test_gpu_preset_workers_get_the_presets_batch_optimizer_and_references():
    from keras_convnext.benchmark import presets

    options = presets.build_parser().parse_args(["--preset", "gpu-train", "--backends", "jax", "--torch-compile"])
    train = presets.worker_arguments(options, "gpu-train", "ConvNeXtV2Base", "mixed_float16")
    assert (train.batch_size, train.train_batch_size, train.inference, train.optimizer) == (128, 128, False, "finetune")
    assert not train.matmul_peak and not train.batch1_latency
    inference = presets.worker_arguments(options, "gpu-inference", "ConvNeXtV2Tiny", "float32")
    assert (inference.batch_size, inference.train_batch_size, inference.inference) == (256, 0, True)
    assert presets.implementations(options, "float32") == [
        ("pytorch-reference/eager", "torch", "reference"), ("pytorch-reference/tuned", "torch", "reference_tuned"),
        ("keras_convnext/jax", "jax", "keras_convnext"),
    ]
    assert presets.implementations(options, "mixed_bfloat16")[0] == (
        "pytorch-reference/eager", "torch", "reference_autocast")
    # the worker's command line carries the settings over
    command = run._worker_command(train, ["--worker", "reference_tuned"])
    assert "--no-inference" in command and command[command.index("--optimizer") + 1] == "finetune"


def test_gpu_presets_take_turns_per_cell_and_stop_at_the_budget(monkeypatch, tmp_path):
    from keras_convnext.benchmark import presets

    clock = [0.0]
    ran = []

    def run_cell(options, preset, model, precision, deadline):
        ran.append((preset, model, precision))
        clock[0] += 100.0
        return {"pytorch-reference/eager": {"inference_images_per_s": 10.0, "peak_memory_mb": 1.0,
                                            "first_call_s": 1.0, "train_steps_per_s": 1.0,
                                            "train_peak_memory_mb": 1.0, "train_first_call_s": 1.0}}

    monkeypatch.setattr(presets, "run_cell", run_cell)
    monkeypatch.setattr(presets, "measure_matmul_peaks", lambda options, deadline: {"error": ["not measured"]})
    monkeypatch.setattr(presets.time, "monotonic", lambda: clock[0])
    options = presets.build_parser().parse_args(
        ["--preset", "gpu-train", "gpu-inference", "--output-dir", str(tmp_path), "--budget-s", "150"])
    reports = presets.run_presets(options, deadline=150.0)
    assert ran == [("gpu-train", "ConvNeXtV2Tiny", "mixed_bfloat16"),
                   ("gpu-inference", "ConvNeXtV2Tiny", "mixed_bfloat16")]
    assert reports["gpu-train"]["skipped"][0] == ("ConvNeXtV2Base", "mixed_bfloat16")
    assert len(reports["gpu-inference"]["skipped"]) == 5
    text = (tmp_path / "gpu_inference_cuda.md").read_text()
    assert "Matrix-multiply peak: failed: not measured." in text and "ConvNeXtV2Base mixed_float16" in text
    assert json.loads((tmp_path / "gpu_train_cuda.json").read_text())["cells"][0]["model"] == "ConvNeXtV2Tiny"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KERAS_BACKEND") != "torch",
                    reason="the script starts its own process per backend; the PyTorch run covers it")
def test_gpu_script_runs_every_step_on_the_cpu_at_toy_sizes(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The host-overhead step has its own end-to-end test (tests/test_host_overhead.py).
    steps = ["parity", "presets"]
    command = [sys.executable, os.path.join(root, "benchmarks", "gpu.py"), "--device", "cpu", "--tiny",
               "--backends", "torch", "--output-dir", str(tmp_path), "--budget-s", "900", "--steps", *steps]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1000)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    summary = (tmp_path / "gpu_summary.md").read_text()
    assert "| parity | ran | device_parity_cpu.md |" in summary
    assert "| presets | ran | gpu_train_cpu.md, gpu_inference_cpu.md |" in summary
    parity = json.loads((tmp_path / "device_parity_cpu.json").read_text())["results"]["torch"]
    assert parity["ConvNeXtV2Atto"]["full_float32"]["max_abs"] < 1e-3
    train = json.loads((tmp_path / "gpu_train_cpu.json").read_text())
    inference = json.loads((tmp_path / "gpu_inference_cpu.json").read_text())
    for report, key in ((train, "train_steps_per_s"), (inference, "inference_images_per_s")):
        assert report["skipped"] == [] and report["matmul_peaks"]["float32"] > 0
        (cell,) = report["cells"]
        assert (cell["model"], cell["precision"]) == ("ConvNeXtV2Atto", "float32")
        assert set(cell["results"]) == {"pytorch-reference/eager", "keras_convnext/torch"}
        assert all(row[key] > 0 for row in cell["results"].values()), cell["results"]
    assert "| ConvNeXtV2Atto | float32 | keras_convnext/torch |" in summary
