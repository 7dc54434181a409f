"""Export from the running backend to every format; artifacts checked by foreign runtimes.

The model is built on the backend under test (on JAX and PyTorch the export
goes through a TensorFlow subprocess). Each artifact is run here by the
runtime that ships it (TensorFlow, LiteRT/TF Lite, onnxruntime) on
scikit-image's photographs and compared with the Keras model's own outputs.
"""

import os

import numpy as np
import pytest

import keras

import keras_convnext
from keras_convnext.export import _SUFFIX, ALL_FORMATS, FORMATS, FULL_INTEGER, ExportError, export_formats, sample_images

SIZE = 64


def _small_model():
    """A small ConvNeXt V2 with any input size and the same weights on every backend.

    The weights come from numpy (backends draw different random numbers),
    scaled like a trained network (unit-variance activations, norm scales
    near 1, nonzero GRN), so the photos get distinct, well-separated top
    classes; a freshly initialized head gives near-uniform scores, where an
    int8 top-1 comparison would be a coin toss.
    """
    model = keras_convnext.ConvNeXt((1, 1, 2, 1), (16, 32, 64, 128), input_shape=(None, None, 3), classes=10)
    rng = np.random.default_rng(7)
    for variable in model.weights:
        shape, name = tuple(variable.shape), variable.path
        noise = rng.standard_normal(shape)
        if len(shape) > 1:
            fan_in = int(np.prod(shape[:-1])) if "dwconv" not in name else int(np.prod(shape[:2]))
            value = noise / np.sqrt(fan_in)
        elif name.endswith("gamma") and "grn" not in name:
            value = 1.0 + 0.1 * noise
        elif "grn" in name:
            value = 0.3 * noise
        else:
            value = 0.05 * noise
        variable.assign(value.astype("float32"))
    return model


# Every format in the TensorFlow run. On JAX and PyTorch the export rebuilds the model on
# TensorFlow in a subprocess from its `.keras` file and converts it there with the same code,
# so those runs check the route itself: SavedModel and float32 TFLite.
ON_TENSORFLOW = keras.backend.backend() == "tensorflow"
REBUILD_ROUTE = ("saved_model", "tflite")
CLASSIFIER_FORMATS = ALL_FORMATS if ON_TENSORFLOW else REBUILD_ROUTE
every_format = pytest.mark.skipif(not ON_TENSORFLOW, reason="this format's conversion is checked in the TensorFlow run")


def _formats_checked_here(formats):
    return [format if format in CLASSIFIER_FORMATS else pytest.param(format, marks=every_format) for format in formats]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _small_model()
    directory = str(tmp_path_factory.mktemp("export"))
    targets = {format: os.path.join(directory, "model" + _SUFFIX[format]) for format in CLASSIFIER_FORMATS}
    calibration = sample_images(SIZE, SIZE) if FULL_INTEGER in targets else None
    reports = export_formats(model, targets, image_size=SIZE, calibration_images=calibration)
    return model, directory, reports


def _run_artifact(format, path, images):
    if format == "saved_model":
        import tensorflow as tf

        serve = tf.saved_model.load(path).signatures["serving_default"]
        return np.asarray(next(iter(serve(images=tf.constant(images)).values())))
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images})[0]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.parametrize("format", _formats_checked_here(FORMATS))
def test_artifact_matches_the_keras_model(exported, format):
    model, directory, reports = exported
    report = reports[format]
    assert os.path.exists(report.path) and report.size_bytes > 0
    assert report.latency_ms > 0 and report.images == 4
    images = sample_images(SIZE, SIZE)
    expected = np.asarray(model.predict(images, verbose=0))
    got = _run_artifact(format, report.path, images)
    assert got.shape == expected.shape == (4, 10)
    if format in ("tflite-fp16", "tflite-int8"):
        np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(expected, -1))
        assert report.top1_agreement == 1.0
    else:
        assert np.max(np.abs(got - expected)) <= 1e-4
        assert report.max_abs_diff <= 1e-4
    # The classes differ between the photos, so top-1 agreement is not trivial.
    assert len(set(np.argmax(expected, -1))) > 1


@pytest.mark.parametrize("format", _formats_checked_here(["saved_model", "onnx"]))
def test_dynamic_batch_and_resolution(exported, format):
    model, _, reports = exported
    assert reports[format].dynamic_batch and reports[format].dynamic_resolution
    images = sample_images(SIZE + 32, SIZE + 32)[:3]
    expected = np.asarray(model.predict(images, verbose=0))
    got = _run_artifact(format, reports[format].path, images)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@every_format
def test_tflite_sizes_shrink_with_quantization(exported):
    _, _, reports = exported
    float32, fp16, int8 = (reports[f].size_bytes for f in ("tflite", "tflite-fp16", "tflite-int8"))
    assert int8 < fp16 < float32


def test_failed_verification_leaves_nothing_behind(tmp_path, monkeypatch):
    import importlib

    # The package attribute `keras_convnext.export` is the function; the module is this.
    export_module = importlib.import_module("keras_convnext.export")

    def fake_writer(model, targets, image_size=224, calibration_images=None):
        for path in targets.values():
            with open(path, "wb") as f:
                f.write(b"artifact")
        return {}

    def failing_check(*args, **kwargs):
        raise ExportError("disagrees")

    monkeypatch.setattr(export_module, "write_artifacts", fake_writer)
    monkeypatch.setattr(export_module, "_write_in_tensorflow_subprocess", fake_writer)
    monkeypatch.setattr(export_module, "verify", failing_check)
    destination = tmp_path / "model.onnx"
    destination.write_bytes(b"previous")
    with pytest.raises(ExportError, match="disagrees"):
        keras_convnext.export(_small_model(), str(destination), format="onnx", overwrite=True)
    assert destination.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no temporary left


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown export format 'coreml'"):
        keras_convnext.export(_small_model(), str(tmp_path / "m"), format="coreml")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the model as this backend traces it")
def test_tflite_converter_takes_the_model_as_traced_for_speed(tmp_path):
    """TensorFlow's own converter, outside `keras_convnext.export`, reads the fast graph too.

    `keras_convnext.export` traces the portable formulation (the fast paths
    off); a user who hands the model to the converter directly gets the
    graph traced for speed.
    """
    import tensorflow as tf

    model = _small_model()
    inputs = keras.Input(batch_shape=(None, SIZE, SIZE, 3))
    fixed = keras.Model(inputs, model(inputs, training=False))
    path = tmp_path / "direct.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(fixed).convert())
    images = sample_images(SIZE, SIZE)
    got = _run_artifact("tflite", str(path), images)
    np.testing.assert_allclose(got, np.asarray(model.predict(images, verbose=0)), atol=1e-4)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="converts in this process")
def test_tflite_artifact_computes_what_the_keras_converter_writes(exported, tmp_path):
    """The TFLite files are converted from one archive of the model instead of
    `TFLiteConverter.from_keras_model` once per format; the float32 file must
    compute bit for bit what that converter's does on the same traced graph."""
    import tensorflow as tf

    from keras_convnext import config

    model, _, reports = exported
    inputs = keras.Input(batch_shape=(None, SIZE, SIZE, 3), name="images")
    fixed = keras.Model(inputs, model(inputs, training=False))
    with config.fast_paths(False):
        converted = tf.lite.TFLiteConverter.from_keras_model(fixed).convert()
    path = tmp_path / "keras_converter.tflite"
    path.write_bytes(converted)
    images = sample_images(SIZE, SIZE)
    np.testing.assert_array_equal(
        _run_artifact("tflite", reports["tflite"].path, images), _run_artifact("tflite", str(path), images)
    )


# ---------------------------------------------------------------- nothing lost, nothing half-done


def _export_module():
    import importlib

    # The package attribute `keras_convnext.export` is the function; the module is this.
    return importlib.import_module("keras_convnext.export")


def _fake_writer(model, targets, image_size=224, calibration_images=None):
    for format, path in targets.items():
        if format == "saved_model":
            os.makedirs(os.path.join(path, "variables"))
            with open(os.path.join(path, "saved_model.pb"), "wb") as f:
                f.write(b"new")
        else:
            with open(path, "wb") as f:
                f.write(b"new " + format.encode())
    return {}


def _use_fake_writer(monkeypatch):
    module = _export_module()
    monkeypatch.setattr(module, "write_artifacts", _fake_writer)
    monkeypatch.setattr(module, "_write_in_tensorflow_subprocess", _fake_writer)
    return module


def _tree(root):
    """`{relative path: bytes or None for folders}` of everything under `root`."""
    tree = {}
    for folder, folders, files in os.walk(root):
        for name in folders:
            tree[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                tree[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return tree


def _user_project(tmp_path):
    project = tmp_path / "my_project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("my notes")
    (project / "src" / "train.py").write_text("print('training')")
    return project


def _ended_process_id():
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_existing_folder_with_user_files_is_refused_and_kept(tmp_path):
    project = _user_project(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        keras_convnext.export(_small_model(), str(project), format="saved_model")
    assert _tree(tmp_path) == before


def test_overwrite_replaces_only_after_verification(tmp_path, monkeypatch):
    module = _use_fake_writer(monkeypatch)
    project = _user_project(tmp_path)
    before = _tree(tmp_path)

    def failing_check(*args, **kwargs):
        raise ExportError("disagrees")

    monkeypatch.setattr(module, "verify", failing_check)
    with pytest.raises(ExportError, match="disagrees"):
        keras_convnext.export(_small_model(), str(project), format="saved_model", overwrite=True)
    assert _tree(tmp_path) == before

    keras_convnext.export(_small_model(), str(project), format="saved_model", overwrite=True,
                          verify_artifact=False, verbose=False)
    assert _tree(tmp_path) == {"my_project": None, "my_project/variables": None, "my_project/saved_model.pb": b"new"}


def test_a_failed_move_of_the_second_artifact_takes_back_the_first(tmp_path, monkeypatch):
    _use_fake_writer(monkeypatch)
    (tmp_path / "model.tflite").write_bytes(b"previous")
    before = _tree(tmp_path)
    real_replace = os.replace

    def replace(source, destination):
        if os.path.basename(destination) == "model.onnx":
            raise OSError("disk full")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    targets = {"tflite": str(tmp_path / "model.tflite"), "onnx": str(tmp_path / "model.onnx")}
    with pytest.raises(OSError, match="disk full"):
        export_formats(_small_model(), targets, verify_artifacts=False, overwrite=True, verbose=False)
    assert _tree(tmp_path) == before


@pytest.mark.slow
@pytest.mark.skipif(not ON_TENSORFLOW, reason="the files' handling is the same on every backend: checked in the TensorFlow run")
def test_failure_in_the_second_format_leaves_nothing_and_stale_temporaries_go(tmp_path, monkeypatch):
    """A real export on this backend: both artifacts are written, the second fails its check."""
    module = _export_module()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".model.tflite.tmp").write_text("also mine")
    stale = [
        f".model.onnx.keras_convnext-tmp-{_ended_process_id()}-0badc0de",
        f".x.keras_convnext-tmp-{_ended_process_id()}-12ab",
    ]
    (out / stale[0]).write_bytes(b"half-written")
    (out / stale[1]).mkdir()
    live = f".model.keras_convnext-tmp-{os.getpid()}-feedbeef"
    (out / live).write_bytes(b"being written")
    # A killed overwrite: the previous model.onnx set aside, the new one not yet in place.
    set_aside = f".model.onnx.keras_convnext-old-{_ended_process_id()}-0ddba11"
    (out / set_aside).write_bytes(b"the previous model.onnx")
    stale.append(f".notes.txt.keras_convnext-old-{_ended_process_id()}-5eed")  # notes.txt is in place
    (out / stale[-1]).write_text("an older notes.txt")
    before = {name: value for name, value in _tree(out).items() if name not in stale + [set_aside]}
    before["model.onnx"] = b"the previous model.onnx"
    checked = []

    def verify_failing_on_tflite(model, format, path, *args, **kwargs):
        # The artifacts were really written (the full check is the tests above); the second "disagrees".
        checked.append((format, os.path.basename(path)))
        if format == "tflite":
            assert os.path.getsize(path) > 0
            raise ExportError("second format disagrees")
        assert os.path.isfile(os.path.join(path, "saved_model.pb"))
        return module.ExportReport(format, path, 1, 0.0, 1.0, 0.0, 4, True, False)

    monkeypatch.setattr(module, "verify", verify_failing_on_tflite)
    targets = {"saved_model": str(out / "model"), "tflite": str(out / "model.tflite")}
    with pytest.raises(ExportError, match="second format disagrees"):
        export_formats(_small_model(), targets, image_size=32, verbose=False)
    assert [format for format, _ in checked] == ["saved_model", "tflite"]
    assert all(".keras_convnext-tmp-" in name for _, name in checked)
    assert _tree(out) == before


# ---------------------------------------------------------------- full-integer int8


@every_format
def test_full_integer_tflite_has_int8_inputs_outputs_and_ops(exported):
    from ai_edge_litert.interpreter import Interpreter

    model, _, reports = exported
    report = reports[FULL_INTEGER]
    assert report.top1_agreement == 1.0  # checked by export: the same class for each photo
    interpreter = Interpreter(model_path=report.path)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    # TFLite keeps the few ops without an int8 kernel (LayerNorm's Neg, GRN's Square) in
    # float32 between a dequantize and a quantize: the two float32 tensors of each island.
    details = interpreter.get_tensor_details()
    islands = sum(detail["name"].startswith("tfl.dequantize") for detail in details)
    assert sum(detail["dtype"] == np.float32 for detail in details) == 2 * islands
    assert 2 * islands < 0.1 * len(details)
    assert reports[FULL_INTEGER].size_bytes < reports["tflite"].size_bytes / 2


def test_full_integer_needs_calibration_images(tmp_path):
    with pytest.raises(ValueError, match="calibration_images"):
        keras_convnext.export(_small_model(), str(tmp_path / "m.tflite"), format=FULL_INTEGER)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- keras-hub task models


# Every format of the task models in the TensorFlow run; the JAX and PyTorch runs check the
# rebuild route.
TASK_FORMATS = ("saved_model", "tflite", "onnx", FULL_INTEGER) if ON_TENSORFLOW else REBUILD_ROUTE


def _tiny_encoder():
    return keras_convnext.ConvNeXt((1, 1, 1, 1), (16, 16, 32, 32), include_top=False, input_shape=(SIZE, SIZE, 3))


@pytest.fixture(scope="module")
def segmenter_exported(tmp_path_factory):
    """DeepLabV3 on ConvNeXt: SavedModel, float32 and full-integer TFLite, ONNX, one conversion run."""
    pytest.importorskip("keras_hub", reason='needs keras-hub: pip install "keras-convnext[hub]"')
    from keras_convnext import hub

    keras.utils.set_random_seed(1)
    segmenter = hub.deeplabv3_segmenter(_tiny_encoder(), num_classes=3, dilation_rates=(1, 2))
    directory = tmp_path_factory.mktemp("segmenter")
    targets = {format: str(directory / f"segmenter{_SUFFIX[format]}") for format in TASK_FORMATS}
    reports = export_formats(segmenter, targets, image_size=SIZE, calibration_images=sample_images(SIZE, SIZE),
                             min_top1_agreement=0.9, verbose=False)
    return segmenter, reports


@pytest.mark.slow
def test_segmenter_exports_match_the_keras_model(segmenter_exported):
    segmenter, reports = segmenter_exported
    images = sample_images(SIZE, SIZE)
    # training=False: keras-hub's DeepLabV3 computes otherwise when `training` is left unset.
    expected = keras.ops.convert_to_numpy(segmenter(images, training=False))
    assert expected.shape == (4, SIZE, SIZE, 3)
    for format in ("saved_model", "tflite", "onnx"):
        if format in reports:
            got = _run_artifact(format, reports[format].path, images)
            assert np.max(np.abs(got - expected)) <= 1e-4, format
    # Full-integer: the class of at least 90% of the pixels, as export checked.
    if FULL_INTEGER in reports:
        assert reports[FULL_INTEGER].top1_agreement >= 0.9
    assert len(np.unique(np.argmax(expected, -1))) > 1  # not one class everywhere


@pytest.fixture(scope="module")
def detector_exported(tmp_path_factory):
    """RetinaNet on ConvNeXt: SavedModel, float32 and full-integer TFLite, ONNX, one conversion run."""
    pytest.importorskip("keras_hub", reason='needs keras-hub: pip install "keras-convnext[hub]"')
    from keras_convnext import hub

    keras.utils.set_random_seed(2)
    # One 3x3 convolution per head instead of keras-hub's four: the same graph structure, a quarter of it.
    detector = hub.retinanet_detector(_tiny_encoder(), num_classes=3, pre_logits_num_conv_layers=1)
    directory = tmp_path_factory.mktemp("detector")
    targets = {format: str(directory / f"detector{_SUFFIX[format]}") for format in TASK_FORMATS}
    # Full-integer: the top class of at least 80% of the anchors in each output, checked by export.
    reports = export_formats(detector, targets, image_size=SIZE, calibration_images=sample_images(SIZE, SIZE),
                             min_top1_agreement=0.8, verbose=False)
    return detector, reports


@pytest.mark.slow
def test_detector_exports_keep_both_dict_outputs(detector_exported):
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    detector, reports = detector_exported
    images = sample_images(SIZE, SIZE)
    expected = {name: keras.ops.convert_to_numpy(value) for name, value in detector(images, training=False).items()}
    assert sorted(expected) == ["bbox_regression", "cls_logits"]
    serve = tf.saved_model.load(reports["saved_model"].path).signatures["serving_default"]
    from_saved_model = {name: value.numpy() for name, value in serve(images=tf.constant(images)).items()}
    runner = Interpreter(model_path=reports["tflite"].path).get_signature_runner()
    from_tflite = runner(**{next(iter(runner.get_input_details())): images})
    # ONNX keeps the outputs in the order of their sorted names.
    from_files = [from_saved_model, from_tflite]
    if "onnx" in reports:
        from_files.append(dict(zip(sorted(expected), _run_onnx_outputs(reports["onnx"].path, images))))
    for outputs in from_files:
        assert sorted(outputs) == sorted(expected)
        for name in expected:
            assert np.max(np.abs(outputs[name] - expected[name])) <= 1e-4, name
    if FULL_INTEGER in reports:
        assert reports[FULL_INTEGER].top1_agreement >= 0.8


def _run_onnx_outputs(path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})
