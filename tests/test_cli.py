"""The keras-convnext command line: help everywhere, predict, export, pass-throughs, errors."""

import os
import sys
import tomllib

import numpy as np
import pytest

import keras

import keras_convnext
from keras_convnext import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_console_script_is_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["keras-convnext"] == "keras_convnext.cli:main"
    for package in ("tf2onnx", "onnxruntime", "ai-edge-litert"):
        assert any(dep.startswith(package) for dep in project["optional-dependencies"]["test"]), package


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("predict", "export", "convert", "benchmark", "train", "finetune", "evaluate", "fcmae-pretrain"):
        assert command in text


@pytest.mark.parametrize("command", ["predict", "export", "train", "finetune", "evaluate"])
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--backend" in capsys.readouterr().out


def test_benchmark_is_passed_through(monkeypatch, tmp_path, capfd):
    script = tmp_path / "benchmarks" / "run.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('benchmark args', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "REPOSITORY", str(tmp_path))
    assert cli.main(["benchmark", "--model", "ConvNeXtV2Atto", "--batch-size", "2"]) == 3
    assert "benchmark args ['--model', 'ConvNeXtV2Atto', '--batch-size', '2']" in capfd.readouterr().out


def test_missing_pieces_give_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="unknown command 'fly'"):
        cli.main(["fly"])
    monkeypatch.setattr(cli, "REPOSITORY", str(tmp_path))
    with pytest.raises(SystemExit, match="benchmarks/run.py, which is not in"):
        cli.main(["benchmark"])
    with pytest.raises(SystemExit, match="examples/fcmae_pretrain.py, which is not in"):
        cli.main(["fcmae-pretrain", "--help"])
    monkeypatch.setitem(sys.modules, "keras_convnext.convert", None)  # simulates an install without it
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])


def test_convert_delegates_to_the_converter(monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("keras_convnext.convert")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "keras_convnext.convert", fake)
    assert cli.main(["convert", "a.pt", "b.weights.h5"]) == 0
    assert calls == [["a.pt", "b.weights.h5"]]


@pytest.fixture(scope="module")
def small_imagenet_model(tmp_path_factory):
    """A small 1000-class ConvNeXt V2 saved as .keras, and a photo on disk."""
    from PIL import Image
    import skimage.data

    directory = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    model = keras_convnext.ConvNeXt((1, 1, 1, 1), (16, 16, 32, 32), input_shape=(32, 32, 3))
    head = model.get_layer("predictions")
    head.kernel.assign(head.kernel * 50.0)
    path = str(directory / "model.keras")
    model.save(path)
    photo = str(directory / "chelsea.png")
    Image.fromarray(skimage.data.chelsea()).save(photo)
    return model, path, photo


def test_predict_prints_top5_class_names(small_imagenet_model, capsys):
    model, path, photo = small_imagenet_model
    results = cli.main(["predict", photo, photo, "--model-path", path, "--image-size", "32"])
    expected = keras_convnext.decode_predictions(model.predict(cli.load_image(photo, 32)[None], verbose=0))[0]
    assert len(results) == 2
    assert [name for _, name, _ in results[0][1]] == [name for _, name, _ in expected]
    np.testing.assert_allclose([s for *_, s in results[0][1]], [s for *_, s in expected], rtol=1e-5)
    text = capsys.readouterr().out
    assert expected[0][1] in text and "5." in text


def test_predict_reports_bad_inputs(small_imagenet_model, tmp_path):
    _, path, _ = small_imagenet_model
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="cannot read image"):
        cli.main(["predict", str(broken), "--model-path", path])
    with pytest.raises(SystemExit, match="--model 'ConvNeXtGiant' is unknown"):
        cli.main(["predict", str(broken), "--model", "ConvNeXtGiant"])


def test_export_command_writes_a_verified_onnx(small_imagenet_model, tmp_path, capsys):
    _, path, _ = small_imagenet_model
    reports = cli.main(["export", "--model-path", path, "--format", "onnx", "-o", str(tmp_path)])
    report = reports["onnx"]
    assert os.path.getsize(tmp_path / "model.onnx") == report.size_bytes > 0
    assert report.max_abs_diff <= 1e-4
    assert "onnx" in capsys.readouterr().out
