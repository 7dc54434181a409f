"""benchmarks/memory.py's own parts: its checkpoint is in the official naming, its table adds up."""

import os
import sys

import keras_convnext as kc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import memory  # noqa: E402


def test_written_state_dict_is_an_official_checkpoint_of_the_variant():
    variant = kc.VARIANTS["ConvNeXtV2Atto"]
    state = memory.official_state_dict(variant.stage_depths, variant.stage_dims, classes=1000)
    model = kc.ConvNeXtV2Atto(input_shape=(32, 32, 3))
    kc.load_weights(model, dict(state))  # every tensor used, every weight filled, exact shapes
    kernel = state["stages.2.5.pwconv1.weight"].T
    assert (model.get_layer("stage2_block5").pwconv1.kernel.numpy() == kernel).all()


def test_markdown_reports_added_memory_against_the_budget():
    report = {"model": "M", "backend": "jax", "import_first": "", "checkpoint_mb": 100.0, "results": [
        {"case": "file", "baseline_mb": 300.0, "peak_mb": 540.0, "model_mb": 100.0},
        {"case": "tag-first", "error": ["boom"]},
    ]}
    text = memory.markdown(report)
    assert "| file | 300 | 540 | 240 | 100 | 1.20 |" in text
    assert "| tag-first | failed: boom |" in text
