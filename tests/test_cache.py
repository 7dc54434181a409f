"""The pretrained cache: conversion without a model, trusted hashes, self-healing, locks, deadlines."""

import os
import subprocess
import sys

import numpy as np
import pytest

import keras_convnext as kc
from keras_convnext.weights import cache, download, registry, weights_file
from keras_convnext.weights.files import CheckpointError
from keras_convnext.weights.shapes import pretraining_shapes, variant_shapes
from conftest import OFFICIAL_FILENAME as FILENAME, official_bytes
from local_server import LocalServer
from naming_fixtures import hf_to_fcmae, official_fcmae_decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(url, tag="test-imagenet"):
    return registry.Pretrained("ConvNeXtV2Atto", tag, url, "test", 224, 1000, None, "CC-BY-NC-4.0")


def _converted_path(entry):
    return os.path.join(cache.cache_dir(), "converted", cache.converted_name(entry))


def test_variant_table_matches_built_models():
    for name, kwargs, classes in (("ConvNeXtV2Atto", dict(classes=7), 7), ("ConvNeXtAtto", dict(include_top=False), None)):
        model = kc.CONSTRUCTORS[name](input_shape=(32, 32, 3), **kwargs)
        assert {v.path: tuple(v.shape) for v in model.weights} == variant_shapes(name, classes)


def test_conversion_needs_no_model_and_records_the_hash(server, cache_root, monkeypatch, official_checkpoint, hf_v2_atto):
    import hashlib

    monkeypatch.setattr(kc, "ConvNeXt", lambda *a, **k: pytest.fail("a model was built"))
    entry = _entry(server.url(FILENAME))
    arrays = cache.converted_weights(entry, progress=False)
    stem = hf_v2_atto.convnextv2.embeddings.patch_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(arrays["stem_conv/kernel"], stem.transpose(2, 3, 1, 0))
    assert set(arrays) == set(variant_shapes("ConvNeXtV2Atto", 1000))
    manifest = weights_file.read_manifest(_converted_path(entry))
    sha256 = hashlib.sha256(official_checkpoint).hexdigest()
    assert manifest["source_sha256"] == sha256 and manifest["variant"] == "ConvNeXtV2Atto"
    assert manifest["tag"] == "test-imagenet" and manifest["library_version"] == kc.__version__
    assert cache.known_hash(entry) == (sha256, len(official_checkpoint))
    assert not (cache_root / "downloads" / FILENAME).exists()  # the original is not kept


def test_damaged_cache_is_rebuilt_once_naming_the_file(server, cache_root, capsys):
    entry = _entry(server.url(FILENAME))
    first = cache.converted_weights(entry, progress=False)
    path = _converted_path(entry)
    with open(path, "r+b") as handle:  # flip bytes in the tensor data, past the header
        handle.seek(-64, os.SEEK_END)
        handle.write(b"\xff" * 16)
    capsys.readouterr()
    healed = cache.converted_weights(entry, progress=False)
    assert path in capsys.readouterr().err
    assert len(server.requests) == 2
    for name, array in first.items():
        np.testing.assert_array_equal(healed[name], array)

    with open(path, "wb") as handle:  # not a safetensors file at all
        handle.write(b"garbage")
    cache.converted_weights(entry, progress=False)
    assert len(server.requests) == 3


def test_a_different_file_at_the_url_is_refused_after_first_use(server, cache_root, hf_v2_atto):
    entry = _entry(server.url(FILENAME))
    cache.converted_weights(entry, progress=False)
    os.remove(_converted_path(entry))
    server.files[FILENAME] = official_bytes(hf_v2_atto, scale=1.01)  # well formed, other weights
    with pytest.raises(CheckpointError, match="SHA-256"):
        cache.converted_weights(entry, progress=False)
    assert sorted(os.listdir(cache_root / "converted")) == []


def test_manifest_of_another_release_is_rebuilt(server, cache_root, capsys):
    entry = _entry(server.url(FILENAME))
    cache.converted_weights(entry, progress=False)
    other = _entry(server.url(FILENAME), tag="test-other")
    os.makedirs(os.path.dirname(_converted_path(other)), exist_ok=True)
    os.replace(_converted_path(entry), _converted_path(other))
    cache.converted_weights(other, progress=False)
    assert "tag 'test-imagenet' (expected 'test-other')" in capsys.readouterr().err


def test_stale_temporary_files_are_removed(server, cache_root):
    entry = _entry(server.url(FILENAME))
    stale = cache_root / "converted" / f".{cache.converted_name(entry)}.abc123.part.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    cache.converted_weights(entry, progress=False)
    assert not stale.exists()


def test_download_deadline_leaves_nothing(server, cache_root, monkeypatch):
    monkeypatch.setenv(download.DEADLINE_ENV, "0.2")
    monkeypatch.setattr(download, "CHUNK_BYTES", 4096)
    entry = _entry(server.url(FILENAME, route="slow"))
    with pytest.raises(download.WeightsUnavailableError, match="did not finish within 0.2 s"):
        cache.converted_weights(entry, progress=False)
    assert [name for _, _, names in os.walk(cache_root) for name in names if not name.endswith(".lock")] == []


def test_progress_bar_moves(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "CHUNK_BYTES", 64 * 1024)
    monkeypatch.setattr(download, "PROGRESS_INTERVAL_SECONDS", 0.0)
    download.download(server.url(FILENAME), str(tmp_path / FILENAME))
    shown = capsys.readouterr().err.split("\r")
    percents = [line.rsplit("(", 1)[-1].split(")")[0] for line in shown if "%" in line]
    assert len(set(percents)) >= 3 and percents[-1] == "100%", shown[:5]


_CHILD = """
import sys
from keras_convnext.weights import cache, registry
entry = registry.Pretrained("ConvNeXtV2Atto", "test-imagenet", sys.argv[1], "test", 224, 1000, None, "MIT")
arrays = cache.converted_weights(entry, progress=False)
print(len(arrays), float(sum(float(a.sum()) for a in arrays.values())))
"""


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND") != "jax",
                    reason="the cache's files and lock do not depend on the backend: checked in the JAX run")
def test_concurrent_first_use_shares_one_download(official_checkpoint, tmp_path):
    # Two processes, one cache, a slow server: the second waits on the lock, then reads the result.
    server = LocalServer(drip_bytes=1024 * 1024, drip_seconds=0.2)
    server.files[FILENAME] = official_checkpoint
    env = dict(os.environ, KERAS_CONVNEXT_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    env.pop(download.WEIGHTS_DIR_ENV, None)
    try:
        children = [
            subprocess.Popen([sys.executable, "-c", _CHILD, server.url(FILENAME, route="slow")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        results = [child.communicate(timeout=300) for child in children]
    finally:
        server.close()
    for child, (out, err) in zip(children, results):
        assert child.returncode == 0, err[-2000:]
    assert results[0][0] == results[1][0] and results[0][0].startswith("140 ")
    assert len(server.requests) == 1


def test_expected_size_is_checked(server, cache_root, official_checkpoint):
    entry = _entry(server.url(FILENAME))._replace(size=len(official_checkpoint) + 1)
    with pytest.raises(CheckpointError, match=rf"{len(official_checkpoint)} bytes arrived, {len(official_checkpoint) + 1}"):
        cache.converted_weights(entry, progress=False)
    assert [name for _, _, names in os.walk(cache_root) for name in names if not name.endswith(".lock")] == []


def test_a_complete_download_left_by_a_killed_run_is_converted(server, cache_root, official_checkpoint):
    entry = _entry(server.url(FILENAME))
    leftover = cache_root / "downloads" / FILENAME
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(official_checkpoint)
    assert set(cache.converted_weights(entry, progress=False)) == set(variant_shapes("ConvNeXtV2Atto", 1000))
    assert server.requests == [] and not leftover.exists()


# ---------------------------------------------------------------- FCMAE releases: encoder and decoder

FCMAE_FILENAME = "convnextv2_atto_1k_224_fcmae.pt"


@pytest.fixture(scope="module")
def fcmae_release(hf_v2_atto):
    """`(bytes of an official-naming FCMAE checkpoint, its decoder tensors as numpy)`."""
    import io

    import torch

    decoder = official_fcmae_decoder(320, seed=4)
    encoder = hf_to_fcmae({k: v.detach().clone() for k, v in hf_v2_atto.state_dict().items()})
    buffer = io.BytesIO()
    torch.save({"model": {**encoder, **decoder}, "epoch": 1599}, buffer)
    return buffer.getvalue(), {key: value.numpy() for key, value in decoder.items()}


def test_decoder_shapes_match_a_built_fcmae():
    model = kc.FCMAE("ConvNeXtV2Atto", input_shape=(64, 64, 3))  # the official decoder by default
    built = {v.path: tuple(v.shape) for v in model.encoder.weights}
    built.update({"decoder/" + name: tuple(v.shape) for name, v in model.decoder.named_weights().items()})
    assert built == pretraining_shapes("ConvNeXtV2Atto")


def test_fcmae_release_caches_and_loads_encoder_and_decoder(cache_root, monkeypatch, fcmae_release, hf_v2_atto, capsys):
    checkpoint, official = fcmae_release
    server = LocalServer()
    server.files[FCMAE_FILENAME] = checkpoint
    try:
        entry = registry.REGISTRY[("ConvNeXtV2Atto", "fcmae")]._replace(url=server.url(FCMAE_FILENAME))
        monkeypatch.setitem(registry.REGISTRY, (entry.variant, entry.tag), entry)
        model = kc.FCMAE("ConvNeXtV2Atto", input_shape=(64, 64, 3), weights="fcmae")
        decoder = model.decoder
        # Each official layout undone here, independently of the naming table.
        np.testing.assert_array_equal(decoder.mask_token.numpy(), official["mask_token"][0, :, 0, 0])
        np.testing.assert_array_equal(decoder.proj.kernel.numpy()[0, 0], official["proj.weight"][:, :, 0, 0].T)
        np.testing.assert_array_equal(decoder.pred.kernel.numpy()[0, 0], official["pred.weight"][:, :, 0, 0].T)
        block = decoder.blocks[0]
        np.testing.assert_array_equal(block.grn.gamma.numpy(), official["decoder.0.grn.gamma"].reshape(-1))
        np.testing.assert_array_equal(block.pwconv2.kernel.numpy(), official["decoder.0.pwconv2.weight"].T)
        np.testing.assert_array_equal(
            block.dwconv.kernel.numpy(), official["decoder.0.dwconv.weight"].transpose(2, 3, 0, 1)
        )
        stem = hf_v2_atto.convnextv2.embeddings.patch_embeddings.weight.detach().numpy()
        np.testing.assert_array_equal(model.encoder.get_layer("stem_conv").kernel.numpy(), stem.transpose(2, 3, 1, 0))

        # One verified cache entry holds both parts; a backbone reads it without a download.
        path = _converted_path(entry)
        assert os.listdir(cache_root / "converted") == [os.path.basename(path)]
        arrays, _ = weights_file.read_weights(path)
        assert {name: a.shape for name, a in arrays.items()} == pretraining_shapes("ConvNeXtV2Atto")
        backbone = kc.ConvNeXtV2Atto(weights="fcmae", include_top=False, input_shape=(64, 64, 3))
        for mine, loaded in zip(backbone.weights, model.encoder.weights):
            np.testing.assert_array_equal(mine.numpy(), loaded.numpy())
        assert len(server.requests) == 1

        # Another decoder: refused, nothing changed.
        small = kc.FCMAE("ConvNeXtV2Atto", input_shape=(64, 64, 3), decoder_dim=8)
        before = [v.numpy().copy() for v in small.weights]
        with pytest.raises(CheckpointError, match=r"weights='fcmae'.*decoder_dim=8"):
            small._load_weights_argument("fcmae")
        for value, variable in zip(before, small.weights):
            np.testing.assert_array_equal(value, variable.numpy())

        # An entry cached without its decoder is rebuilt once, naming the file.
        encoder_only = {name: a for name, a in arrays.items() if not name.startswith("decoder/")}
        manifest = weights_file.read_manifest(path)
        manifest.pop("data_sha256")
        weights_file.write_weights(path, encoder_only, manifest)
        capsys.readouterr()
        assert set(cache.converted_weights(entry, progress=False)) == set(arrays)
        assert path in capsys.readouterr().err and len(server.requests) == 2
    finally:
        server.close()
