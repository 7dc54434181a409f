"""Checkpoint loading, proven against HF transformers models with random weights."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import keras

import keras_convnext as kc
from conftest import XLA_LEVEL_FLAG, random_images, torch_logits
from naming_fixtures import hf_to_official, hf_to_timm

ATTO = ((2, 2, 6, 2), (40, 80, 160, 320))
SIZES = [(64, 64), (45, 70)]


def _state_dict(reference):
    return {k: v.detach().clone() for k, v in reference.state_dict().items()}


def _save(state_dict, path, wrap=None):
    import torch

    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save({wrap: state_dict} if wrap else state_dict, str(path))
    return path


def _assert_parity(model, reference, sizes=SIZES):
    for height, width in sizes:
        images = random_images(2, height, width, seed=height)
        expected = torch_logits(reference, images)
        logits = keras.ops.convert_to_numpy(model(images, training=False))
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() <= 1e-4, (height, width, np.abs(logits - expected).max())


NAMINGS = {
    "hf-bin": (lambda sd: sd, "pytorch_model.bin", None),
    "hf-safetensors": (lambda sd: sd, "model.safetensors", None),
    "official-pth": (hf_to_official, "convnextv2_atto.pt", "model"),
    "official-safetensors": (hf_to_official, "official.safetensors", None),
    "timm-pth": (hf_to_timm, "timm.pth", "state_dict"),
}


@pytest.fixture(scope="module")
def runners():
    """`{constructor: model}`, one per version: each naming's weights are copied into it and
    run there, so that JAX and TensorFlow compile the model for each input size once, not
    once per naming (every model instance is a new program for them)."""
    options = dict(include_preprocessing=False, classifier_activation=None)
    return {constructor: constructor(**options) for constructor in (kc.ConvNeXtV2Atto, kc.ConvNeXtAtto)}


def _assert_naming_parity(constructor, naming, reference, runners, tmp_path):
    rename, filename, wrap = NAMINGS[naming]
    path = _save(rename(_state_dict(reference)), tmp_path / filename, wrap)
    loaded = constructor(weights=str(path), include_preprocessing=False, classifier_activation=None)
    runner = runners[constructor]
    runner.set_weights(loaded.get_weights())
    _assert_parity(runner, reference)


@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_v2_parity_in_every_naming(naming, hf_v2_atto, runners, tmp_path):
    _assert_naming_parity(kc.ConvNeXtV2Atto, naming, hf_v2_atto, runners, tmp_path)


@pytest.mark.parametrize("naming", ["hf-safetensors", "official-pth", "timm-pth"])
def test_v1_parity_in_every_naming(naming, hf_v1_atto, runners, tmp_path):
    _assert_naming_parity(kc.ConvNeXtAtto, naming, hf_v1_atto, runners, tmp_path)


def test_reference_weights_are_non_trivial(hf_v2_atto, hf_v1_atto):
    v2 = _state_dict(hf_v2_atto)
    grn = v2["convnextv2.encoder.stages.0.layers.0.grn.weight"].numpy()
    assert np.abs(grn).min() > 0 and np.abs(v2["convnextv2.encoder.stages.0.layers.0.grn.bias"].numpy()).mean() > 0.05
    scale = _state_dict(hf_v1_atto)["convnext.encoder.stages.2.layers.3.layer_scale_parameter"].numpy()
    assert np.abs(scale).mean() > 0.1
    norm = v2["convnextv2.embeddings.layernorm.weight"].numpy()
    assert np.abs(norm - 1).mean() > 0.05


def test_in_memory_mapping_and_preprocessing(hf_v2_atto):
    model = kc.ConvNeXtV2Atto(classifier_activation=None)
    kc.load_weights(model, _state_dict(hf_v2_atto))
    pixels = np.random.default_rng(0).uniform(0, 255, size=(2, 64, 64, 3)).astype("float32")
    expected = torch_logits(hf_v2_atto, kc.normalize_imagenet(pixels))
    np.testing.assert_allclose(model.predict(pixels, verbose=0), expected, atol=1e-4)


def test_include_top_false_ignores_head_and_matches_features(hf_v2_atto):
    import torch

    model = kc.ConvNeXtV2Atto(include_top=False, include_preprocessing=False)
    kc.load_state_dict(model, _state_dict(hf_v2_atto))
    images = random_images(1, 64, 96)
    with torch.no_grad():
        expected = hf_v2_atto.convnextv2(
            torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), output_hidden_states=True
        ).hidden_states
    outputs = kc.stage_features(model)(images)
    for stage in range(4):
        reference = expected[stage + 1].numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(outputs[stage]), reference, atol=1e-4)


def _snapshot(model):
    return [np.array(w) for w in model.get_weights()]


def _assert_unchanged(model, before):
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_errors_leave_the_model_untouched(hf_v2_atto, hf_v1_atto, tmp_path):
    model = kc.ConvNeXtV2Atto(include_preprocessing=False)
    before = _snapshot(model)
    good = hf_to_official(_state_dict(hf_v2_atto))

    truncated = tmp_path / "truncated.pt"
    _save(good, tmp_path / "full.pt")
    truncated.write_bytes((tmp_path / "full.pt").read_bytes()[:5000])
    with pytest.raises(kc.CheckpointError, match="truncated"):
        kc.load_weights(model, truncated)

    extra = dict(good, **{"stages.0.0.extra.weight": good["norm.weight"]})
    with pytest.raises(kc.CheckpointError, match=r"no place for: stages\.0\.0\.extra\.weight"):
        kc.load_weights(model, extra)

    missing = {k: v for k, v in good.items() if k != "stages.1.0.pwconv2.bias"}
    # Named as the checkpoint names it, with the Keras weight it would fill.
    with pytest.raises(kc.CheckpointError, match=r"checkpoint lacks: stages\.1\.0\.pwconv2\.bias \(-> stage1_block0/pwconv2/bias\)"):
        kc.load_weights(model, missing)

    reshaped = dict(good, **{"stages.3.1.pwconv1.weight": good["stages.3.1.pwconv1.weight"][:, :-1]})
    with pytest.raises(kc.CheckpointError, match=r"stages\.3\.1\.pwconv1\.weight -> stage3_block1/pwconv1/kernel"):
        kc.load_weights(model, reshaped)

    with pytest.raises(kc.CheckpointError, match=r"ConvNeXt V1 .*\(ConvNeXtAtto\).*ConvNeXt V2 .*\(ConvNeXtV2Atto\)"):
        kc.load_weights(model, _state_dict(hf_v1_atto))

    with pytest.raises(kc.CheckpointError, match="Cannot tell which ConvNeXt checkpoint naming"):
        kc.load_weights(model, {"foo.weight": np.zeros(3)})
    _assert_unchanged(model, before)


def test_other_variant_is_named():
    import transformers

    from conftest import hf_reference

    femto = hf_reference("v2", (2, 2, 6, 2), (48, 96, 192, 384), classes=10)
    model = kc.ConvNeXtV2Atto(classes=10)
    before = _snapshot(model)
    with pytest.raises(kc.CheckpointError, match=r"ConvNeXtV2Femto.*model .* is a ConvNeXt V2.*ConvNeXtV2Atto"):
        kc.load_weights(model, _state_dict(femto))
    _assert_unchanged(model, before)
    assert isinstance(femto, transformers.ConvNextV2ForImageClassification)


def test_head_of_another_size_needs_fresh_head(hf_v2_atto):
    model = kc.ConvNeXtV2Atto(classes=5, include_preprocessing=False, classifier_activation=None)
    before = _snapshot(model)
    with pytest.raises(kc.CheckpointError, match="fresh_head=True"):
        kc.load_weights(model, _state_dict(hf_v2_atto))
    _assert_unchanged(model, before)
    head_before = keras.ops.convert_to_numpy(model.get_layer("predictions").kernel)
    kc.load_weights(model, _state_dict(hf_v2_atto), fresh_head=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("predictions").kernel), head_before)
    reference_norm = hf_v2_atto.convnextv2.layernorm.weight.detach().numpy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.get_layer("head_norm").gamma), reference_norm)


def test_keras_weights_file(tmp_path, hf_v2_atto):
    source = kc.ConvNeXtV2Atto(include_preprocessing=False, classifier_activation=None)
    kc.load_weights(source, _state_dict(hf_v2_atto))
    path = tmp_path / "atto.weights.h5"
    source.save_weights(path)
    model = kc.ConvNeXtV2Atto(weights=str(path), include_preprocessing=False, classifier_activation=None)
    _assert_parity(model, hf_v2_atto, sizes=[(64, 64)])

    other = kc.ConvNeXtV2Femto(include_preprocessing=False)
    before = _snapshot(other)
    with pytest.raises(kc.CheckpointError, match="Nothing was loaded"):
        kc.load_weights(other, path)
    _assert_unchanged(other, before)


def test_unknown_weights_value_is_explained():
    with pytest.raises(ValueError, match="neither an existing file nor a known tag"):
        kc.ConvNeXtV2Atto(weights="no-such-file-or-tag")
    with pytest.raises(FileNotFoundError):
        kc.read_checkpoint("/nonexistent/file.pt")


def test_decode_predictions_uses_shipped_names():
    scores = np.zeros((1, 1000), "float32")
    scores[0, 281] = 0.9
    scores[0, 1] = 0.05
    top = kc.decode_predictions(scores, top=2)[0]
    assert top[0][:2] == ("n02123045", "tabby")
    assert top[1][0] == "n01443537"
    with pytest.raises(ValueError, match=r"\(batch, 1000\)"):
        kc.decode_predictions(np.zeros((1, 10)))


# The parity and fast-path tests, in a process whose XLA compiles at its default
# level (what users run), since the JAX run compiles at level 0 with XLA:CPU's loop
# emitters (conftest.py).
DEFAULT_LEVEL_TESTS = [
    "tests/test_weights.py::test_v2_parity_in_every_naming[hf-safetensors]",
    "tests/test_weights.py::test_v1_parity_in_every_naming[hf-safetensors]",
    "tests/test_ops.py::test_depthwise_gradients_agree",
    "tests/test_ops.py::test_linear_gelu_agrees_with_portable",
    "tests/test_layers.py::test_bfloat16_linear_on_jax_cpu_reads_the_stored_kernel_for_small_products",
    "tests/test_layers.py::test_bfloat16_linear_from_the_stored_kernel_agrees_with_float32_and_trains",
    "tests/test_ops.py::test_integer_rounding_to_bfloat16_gives_the_bits_of_a_cast",
    "tests/test_ops.py::test_bfloat16_depthwise_rounds_once",
    "tests/test_ops.py::test_jax_kernel_rounded_after_its_input_is_the_cast",
    "tests/test_ops.py::test_jax_rounds_each_kernel_just_before_its_product",
    "tests/test_ops.py::test_jax_bfloat16_grn_linear_agrees_with_float32",
]


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="only the JAX run changes XLA's level")
def test_parity_at_xla_default_optimization_level():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS=f"{XLA_LEVEL_FLAG}=3", KERAS_BACKEND="jax")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DEFAULT_LEVEL_TESTS]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "22 passed" in done.stdout, done.stdout[-3000:]


def _official_arrays(reference):
    return {k: v.numpy() for k, v in hf_to_official(_state_dict(reference)).items()}


def _bad_checkpoints(good):
    """(description, checkpoint, expected message) for tensors that must be refused."""
    grn = "stages.3.1.grn.gamma"
    last = list(good)[-1]  # the bad tensor comes last: everything else would load first
    cases = [
        ("GRN gamma reshaped", {**good, grn: good[grn].reshape(16, -1)},
         r"stages\.3\.1\.grn\.gamma \(shape \(16, 80\), expected \(1, 1, 1, C\)\)"),
        ("GRN gamma flattened", {**good, grn: good[grn].reshape(-1)},
         r"stages\.3\.1\.grn\.gamma \(shape \(1280,\), expected \(1, 1, 1, C\)\)"),
    ]
    for dtype in ("int64", "bool", "complex64", "<U1", "object"):
        bad = np.zeros(good[last].shape, dtype=dtype)
        cases.append((f"{dtype} tensor", {**good, last: bad}, rf"{re.escape(last)} \(\S+ values, not floating point\)"))
    nan, inf = good["stages.0.0.dwconv.weight"].copy(), good[last].copy()
    nan.flat[5], inf.flat[0] = np.nan, -np.inf
    hf = {key: good[official] for key, official in (("convnextv2.embeddings.patch_embeddings.weight",
                                                     "downsample_layers.0.0.weight"),
                                                    ("convnextv2.layernorm.weight", "norm.weight"),
                                                    ("convnext.layernorm.weight", "norm.weight"))}
    cases.append(("two tensors for one weight", hf,
                  r"convnextv2\.layernorm\.weight and convnext\.layernorm\.weight \(-> head_norm/gamma\)"))
    cases.append(("NaN and Inf", {**good, "stages.0.0.dwconv.weight": nan, last: inf},
                  r"stages\.0\.0\.dwconv\.weight \(NaN or infinite values\), " + re.escape(last)))
    return cases


def test_every_tensor_is_checked_before_anything_is_assigned(hf_v2_atto):
    model = kc.ConvNeXtV2Atto(include_preprocessing=False, input_shape=(32, 32, 3))
    before = _snapshot(model)
    good = _official_arrays(hf_v2_atto)
    for description, checkpoint, message in _bad_checkpoints(good):
        with pytest.raises(kc.CheckpointError, match=message):
            kc.load_weights(model, checkpoint)
        _assert_unchanged(model, before)
    kc.load_weights(model, good)  # the good one loads, and was not modified by the cases above
    np.testing.assert_array_equal(model.get_layer("stage3_block1").grn.gamma.numpy(), good["stages.3.1.grn.gamma"].reshape(-1))


@pytest.mark.parametrize("rename, key", [
    (hf_to_official, "stages.0.1.dwconv.weight"),
    (hf_to_timm, "stages.0.blocks.1.conv_dw.weight"),
    (lambda sd: sd, "convnextv2.encoder.stages.0.layers.1.dwconv.weight"),
])
def test_missing_tensors_are_named_in_the_checkpoints_naming(rename, key, hf_v2_atto):
    model = kc.ConvNeXtV2Atto(include_preprocessing=False, input_shape=(32, 32, 3))
    checkpoint = {k: v for k, v in rename(_state_dict(hf_v2_atto)).items() if k != key}
    with pytest.raises(kc.CheckpointError, match=re.escape(f"{key} (-> stage0_block1/dwconv/kernel)")):
        kc.load_weights(model, checkpoint)


def _tiny(**kwargs):
    return kc.ConvNeXt((1, 1, 1, 1), (8, 8, 16, 16), input_shape=(32, 32, 3), **kwargs)


def test_keras_weights_files_with_fresh_head(tmp_path):
    encoder = _tiny(include_top=False)
    for variable in encoder.weights:
        variable.assign(np.random.default_rng(len(variable.path)).normal(size=variable.shape))
    encoder_file = str(tmp_path / "encoder.weights.h5")
    encoder.save_weights(encoder_file)

    classifier = _tiny(classes=5)
    before = _snapshot(classifier)
    with pytest.raises(kc.CheckpointError, match="fresh_head=True"):
        kc.load_weights(classifier, encoder_file)
    _assert_unchanged(classifier, before)

    kc.load_weights(classifier, encoder_file, fresh_head=True)
    fresh = {v.path: v.numpy() for v in _tiny(classes=5).weights}
    for variable, old in zip(classifier.weights, before):
        if variable.path.startswith(("head_norm/", "predictions/")):
            np.testing.assert_array_equal(variable.numpy(), old)  # the model's own head stays
        else:
            np.testing.assert_array_equal(variable.numpy(), encoder.get_layer(variable.path.split("/")[0]).weights[
                [w.path for w in encoder.get_layer(variable.path.split("/")[0]).weights].index(variable.path)].numpy())
    assert set(fresh) == {v.path for v in classifier.weights}

    # A 1000-class file into a 5-class classifier: its head LayerNorm, the model's classifier.
    thousand = _tiny(classes=1000)
    thousand.get_layer("head_norm").gamma.assign(np.full((16,), 3.0, "float32"))
    thousand_file = str(tmp_path / "thousand.weights.h5")
    thousand.save_weights(thousand_file)
    kernel = classifier.get_layer("predictions").kernel.numpy()
    with pytest.raises(kc.CheckpointError, match="fresh_head=True"):
        kc.load_weights(classifier, thousand_file)
    kc.load_weights(classifier, thousand_file, fresh_head=True)
    np.testing.assert_array_equal(classifier.get_layer("head_norm").gamma.numpy(), np.full((16,), 3.0))
    np.testing.assert_array_equal(classifier.get_layer("predictions").kernel.numpy(), kernel)


def test_keras_weights_file_with_non_finite_values_is_refused(tmp_path):
    source = _tiny(classes=3)
    kernel = source.get_layer("stage1_block0").pwconv1.kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    path = str(tmp_path / "nan.weights.h5")
    source.save_weights(path)
    model = _tiny(classes=3)
    before = _snapshot(model)
    with pytest.raises(kc.CheckpointError, match=r"stage1_block0/pwconv1/kernel \(NaN or infinite values\)"):
        kc.load_weights(model, path)
    _assert_unchanged(model, before)
