"""`python -m keras_convnext.convert` end to end, against HF transformers references."""

import numpy as np
import pytest

import keras

import keras_convnext as kc
from conftest import torch_logits
from keras_convnext import convert, verify
from keras_convnext.weights import cache, download, registry
from naming_fixtures import hf_to_official, hf_to_timm


def _state_dict(reference):
    return {k: v.detach().clone() for k, v in reference.state_dict().items()}


def _save_official(reference, path, scale_key=None):
    import torch

    state_dict = hf_to_official(_state_dict(reference))
    if scale_key:  # a deliberately damaged copy
        state_dict[scale_key] = state_dict[scale_key] * 1.05
    torch.save({"model": state_dict}, str(path))
    return str(path)


def _softmax(logits):
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def test_file_to_weights_and_keras_with_verify(hf_v2_atto, tmp_path, capsys):
    checkpoint = _save_official(hf_v2_atto, tmp_path / "convnextv2_atto_1k_224_ema.pt")
    output = tmp_path / "out"
    status = convert.main([checkpoint, "--output-dir", str(output), "--verify", "--image-size", "64"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "verification passed" in printed and "top-1 agreement 5/5" in printed

    # --verify reloaded the .keras file (safe_mode=True) and compared it with HF; the
    # .weights.h5 file must give the same model through the constructor.
    # 7 images, as --verify uses (5 photos + 2 random): the shapes are compiled already.
    pixels = np.random.default_rng(0).uniform(0, 255, size=(7, 64, 64, 3)).astype("float32")
    expected = _softmax(torch_logits(hf_v2_atto, kc.normalize_imagenet(pixels)))
    model = kc.ConvNeXtV2Atto(weights=str(output / "convnextv2_atto_1k_224_ema.weights.h5"))
    probabilities = keras.ops.convert_to_numpy(model(pixels, training=False))
    assert np.abs(probabilities - expected).max() <= 1e-5


def test_verify_fails_on_a_perturbed_checkpoint(hf_v2_atto, tmp_path, capsys):
    good = _save_official(hf_v2_atto, tmp_path / "good.pt")
    damaged = _save_official(hf_v2_atto, tmp_path / "damaged.pt", scale_key="stages.2.3.pwconv1.weight")
    status = convert.main([
        damaged, "--output-dir", str(tmp_path), "--verify", "--image-size", "64",
        "--reference-checkpoint", good,
    ])
    printed = capsys.readouterr().out
    assert status == 1, printed
    assert "verification FAILED" in printed


def test_reference_renaming_recovers_hf_keys(hf_v1_atto, hf_v2_atto):
    # The verifier's own official/timm -> HF renaming must invert the test fixtures' renaming.
    for reference, prefix in ((hf_v1_atto, "convnext"), (hf_v2_atto, "convnextv2")):
        original = {k: v.numpy() for k, v in _state_dict(reference).items()}
        for rename in (hf_to_official, hf_to_timm):
            recovered = verify.to_hf_names({k: v.numpy() for k, v in rename(_state_dict(reference)).items()}, prefix)
            assert sorted(recovered) == sorted(original)
            for key, value in original.items():
                np.testing.assert_array_equal(recovered[key], value)


def test_all_converts_reachable_entries_and_skips_unreachable(hf_v1_atto, tmp_path, monkeypatch, capsys):
    import socket

    checkpoint = _save_official(hf_v1_atto, tmp_path / "convnext_atto_1k_224_ema.pth")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    entries = [
        registry.Pretrained("ConvNeXtAtto", "test-local", "file://" + checkpoint, "test", 64, 1000, None, "MIT"),
        registry.Pretrained("ConvNeXtAtto", "test-offline", f"http://127.0.0.1:{closed_port}/x.pth",
                            "test", 64, 1000, None, "MIT"),
    ]
    monkeypatch.setattr(registry, "ENTRIES", entries)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(download.WEIGHTS_DIR_ENV, raising=False)
    output = tmp_path / "out"
    status = convert.main(["--all", "--verify", "--output-dir", str(output)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "| ConvNeXtAtto | test-local | verified |" in printed
    assert "| ConvNeXtAtto | test-offline | unreachable (skipped) | - |" in printed
    assert sorted(p.name for p in output.iterdir()) == [
        "ConvNeXtAtto-test-local.keras", "ConvNeXtAtto-test-local.weights.h5",
    ]


def test_unknown_file_type_and_missing_variant_are_clear(tmp_path, capsys):
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"not a checkpoint")
    assert convert.main([str(bad), "--output-dir", str(tmp_path)]) == 1
    assert "Unsupported checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main(["imagenet"])
    assert "needs --variant" in capsys.readouterr().err
