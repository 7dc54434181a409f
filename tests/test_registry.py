"""The pretrained registry: its data, and download -> convert -> cache against a local server."""

import hashlib
import os
import re
import socket
from urllib.parse import urlparse

import numpy as np
import pytest

import keras

import keras_convnext as kc
from conftest import OFFICIAL_FILENAME as FILENAME, random_images, torch_logits
from keras_convnext.models.convnext import CONSTRUCTORS
from keras_convnext.models.isotropic import ISOTROPIC_CONSTRUCTORS
from keras_convnext.weights import cache as weights_cache
from keras_convnext.weights import download, registry
from keras_convnext.weights.files import CheckpointError

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


# ---------------------------------------------------------------- registry data


def _expected_from_tag(tag):
    """(classes, resolution) that a tag promises, read from the tag's name alone."""
    match = re.search(r"-(\d{3})$", tag)
    resolution = int(match.group(1)) if match else 224
    classes = None if tag == "fcmae" else 21841 if tag == "imagenet22k" else 1000
    return classes, resolution


def test_every_entry_is_consistent():
    assert len(registry.ENTRIES) == len(registry.REGISTRY) == 50
    for entry in registry.ENTRIES:
        assert entry.variant in {**CONSTRUCTORS, **ISOTROPIC_CONSTRUCTORS}, entry
        classes, resolution = _expected_from_tag(entry.tag)
        assert (entry.classes, entry.resolution) == (classes, resolution), entry
        url = urlparse(entry.url)
        assert url.scheme == "https" and url.netloc == "dl.fbaipublicfiles.com", entry.url
        size = entry.variant.replace("ConvNeXtV2", "").replace("ConvNeXt", "").lower()
        size = size.replace("isotropic", "iso_")
        family = "convnextv2" if entry.variant.startswith("ConvNeXtV2") else "convnext"
        assert re.fullmatch(rf"{family}_{size}_[0-9a-z_]+\.pth?", entry.filename), entry.url
        assert f"_{entry.resolution}" in entry.filename, entry.url
        assert ("22k" in entry.filename) == ("22k" in entry.tag), entry.url
        assert ("fcmae" in entry.filename) == (entry.tag == "fcmae"), entry.url
        assert entry.top1 is None or 70.0 < entry.top1 < 90.0, entry
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256), entry


@pytest.mark.parametrize("relative_path", sorted(registry.GENERATED_TABLES))
def test_weights_tables_are_generated_from_the_registry(relative_path):
    path = os.path.join(os.path.dirname(README), relative_path)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    table = registry.GENERATED_TABLES[relative_path]()
    assert registry.with_table(text, table) == text, (
        f"The weights table in {relative_path} is out of date: run "
        "python -m keras_convnext.weights.registry --update-docs ."
    )
    rows = text[text.index(registry.TABLE_START):text.index(registry.TABLE_END)].count("\n| ConvNeXt")
    variants = {entry.variant for entry in registry.ENTRIES}
    assert rows == (len(variants) if relative_path == "README.md" else len(registry.ENTRIES))


def _small_model(variant_name, **kwargs):
    # Same code path as the named constructors, with a cheap network.
    return kc.ConvNeXt((1, 1, 1, 1), (8, 8, 8, 8), variant_name=variant_name, **kwargs)


def test_unknown_tag_lists_the_valid_tags():
    with pytest.raises(ValueError, match=r"Tags for ConvNeXtV2Atto: fcmae, imagenet\.") as info:
        _small_model("ConvNeXtV2Atto", weights="imagenet22k")
    assert "ConvNeXtTiny" in str(info.value)  # where that tag does exist


def test_fcmae_tag_gives_a_classifier_a_fresh_head(monkeypatch):
    encoder = _small_model("ConvNeXtV2Atto", include_top=False)
    encoder_weights = {v.path: np.asarray(v.numpy()) + 0.5 for v in encoder.weights}
    monkeypatch.setattr(weights_cache, "converted_weights", lambda entry: dict(encoder_weights))
    model = _small_model("ConvNeXtV2Atto", weights="fcmae", classes=3)
    for variable in model.weights:
        if variable.path.startswith(("head_norm/", "predictions/")):
            assert not np.allclose(variable.numpy(), encoder_weights.get(variable.path, np.nan))
        else:
            np.testing.assert_array_equal(variable.numpy(), encoder_weights[variable.path])
    assert np.allclose(model.get_layer("head_norm").gamma.numpy(), 1.0)  # fresh, not loaded


# ---------------------------------------------------------------- local server


def _register(monkeypatch, url, sha256=None, tag="test-imagenet"):
    entry = registry.Pretrained("ConvNeXtV2Atto", tag, url, "test", 224, 1000, None, "MIT", sha256)
    monkeypatch.setitem(registry.REGISTRY, (entry.variant, tag), entry)
    return entry


def _files_under(path):
    """Files in the cache, less the lock files (which stay, empty, by design)."""
    return sorted(os.path.relpath(os.path.join(root, name), path)
                  for root, _, names in os.walk(path) for name in names if not name.endswith(".lock"))


def _logits(model, images):
    return keras.ops.convert_to_numpy(model(images, training=False))


def _closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _hf_features(reference, pixels):
    """The HF model's last stage output, NHWC, for pixels in [0, 255]."""
    import torch

    with torch.no_grad():
        inputs = torch.from_numpy(kc.normalize_imagenet(pixels).transpose(0, 3, 1, 2).copy())
        hidden = reference.convnextv2(pixel_values=inputs).last_hidden_state
    return hidden.numpy().transpose(0, 2, 3, 1)


def test_download_convert_cache_and_reuse(server, cache_root, monkeypatch, hf_v2_atto, official_checkpoint):
    sha256 = hashlib.sha256(official_checkpoint).hexdigest()
    _register(monkeypatch, server.url(FILENAME), sha256)
    logits_only = dict(include_preprocessing=False, classifier_activation=None)

    model = kc.ConvNeXtV2Atto(weights="test-imagenet", **logits_only)
    assert len(server.requests) == 1
    assert _files_under(cache_root) == [os.path.join("converted", "ConvNeXtV2Atto-test-imagenet.safetensors")]
    images = random_images(7, 64, 64, seed=3)  # 7 like --verify: same shapes, no new compilation
    assert np.abs(_logits(model, images) - torch_logits(hf_v2_atto, images)).max() <= 1e-4

    # Later loads read the converted file only: no request, no checkpoint reader (no torch).
    # Another number of classes, and a fixed input size other than the entry's 224:
    # a fresh head, everything else loaded. (64x64 keeps the shapes compiled above.)
    monkeypatch.setattr(weights_cache, "read_checkpoint", lambda *a: pytest.fail("original checkpoint read"))
    finetune = kc.ConvNeXtV2Atto(weights="test-imagenet", classes=7, input_shape=(64, 64, 3))
    assert tuple(finetune.get_layer("predictions").kernel.shape) == (320, 7)
    np.testing.assert_array_equal(
        finetune.get_layer("head_norm").weights[0].numpy(), model.get_layer("head_norm").weights[0].numpy()
    )
    features = keras.Model(finetune.inputs[0], finetune.get_layer("stage3_block1").output)
    pixels = np.random.default_rng(5).uniform(0, 255, size=(7, 64, 64, 3)).astype("float32")
    assert np.abs(_logits(features, pixels) - _hf_features(hf_v2_atto, pixels)).max() <= 1e-4
    assert len(server.requests) == 1


def test_wrong_hash_is_rejected_and_leaves_nothing(server, cache_root, monkeypatch):
    entry = _register(monkeypatch, server.url(FILENAME), sha256="0" * 64)
    with pytest.raises(CheckpointError, match="SHA-256"):
        weights_cache.converted_weights(entry, progress=False)
    assert _files_under(cache_root) == []


def test_truncated_file_is_rejected_and_leaves_nothing(server, cache_root, monkeypatch, official_checkpoint):
    server.files["truncated.pt"] = official_checkpoint[: len(official_checkpoint) // 2]
    entry = _register(monkeypatch, server.url("truncated.pt"))
    with pytest.raises(CheckpointError, match=r"(?s)could not be converted and was removed.*truncated"):
        weights_cache.converted_weights(entry, progress=False)
    assert _files_under(cache_root) == []


def test_broken_transfer_is_rejected_and_leaves_nothing(server, cache_root, monkeypatch):
    entry = _register(monkeypatch, server.url(FILENAME, route="broken"))
    with pytest.raises(CheckpointError, match="broke off|incomplete"):
        weights_cache.converted_weights(entry, progress=False)
    assert _files_under(cache_root) == []


def test_unreachable_server_names_the_url_and_the_manual_route(cache_root, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/files/{FILENAME}"
    entry = _register(monkeypatch, url)
    with pytest.raises(download.WeightsUnavailableError) as info:
        weights_cache.converted_weights(entry, progress=False)
    message = str(info.value)
    assert url in message and download.WEIGHTS_DIR_ENV in message and FILENAME in message
    assert _files_under(cache_root) == []


def test_file_supplied_by_hand(cache_root, monkeypatch, tmp_path, official_checkpoint, hf_v2_atto):
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    (by_hand / FILENAME).write_bytes(official_checkpoint)
    monkeypatch.setenv(download.WEIGHTS_DIR_ENV, str(by_hand))
    _register(monkeypatch, f"http://127.0.0.1:{_closed_port()}/files/{FILENAME}")
    backbone = kc.ConvNeXtV2Atto(weights="test-imagenet", include_top=False)
    # Parity is proven above; here it is enough that the hand-supplied tensors arrived.
    stem = hf_v2_atto.convnextv2.embeddings.patch_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(backbone.get_layer("stem_conv").kernel.numpy(), stem.transpose(2, 3, 1, 0))
    grn = hf_v2_atto.convnextv2.encoder.stages[3].layers[1].grn.bias.detach().numpy().reshape(-1)
    np.testing.assert_array_equal(backbone.get_layer("stage3_block1").grn.beta.numpy(), grn)
    assert (by_hand / FILENAME).exists()  # a file supplied by hand is never removed


def test_list_weights_states_each_release_and_its_license():
    everything = kc.list_weights()
    assert len(everything) == len(registry.ENTRIES)
    atto = kc.list_weights("ConvNeXtV2Atto")
    assert [(w.tag, w.resolution, w.classes, w.top1) for w in atto] == [
        ("imagenet", 224, 1000, 76.7), ("fcmae", 224, None, None),
    ]
    assert atto[0].filename == "convnextv2_atto_1k_224_ema.pt" and atto[0].url.endswith(atto[0].filename)
    # As the official repositories state: V1 weights MIT, V2 weights CC-BY-NC 4.0.
    for weights in everything:
        expected = "CC-BY-NC-4.0" if weights.variant.startswith("ConvNeXtV2") else "MIT"
        assert weights.license == expected, weights
    with pytest.raises(ValueError, match="ConvNeXtV2Atto"):
        kc.list_weights("ConvNeXtV9")
