"""The PyTorch-free checkpoint reader against `torch.load(weights_only=True)` on files torch wrote."""

import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

import keras_convnext as kc
from keras_convnext.weights import files, torch_zip

torch = pytest.importorskip("torch")


def _reference(value):
    """What torch.load gives, as numpy (bfloat16 widened to float32, as the reader does)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, dict):
        return type(value)((key, _reference(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_reference(item) for item in value)
    return value


def _assert_same(got, expected, where="top"):
    if isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray), where
        assert got.dtype == expected.dtype and got.shape == expected.shape, (where, got.dtype, expected.dtype)
        np.testing.assert_array_equal(got, expected, err_msg=where)
    elif isinstance(expected, dict):
        assert type(got) is type(expected) and list(got) == list(expected), where
        for key in expected:
            _assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected)):
            _assert_same(a, b, f"{where}[{index}]")
    else:
        assert got == expected, where


def _mixed_state_dict():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=generator)
    return OrderedDict(
        float32=torch.randn(3, 4, generator=generator),
        float16=torch.randn(5, generator=generator).half(),
        bfloat16=torch.randn(7, generator=generator).bfloat16(),
        float64=torch.randn(2, 2, generator=generator).double(),
        int64=torch.arange(-5, 5),
        int32=torch.arange(4, dtype=torch.int32),
        uint8=torch.arange(250, 256, dtype=torch.uint8),
        bool=torch.tensor([True, False, True]),
        strided=base[:, ::2].t(),  # a non-contiguous view of a shared storage
        shared=base,
        shared_rows=base[2:4],
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
        parameter=torch.nn.Parameter(torch.randn(3, generator=generator)),
    )


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "model_ema", "ema", "module", "net"])
def test_reader_matches_torch_load(tmp_path, wrapper):
    state = _mixed_state_dict()
    metadata = {"epoch": 7, "note": "text", "raw": b"\x00\xff", "list": [1, 2.5, None]}
    saved = state if wrapper is None else {wrapper: state, **metadata}
    path = str(tmp_path / "checkpoint.pth")
    torch.save(saved, path)
    expected = _reference(torch.load(path, weights_only=True))
    got = torch_zip.load(path)
    _assert_same(got, expected)
    assert (got if wrapper is None else got[wrapper])["bfloat16"].dtype == np.float32
    flat = kc.read_checkpoint(path)
    assert sorted(flat) == sorted(state)
    _assert_same(flat["strided"], state["strided"].numpy())


def test_nested_wrappers_and_data_parallel_prefix(tmp_path):
    weight = torch.randn(2, 3)
    path = str(tmp_path / "wrapped.pt")
    torch.save({"state_dict": {"module": {"module.stem.weight": weight}}, "optimizer": {"lr": 0.1}}, path)
    np.testing.assert_array_equal(kc.read_checkpoint(path)["stem.weight"], weight.numpy())


def test_ema_weights_are_preferred_and_named(tmp_path):
    path = str(tmp_path / "training.pth")
    torch.save({"model": {"w": torch.zeros(2)}, "model_ema": {"w": torch.ones(2)}, "epoch": 3}, path)
    with pytest.warns(UserWarning, match="'model_ema', 'model'; loading 'model_ema'"):
        arrays = kc.read_checkpoint(path)
    np.testing.assert_array_equal(arrays["w"], np.ones(2, "float32"))


def test_big_endian_storages(tmp_path):
    """A file saved on a big-endian machine: same records, `byteorder` "big", swapped bytes."""
    path = str(tmp_path / "little.pt")
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7
    torch.save({"w": tensor}, path)
    swapped = str(tmp_path / "big.pt")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(swapped, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            target.writestr(name, data)
    np.testing.assert_array_equal(torch_zip.load(swapped)["w"], tensor.numpy())


def test_the_reader_needs_no_torch(tmp_path):
    """The reader module, loaded on its own in a process where importing torch fails."""
    import subprocess
    import sys

    path = str(tmp_path / "c.pt")
    torch.save({"model": {"w": torch.ones(2, 2)}}, path)
    code = (
        "import importlib.util, sys\n"
        "sys.modules['torch'] = None\n"  # any import of torch now fails
        f"spec = importlib.util.spec_from_file_location('torch_zip', {torch_zip.__file__!r})\n"
        "reader = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(reader)\n"
        f"print(reader.load({path!r})['model']['w'].sum())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "4.0"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "code_ran"
    path = str(tmp_path / "malicious.pth")
    torch.save({"model": {"w": torch.ones(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(kc.CheckpointError, match=r"posix\.system|nt\.system"):
        kc.read_checkpoint(path)
    assert not marker.exists()
    # The same payload as a plain pickle inside a hand-made archive.
    handmade = str(tmp_path / "handmade.pt")
    with zipfile.ZipFile(handmade, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": _RunsCode(marker)}, protocol=2))
    with pytest.raises(kc.CheckpointError, match="could run code"):
        kc.read_checkpoint(handmade)
    assert not marker.exists()


def test_legacy_files_are_read_by_torch_when_installed(tmp_path):
    path = str(tmp_path / "legacy.pth")
    torch.save({"model": {"w": torch.ones(3)}}, path, _use_new_zipfile_serialization=False)
    assert not torch_zip.is_zip_checkpoint(path)
    np.testing.assert_array_equal(kc.read_checkpoint(path)["w"], np.ones(3, "float32"))


def test_legacy_files_without_torch_are_refused_with_the_way_to_resave(tmp_path, monkeypatch):
    path = str(tmp_path / "legacy.pth")
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(kc.CheckpointError, match=r"legacy.*torch\.save\(torch\.load\(path, weights_only=True\)"):
        kc.read_checkpoint(path)
