"""The host-overhead preset of benchmarks/run.py: its command line, its protocol and its tables (not speed)."""

import io
import json

import keras
import pytest

from keras_convnext.benchmark import host_overhead


def test_the_preset_is_asked_for_by_name_only():
    assert host_overhead.requested(["--preset", "host-overhead"])
    assert host_overhead.requested(["--rounds", "1", "--preset=host-overhead"])
    assert not host_overhead.requested(["--preset", "gpu"])
    assert not host_overhead.requested(["--preset"])
    assert not host_overhead.requested(["--model", "host-overhead"])


def test_training_worker_compiles_then_times_one_epoch_per_call():
    epochs = []
    output = io.StringIO()
    host_overhead.serve_training(lambda: epochs.append(1), io.StringIO("TIME 64 1\nTIME 64 2\nEXIT\n"), output)
    lines = output.getvalue().splitlines()
    assert lines[0] == "READY"
    assert [len(json.loads(line[len("TIMES "):])) for line in lines[1:]] == [1, 2]
    assert len(epochs) == 2 + 3  # two untimed epochs, then one per timed call


def test_tables_give_latency_ratios_steps_and_quartiles():
    report = {
        "date": "2026-12-07", "machine": "test CPU", "versions": {"keras": "3"},
        "paired": {
            "turns": 4, "calls": {"1": 5}, "errors": {"keras_convnext/tensorflow": ["boom"]},
            "latency_ms": {
                "pytorch-reference": {"1": [4.0, 4.0, 4.0, 4.0]},
                "keras_convnext/torch": {"1": [4.0, 2.0, 8.0, 4.0]},  # ratios 1, 2, 0.5, 1
            },
        },
        "training": {
            "turns": 3, "batch_size": 64, "images": 1437, "steps_per_epoch": 23, "errors": {},
            "latency_ms": {
                "keras_convnext/jax": {"64": [2300.0, 2300.0, 2300.0]},
                "keras_convnext/torch": {"64": [4600.0, 2300.0, 4600.0]},  # ratios 0.5, 1, 0.5
            },
        },
    }
    text = host_overhead.markdown(report)
    inference, training = text.split("Training:")
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
             for line in inference.splitlines() if line.startswith("| ")}
    assert "Host overhead: ConvNeXtV2Atto, 32x32" in text and "2026-12-07, test CPU, keras 3" in text
    assert cells["pytorch-reference"] == ["4.0", "1.00x", "-"]
    assert cells["keras_convnext/torch"][:3] == ["4.0", "1.00x", "0.88x-1.25x"]
    assert cells["keras_convnext/tensorflow"][0] == "failed: boom"
    assert "| keras_convnext/jax | 10.00 | 1.00x | - |" in training
    assert "| keras_convnext/torch | 5.00 | 0.50x | 0.50x-0.75x |" in training


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "torch", reason="one smoke run, in the PyTorch backend's test run")
def test_a_tiny_preset_run_writes_both_tables(tmp_path):
    pytest.importorskip("transformers")
    argv = ["--preset", "host-overhead", "--backends", "torch", "--no-jit-compile", "--turns", "1",
            "--train-turns", "1", "--train-images", "8", "--train-batch-size", "8", "--name", "smoke",
            "--output-dir", str(tmp_path)]
    assert host_overhead.main(argv) == 0
    report = json.loads((tmp_path / "smoke.json").read_text())
    latency = report["paired"]["latency_ms"]
    assert report["paired"]["errors"] == {} and report["training"]["errors"] == {}
    assert set(latency) == {"pytorch-reference", "keras_convnext/torch"}
    assert all(len(value["1"]) == 1 and value["1"][0] > 0 for value in latency.values())
    assert report["training"]["steps_per_epoch"] == 1
    assert report["training"]["latency_ms"]["keras_convnext/torch"]["8"][0] > 0
    text = (tmp_path / "smoke.md").read_text()
    assert "| keras_convnext/torch |" in text and "| implementation | steps/s | x JAX | quartiles |" in text
