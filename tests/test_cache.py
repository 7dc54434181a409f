"""The pretrained cache: conversion without a model, trusted hashes, self-healing, locks, deadlines."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

import keras_convnext as kc
from keras_convnext.weights import cache, download, registry, weights_file
from keras_convnext.weights.files import CheckpointError
from keras_convnext.weights.shapes import variant_shapes
from local_server import LocalServer
from naming_fixtures import hf_to_official

FILENAME = "convnextv2_atto_1k_224_ema.pt"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _official_bytes(reference, scale=1.0):
    import torch

    state_dict = hf_to_official({k: v.detach().clone() * scale for k, v in reference.state_dict().items()})
    buffer = io.BytesIO()
    torch.save({"model": state_dict}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def official_checkpoint(hf_v2_atto):
    return _official_bytes(hf_v2_atto)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(download.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.delenv(download.DEADLINE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def server(official_checkpoint):
    server = LocalServer()
    server.files[FILENAME] = official_checkpoint
    yield server
    server.close()


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
    server.files[FILENAME] = _official_bytes(hf_v2_atto, scale=1.01)  # well formed, other weights
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


def test_concurrent_first_use_shares_one_download(official_checkpoint, tmp_path):
    # Two processes, one cache, a slow server: the second waits on the lock, then reads the result.
    server = LocalServer(drip_bytes=256 * 1024, drip_seconds=0.2)
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
