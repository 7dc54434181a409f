"""The ResNet-50 to ConvNeXt-T roadmap: sizes against the paper, networks against transformers."""

import dataclasses

import numpy as np
import pytest

import keras

import keras_convnext
from keras_convnext import roadmap
from tests.conftest import randomize_torch_model

# Where our count, by the paper's rules, rounds to another figure than the
# paper's (docs/roadmap.md, "Where the counts differ", says why).
ROUNDED_DIFFERENTLY = {"inverted_bottleneck": 4.7}


@pytest.fixture(scope="module")
def counts():
    """`counts(step, **changes)`: `roadmap.count` at 224x224, each network built once."""
    cache = {}

    def count(step, **changes):
        key = (step, tuple(sorted(changes.items())))
        if key not in cache:
            cache[key] = roadmap.count(step, **changes)
        return cache[key]

    return count


@pytest.mark.parametrize("step", roadmap.STEPS, ids=roadmap.STEP_NAMES)
def test_gflops_match_the_paper(step, counts):
    expected = ROUNDED_DIFFERENTLY.get(step.name, step.paper_gflops)
    assert round(counts(step.name).flops / 1e9, 1) == expected


def test_inverted_bottleneck_convolutions_alone_match_the_paper(counts):
    sizes = counts("inverted_bottleneck")
    assert round(sizes.convolution_flops / 1e9, 1) == 4.6
    assert round(sizes.flops / 1e9, 2) == 4.69


def test_first_step_is_resnet50_and_last_is_convnext_tiny(counts):
    assert counts("resnet50").parameters == 25_557_032
    with keras.StatelessScope():
        tiny_parameters = keras_convnext.ConvNeXtTiny(weights=None).count_params()
    assert counts("separate_downsampling").parameters == tiny_parameters == 28_589_128


@pytest.mark.parametrize("kernel_size", [5, 9, 11])
def test_kernel_size_sweep_matches_the_paper(kernel_size, counts):
    gflops = counts("move_up_depthwise", spatial_kernel_size=kernel_size).flops / 1e9
    assert round(gflops, 1) == roadmap.KERNEL_SIZE_SWEEP[kernel_size][0]


def test_kernel_size_sweep_ends_are_the_steps_around_it():
    assert roadmap.step_config("move_up_depthwise", spatial_kernel_size=3) == roadmap.step_config(
        "move_up_depthwise"
    )
    assert roadmap.step_config("move_up_depthwise", spatial_kernel_size=7) == roadmap.step_config("kernel_7")
    models = roadmap.kernel_size_sweep((5,), classes=3, input_shape=(32, 32, 3))
    assert models[5].get_layer("stage0_block0_spatial").kernel_size == (5, 5)


def test_every_step_is_one_declared_change():
    previous = roadmap.RESNET50
    for step in roadmap.STEPS[1:]:
        config = roadmap.step_config(step.name)
        changed = {
            field.name
            for field in dataclasses.fields(config)
            if getattr(config, field.name) != getattr(previous, field.name)
        }
        assert changed == set(step.change), step.name
        previous = config


def test_unknown_steps_and_settings_are_named():
    with pytest.raises(ValueError, match="Unknown roadmap step 'resnet101'; the steps are resnet50, "):
        roadmap.build("resnet101")
    with pytest.raises(ValueError, match="Unknown roadmap setting in \\['kernel'\\]"):
        roadmap.step_config("kernel_7", kernel=5)
    with pytest.raises(ValueError, match="norm must be one of"):
        roadmap.step_config("kernel_7", norm="group")
    with pytest.raises(ValueError, match="at least 32"):
        roadmap.build("resnet50", input_shape=(16, 16, 3))


def test_flop_counter_needs_a_fixed_input_size():
    model = roadmap.build("separate_downsampling", classes=3, input_shape=(None, None, 3))
    with pytest.raises(ValueError, match="one input size"):
        roadmap.count_flops(model)


def _hf_counts(model, image_size=224):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    # torch counts a multiply-accumulate as two FLOPs.
    return sum(parameter.numel() for parameter in model.parameters()), counter.get_total_flops() // 2


def test_endpoint_sizes_match_transformers(counts):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        resnet = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000))
        convnext = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(num_labels=1000))
    for step, reference in (("resnet50", resnet), ("separate_downsampling", convnext)):
        sizes = counts(step)
        assert (sizes.parameters, sizes.convolution_flops) == _hf_counts(reference), step
