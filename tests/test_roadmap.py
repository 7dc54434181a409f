"""The ResNet-50 to ConvNeXt-T roadmap: sizes against the paper, networks against transformers."""

import dataclasses

import numpy as np
import pytest

import keras

import keras_convnext
from keras_convnext import roadmap
from tests.conftest import hf_reference, random_images, randomize_torch_model, torch_logits

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


# The counts are read off the Keras graph, the same on every backend: the per-step table is
# checked once, in the JAX run, which builds the graphs fastest. Every backend builds and
# runs the end points against transformers below.
table_once = pytest.mark.skipif(keras.backend.backend() != "jax", reason="the count table is checked in the JAX run")


@table_once
@pytest.mark.parametrize("step", roadmap.STEPS, ids=roadmap.STEP_NAMES)
def test_gflops_match_the_paper(step, counts):
    expected = ROUNDED_DIFFERENTLY.get(step.name, step.paper_gflops)
    assert round(counts(step.name).flops / 1e9, 1) == expected


@table_once
def test_inverted_bottleneck_convolutions_alone_match_the_paper(counts):
    sizes = counts("inverted_bottleneck")
    assert round(sizes.convolution_flops / 1e9, 1) == 4.6
    assert round(sizes.flops / 1e9, 2) == 4.69


def test_first_step_is_resnet50_and_last_is_convnext_tiny(counts):
    assert counts("resnet50").parameters == 25_557_032
    with keras.StatelessScope():
        tiny_parameters = keras_convnext.ConvNeXtTiny(weights=None).count_params()
    assert counts("separate_downsampling").parameters == tiny_parameters == 28_589_128


@table_once
@pytest.mark.parametrize("kernel_size", [5, 9, 11])
def test_kernel_size_sweep_matches_the_paper(kernel_size, counts):
    gflops = counts("move_up_depthwise", spatial_kernel_size=kernel_size).flops / 1e9
    assert round(gflops, 1) == roadmap.KERNEL_SIZE_SWEEP[kernel_size][0]


def test_kernel_size_sweep_ends_are_the_steps_around_it():
    assert roadmap.step_config("move_up_depthwise", spatial_kernel_size=3) == roadmap.step_config(
        "move_up_depthwise"
    )
    assert roadmap.step_config("move_up_depthwise", spatial_kernel_size=7) == roadmap.step_config("kernel_7")
    with keras.StatelessScope():
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


# Checkpoint layouts as tables: our layer <- the reference's tensors, each
# with its transpose: conv (2, 3, 1, 0), depthwise (2, 3, 0, 1), Linear as a
# 1x1 conv (1, 0) then a (1, 1) prefix, Linear as Dense `.T`.
def _conv(tensor):
    return tensor.transpose(2, 3, 1, 0)


def _depthwise(tensor):
    return tensor.transpose(2, 3, 0, 1)


def _linear_as_conv(tensor):
    return tensor.T[None, None]


def _same(tensor):
    return tensor


def _batch_norm_rows(ours, theirs):
    suffixes = ("weight", "bias", "running_mean", "running_var")
    return [(ours, [f"{theirs}.{suffix}" for suffix in suffixes], _same)]


def resnet50_rows():
    """Our ResNet-50 step <- transformers' ResNetForImageClassification."""
    rows = [("stem_conv", ["resnet.embedder.embedder.convolution.weight"], _conv)]
    rows += _batch_norm_rows("stem_norm", "resnet.embedder.embedder.normalization")
    for stage, depth in enumerate((3, 4, 6, 3)):
        for block in range(depth):
            ours, theirs = f"stage{stage}_block{block}", f"resnet.encoder.stages.{stage}.layers.{block}"
            if block == 0:
                rows.append((f"{ours}_shortcut_conv", [f"{theirs}.shortcut.convolution.weight"], _conv))
                rows += _batch_norm_rows(f"{ours}_shortcut_norm", f"{theirs}.shortcut.normalization")
            for index, (conv, norm) in enumerate(
                (("pointwise_in", "norm"), ("spatial", "norm1"), ("pointwise_out", "norm2"))
            ):
                rows.append((f"{ours}_{conv}", [f"{theirs}.layer.{index}.convolution.weight"], _conv))
                rows += _batch_norm_rows(f"{ours}_{norm}", f"{theirs}.layer.{index}.normalization")
    rows.append(("predictions", ["classifier.1.weight", "classifier.1.bias"], lambda tensor: tensor.T))
    return rows


def convnext_tiny_rows():
    """Our ConvNeXt-T step <- transformers' ConvNextForImageClassification."""
    pair = ["weight", "bias"]
    rows = [
        ("stem_conv", [f"convnext.embeddings.patch_embeddings.{p}" for p in pair], _conv),
        ("stem_norm", [f"convnext.embeddings.layernorm.{p}" for p in pair], _same),
    ]
    for stage, depth in enumerate((3, 3, 9, 3)):
        theirs = f"convnext.encoder.stages.{stage}"
        if stage > 0:
            rows.append((f"downsample{stage}_norm", [f"{theirs}.downsampling_layer.0.{p}" for p in pair], _same))
            rows.append((f"downsample{stage}_conv", [f"{theirs}.downsampling_layer.1.{p}" for p in pair], _conv))
        for block in range(depth):
            ours, layer = f"stage{stage}_block{block}", f"{theirs}.layers.{block}"
            rows += [
                (f"{ours}_spatial", [f"{layer}.dwconv.{p}" for p in pair], _depthwise),
                (f"{ours}_norm", [f"{layer}.layernorm.{p}" for p in pair], _same),
                (f"{ours}_pointwise_in", [f"{layer}.pwconv1.{p}" for p in pair], _linear_as_conv),
                (f"{ours}_pointwise_out", [f"{layer}.pwconv2.{p}" for p in pair], _linear_as_conv),
                (f"{ours}_layer_scale", [f"{layer}.layer_scale_parameter"], _same),
            ]
    rows.append(("head_norm", [f"convnext.layernorm.{p}" for p in pair], _same))
    rows.append(("predictions", ["classifier.weight", "classifier.bias"], lambda tensor: tensor.T))
    return rows


def _port(model, state, rows):
    """Assigns `state` (name -> numpy array) to `model` by `rows`; every tensor used once."""
    used = set()
    for layer_name, keys, transform in rows:
        # The first tensor of a row is the kernel; biases and norm vectors are kept as they are.
        values = [transform(state[keys[0]])] + [state[key] for key in keys[1:]]
        model.get_layer(layer_name).set_weights(values)
        used.update(keys)
    assert used == {key for key in state if not key.endswith("num_batches_tracked")}


def _random_resnet50(classes, seed):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=classes))
    randomize_torch_model(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    return model


@pytest.mark.parametrize("step", ["resnet50", "separate_downsampling"])
def test_endpoints_compute_what_transformers_computes(step):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    classes = 10
    if step == "resnet50":
        reference, rows = _random_resnet50(classes, seed=3), resnet50_rows()
    else:
        reference, rows = hf_reference("v1", (3, 3, 9, 3), (96, 192, 384, 768), classes, seed=4), convnext_tiny_rows()
    state = {name: tensor.numpy() for name, tensor in reference.state_dict().items()}
    model = roadmap.build(step, classes=classes, input_shape=(32, 32, 3))
    _port(model, state, rows)
    images = random_images(2, 32, 32, seed=5)
    expected = torch_logits(reference, images)
    logits = keras.ops.convert_to_numpy(model(images, training=False))
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
