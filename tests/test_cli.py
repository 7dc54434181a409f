"""The keras-convnext command line as a user runs it: the console script, in a subprocess.

Exit status 0 on success, 2 for usage errors, 1 for failures, and one line
on stderr (no traceback, no Python repr) for every expected error.
"""

import os
import subprocess
import sys
import tomllib

import pytest

import keras

import keras_convnext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
COMMANDS = ("predict", "export", "convert", "benchmark", "train", "finetune", "evaluate", "fcmae-pretrain")


def command_line():
    """The installed `keras-convnext` next to this Python, else `python -m keras_convnext.cli`."""
    script = os.path.join(os.path.dirname(sys.executable), "keras-convnext")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "keras_convnext.cli"]


def run_cli(arguments, cwd, python_path=(ROOT,), env=None, timeout=600, prefix=None):
    """Runs the command line; returns the CompletedProcess (text output)."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    environment["PYTHONPATH"] = os.pathsep.join(python_path)
    return subprocess.run([*(prefix or command_line()), *arguments], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done, status, *fragments):
    """Exit status `status`, one error line on stderr naming `fragments`, no traceback or repr."""
    assert done.returncode == status, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[-1], errors[-1]


def test_console_script_and_extras_are_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["keras-convnext"] == "keras_convnext.cli:main"
    extras = project["optional-dependencies"]
    needs = {
        "images": ["Pillow"], "plots": ["matplotlib"], "data": ["scikit-learn", "scikit-image"],
        "train": ["tensorflow", "scikit-learn", "matplotlib"], "export": ["tensorflow", "tf2onnx", "onnxruntime"],
        "benchmark": ["transformers"], "jax": ["jax"], "torch": ["torch"], "tensorflow": ["tensorflow"],
        "test": ["tf2onnx", "onnxruntime", "ai-edge-litert", "Pillow", "matplotlib"],
    }
    for extra, packages in needs.items():
        for package in packages:
            assert any(dep.startswith(package) for dep in extras[extra]), (extra, package)


def test_help_and_usage_errors_need_no_keras(tmp_path):
    """Help and usage errors are answered before Keras is imported: a Keras that cannot be imported is never touched."""
    blocked = tmp_path / "blocked"
    (blocked / "keras").mkdir(parents=True)
    (blocked / "keras" / "__init__.py").write_text("raise ImportError('Keras was imported')\n")
    paths = (str(blocked), ROOT)
    done = run_cli(["--help"], tmp_path, paths)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(command in done.stdout for command in COMMANDS)
    for command in ("predict", "train", "finetune", "evaluate", "fcmae-pretrain", "benchmark"):
        done = run_cli(["--backend", "jax", command, "--help"], tmp_path, paths)
        assert done.returncode == 0 and "usage: keras-convnext " + command in done.stdout, done.stderr[-3000:]
    assert run_cli([], tmp_path, paths).returncode == 2
    assert_one_line_error(run_cli(["fly"], tmp_path, paths), 2, "unknown command 'fly'")
    assert_one_line_error(run_cli(["--backend", "cuda", "predict", "x.png"], tmp_path, paths), 2, "--backend")
    assert_one_line_error(run_cli(["predict", "x.png", "--backend=mxnet"], tmp_path, paths), 2, "'mxnet'")


@pytest.fixture(scope="module")
def small_imagenet_model(tmp_path_factory):
    """A small 1000-class ConvNeXt V2 saved as .keras, a photo and a broken image on disk."""
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
    broken = directory / "broken.jpg"
    broken.write_bytes(b"not an image")
    return model, path, photo, str(broken)


# The exit statuses and messages do not depend on the backend: checked once, in the PyTorch run
# (the wheel test below runs a command on every backend).
once = pytest.mark.skipif(BACKEND != "torch", reason="checked once, in the PyTorch run")


@pytest.mark.slow
@once
def test_predict_succeeds_with_status_0_and_plain_text(small_imagenet_model, tmp_path):
    """Also: `--backend` after the command wins over KERAS_BACKEND (Keras starts on the flag's backend)."""
    from keras_convnext.workflows.prediction import load_image

    model, path, photo, _ = small_imagenet_model
    other = "torch" if BACKEND != "torch" else "jax"
    done = run_cli(["predict", photo, photo, "--model-path", path, "--backend", BACKEND], tmp_path,
                   env={"KERAS_BACKEND": other})
    assert done.returncode == 0, done.stderr[-3000:]
    expected = keras_convnext.decode_predictions(model.predict(load_image(photo, 32)[None], verbose=0))[0]
    lines = done.stdout.splitlines()
    assert lines.count(photo) == 2
    assert expected[0][1] in lines[1] and lines[1].strip().startswith("1.")
    assert "5." in lines[5] and "[(" not in done.stdout + done.stderr  # no Python repr


@pytest.mark.slow
@once
def test_predict_failures_are_one_line_with_status_1_or_2(small_imagenet_model, tmp_path):
    _, path, photo, broken = small_imagenet_model
    assert_one_line_error(run_cli(["predict", broken, "--model-path", path], tmp_path), 1, "cannot read image")
    assert_one_line_error(run_cli(["predict", photo, "--model-path", str(tmp_path / "missing.keras")], tmp_path),
                          1, "missing.keras", "does not exist")
    assert_one_line_error(run_cli(["predict", photo, "--model", "ConvNeXtGiant", "--weights", "none"], tmp_path),
                          2, "'ConvNeXtGiant' is unknown")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04 not a checkpoint")
    assert_one_line_error(run_cli(["predict", photo, "--model", "ConvNeXtV2Atto", "--weights", str(damaged)],
                                  tmp_path), 1, "damaged.pt")


@pytest.mark.slow
@once
def test_full_integer_export_needs_calibration_images(small_imagenet_model, tmp_path):
    _, path, photo, _ = small_imagenet_model
    export = ["export", "--model-path", path, "--format", "tflite-int8-full", "-o", "out"]
    assert_one_line_error(run_cli(export, tmp_path), 2, "--calibration-images")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli([*export, "--calibration-images", "empty"], tmp_path), 2, "holds no image files")
    import numpy as np

    np.save(tmp_path / "flat.npy", np.zeros((4, 32), "float32"))
    assert_one_line_error(run_cli([*export, "--calibration-images", "flat.npy"], tmp_path), 2, "(4, 32)")
    assert not (tmp_path / "out").exists()



def _without(directory, *modules):
    """A PYTHONPATH entry under which each of `modules` looks uninstalled."""
    for module in modules:
        (directory / module).mkdir(parents=True)
        (directory / module / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {module!r}", name={module!r})\n')
    return str(directory)


def test_require_names_the_package_and_its_install_command(monkeypatch):
    import importlib

    from keras_convnext import _deps

    assert _deps.require("json", "parsing").dumps(1) == "1"
    original = importlib.import_module

    def without_matplotlib(name, *args):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
        return original(name, *args)

    monkeypatch.setattr(_deps.importlib, "import_module", without_matplotlib)
    with pytest.raises(_deps.MissingDependencyError) as error:
        _deps.require("matplotlib.pyplot", "plotting")
    assert str(error.value) == (
        "plotting needs matplotlib, which is not installed; install it with: pip install 'keras-convnext[plots]'"
    )
    assert _deps.install_command("torch").endswith("--index-url https://download.pytorch.org/whl/cpu")
    assert _deps.install_command("PIL") == "pip install 'keras-convnext[images]'"


@pytest.mark.slow
@once
def test_missing_packages_are_named_with_their_install_command(tmp_path):
    """Pillow for predict; TensorFlow for train's tf.data pipelines, even on JAX."""
    no_pillow = _without(tmp_path / "no_pillow", "PIL")
    done = run_cli(["predict", "x.png", "--model", "ConvNeXtV2Atto", "--weights", "none"], tmp_path, (no_pillow, ROOT))
    assert_one_line_error(done, 1, "reading images needs Pillow", "pip install 'keras-convnext[images]'")
    no_tensorflow = _without(tmp_path / "no_tensorflow", "tensorflow")
    done = run_cli(["--backend", "jax", "train", "--data", "digits", "--epochs", "1", "--output-dir", "run"],
                   tmp_path, (no_tensorflow, ROOT))
    assert_one_line_error(done, 1, "needs tensorflow", "pip install 'keras-convnext[tensorflow]'")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- from an installed wheel, outside the checkout


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The package built as a wheel and installed into a fresh directory: `(site directory, console script)`."""
    import shutil

    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(os.path.join(ROOT, "keras_convnext"), source / "keras_convnext",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(work / "dist")],
                           cwd=work, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (work / "dist").glob("keras_convnext-*.whl")
    site = work / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                               cwd=work, capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    script = site / "bin" / "keras-convnext"
    assert script.exists()
    return str(site), [str(script)]


@pytest.mark.slow
def test_wheel_runs_help_and_predict_on_every_backend(installed_wheel, tmp_path):
    from PIL import Image

    from keras_convnext.data import digits_arrays

    site, script = installed_wheel
    origin = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('keras_convnext').origin)"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=site), capture_output=True, text=True,
    ).stdout.strip()
    assert origin.startswith(site), origin  # the installed copy, not the checkout
    done = run_cli(["--help"], tmp_path, (site,), prefix=script)
    assert done.returncode == 0 and all(command in done.stdout for command in COMMANDS), done.stderr[-3000:]
    images, labels, _, _ = digits_arrays(32)
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    other = "jax" if BACKEND == "tensorflow" else "tensorflow"  # --backend after the command wins
    done = run_cli(["predict", "digit.png", "--model", "ConvNeXtV2Atto", "--weights", "none", "--image-size", "32",
                    "--top", "3", "--backend", BACKEND], tmp_path, (site,), env={"KERAS_BACKEND": other}, prefix=script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0] == "digit.png" and done.stdout.count("  3. ") == 1


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="the full command matrix runs once, in the TensorFlow run")
def test_wheel_runs_every_command_on_digits(installed_wheel, tmp_path):
    """Every subcommand of the installed wheel, from a directory outside the checkout, on real digits."""
    import json

    from PIL import Image

    from keras_convnext.data import digits_arrays

    site, script = installed_wheel

    def cli(*arguments, status=0, env=None, backend="torch"):
        # PyTorch runs the tiny models' steps without tracing them first (the quickest here);
        # export writes its files with TensorFlow, so it runs on TensorFlow.
        done = run_cli(["--backend", backend, *arguments], tmp_path, (site,), env=env, prefix=script)
        assert done.returncode == status, (arguments, done.stdout[-2000:], done.stderr[-3000:])
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        return done

    tiny = ["--data", "digits", "--limit", "64", "--epochs", "1", "--batch-size", "32", "--image-size", "32",
            "--depths", "1,1,1,1", "--dims", "8,8,16,16", "--quiet"]
    cli("train", *tiny, "--learning-rate", "3e-3", "--output-dir", "run")
    for name in ("model.keras", "history.json", "confusion_matrix.csv", "training_curves.png"):
        assert os.path.getsize(tmp_path / "run" / name) > 0, name

    done = cli("evaluate", "--model-path", "run/model.keras", "--data", "digits", "--limit", "64",
               "--history", "run/history.json", "--output-dir", "evaluation")
    assert "top-1:" in done.stdout and "true\\pred" in done.stdout
    with open(tmp_path / "evaluation" / "training_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    cli("evaluate", "--model-path", "run/missing.keras", "--data", "digits", status=1)

    cli("finetune", *tiny, "--no-randaugment", "--random-erasing", "0", "--mixup", "0", "--cutmix", "0",
        "--output-dir", "tuned")
    with open(tmp_path / "tuned" / "history.json") as f:
        assert len(json.load(f)["loss"]) == 1

    cli("fcmae-pretrain", "--data", "digits", "--num-images", "8", "--epochs", "1", "--batch-size", "4",
        "--image-size", "64", "--depths", "1,1,1,1", "--dims", "8,8,16,16", "--decoder-dim", "8", "--samples", "2",
        "--quiet", "--output-dir", "fcmae")
    for name in ("reconstructions.png", "loss_curve.png", "history.json", "encoder.weights.h5"):
        assert os.path.getsize(tmp_path / "fcmae" / name) > 0, name

    images, labels, _, _ = digits_arrays(32)
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    done = cli("predict", "digit.png", "--model-path", "run/model.keras", "--top", "2")
    assert done.stdout.splitlines()[0] == "digit.png" and "  2. class " in done.stdout

    # A file of the user's where the export goes: refused without --overwrite, replaced with it.
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "model.tflite").write_bytes(b"the user's file")
    done = cli("export", "--model-path", "run/model.keras", "--format", "tflite", "-o", "exported", status=1,
               backend="tensorflow")
    assert "overwrite" in done.stderr
    assert (tmp_path / "exported" / "model.tflite").read_bytes() == b"the user's file"
    (tmp_path / "calibration").mkdir()
    for index, image in enumerate(images[:8]):
        Image.fromarray(image).save(tmp_path / "calibration" / f"{index}.png")
    done = cli("export", "--model-path", "run/model.keras", "--format", "tflite", "--format", "tflite-int8-full",
               "--calibration-images", "calibration", "--min-agreement", "0.5", "-o", "exported", "--overwrite",
               backend="tensorflow")
    for name in ("model.tflite", "model_int8_full.tflite"):
        with open(tmp_path / "exported" / name, "rb") as f:
            assert f.read(8)[4:8] == b"TFL3", name
    assert "tflite-int8-full" in done.stdout

    # No network: every registry entry is unreachable, so nothing is converted.
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy":
               "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": "",
               "KERAS_CONVNEXT_CACHE_DIR": str(tmp_path / "cache"), "KERAS_CONVNEXT_WEIGHTS_DIR": ""}
    done = cli("convert", "--all", "--output-dir", "converted", status=1, env=offline)
    assert "unreachable (skipped)" in done.stdout and "could be converted" in done.stderr
    assert not os.path.exists(tmp_path / "converted") or not os.listdir(tmp_path / "converted")
    cli("convert", "no_such_file.pt", status=2)

    cli("benchmark", "--model", "ConvNeXtV2Atto", "--backends", "torch", "--no-reference", "--no-matmul-peak",
        "--batch-size", "2", "--train-batch-size", "0", "--resolution", "32", "--repeats", "2",
        "--output-dir", "bench", "--name", "tiny")
    with open(tmp_path / "bench" / "tiny.json") as f:
        row = json.load(f)["results"]["keras_convnext/torch"]
    assert row["inference_images_per_s"] > 0, row
    assert (tmp_path / "bench" / "tiny.md").exists()
