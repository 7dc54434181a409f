"""Export a Keras model to SavedModel, TFLite (float32, float16, int8) and ONNX, from any backend.

    keras_convnext.export(model, "convnext_savedmodel", format="saved_model")
    keras_convnext.export(model, "convnext.tflite", format="tflite-int8")
    keras_convnext.export(model, "convnext_int8_full.tflite", format="tflite-int8-full",
                          calibration_images=training_images[:100])
    keras_convnext.export_formats(model, "exported/")   # every format of FORMATS, one conversion run

`model` is any Keras model with one image input: a keras_convnext
classifier or backbone, or a keras-hub task on one (RetinaNet, DeepLabV3,
`keras_convnext.hub.ConvNeXtImageClassifier`), with one output, a list or
a dict of outputs.

The artifacts are written by TensorFlow. On the TensorFlow backend that
happens in this process; on JAX and PyTorch the model is saved as `.keras`,
rebuilt on the TensorFlow backend in a subprocess (same layers, same
weights) and written there, because those backends cannot trace every
ConvNeXt op into a TensorFlow graph (PyTorch's `torch.export` rejects the
dynamic shapes).

Each artifact is then checked against the Keras model in this process, on
real photographs (scikit-image's sample images): the SavedModel reloaded
in TensorFlow, TFLite through the LiteRT (or TF Lite) interpreter, ONNX
through onnxruntime, against the model's call with `training=False`.
Float32 formats must agree to `atol` (1e-4) in every output, quantized ones
in top-1 class; size and latency are printed. Only
a verified artifact is moved into place (atomic `os.replace`); a failed
check leaves the destination untouched, and an existing destination is
replaced only with `overwrite=True`.

ONNX files use opset 17 and hold each LayerNorm as one `LayerNormalization`
node (`keras_convnext.onnx_layer_norm`), which runtimes run as one kernel,
instead of the mean/variance/scale ops TensorFlow traces it into.

Inputs of every artifact: float32 images `(batch, height, width, 3)` with
pixels in [0, 255] (channels_last models; channels_first models take
`(batch, 3, height, width)`); "tflite-int8-full" files take them as int8,
quantized with the input tensor's scale and zero point. Batch size is dynamic in every format; the
SavedModel and ONNX artifacts also take any resolution when the model was
built with `input_shape=None`-style dynamic sizes or is fully convolutional.
"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

from keras_convnext import config
from keras_convnext.onnx_layer_norm import LAYER_NORM_OPSET, rewrite_layer_norm

FORMATS = ("saved_model", "tflite", "tflite-fp16", "tflite-int8", "onnx")
"""The formats `export_formats` writes into a folder, and the command line's default."""
FULL_INTEGER = "tflite-int8-full"
"""Full-integer TFLite: int8 weights, activations, inputs and outputs; needs `calibration_images`."""
ALL_FORMATS = FORMATS + (FULL_INTEGER,)
_SUFFIX = {"saved_model": "", "tflite": ".tflite", "tflite-fp16": "_fp16.tflite",
           "tflite-int8": "_int8.tflite", "onnx": ".onnx", FULL_INTEGER: "_int8_full.tflite"}
_QUANTIZED = ("tflite-fp16", "tflite-int8", FULL_INTEGER)
_ONNX_OPSET = LAYER_NORM_OPSET  # 17: the first with LayerNormalization, so LayerNorm stays one node


class ExportError(RuntimeError):
    """An export failed to convert, or the artifact disagreed with the Keras model."""


@dataclasses.dataclass
class ExportReport:
    """What `export` wrote and how the artifact compared with the Keras model."""

    format: str
    path: str
    size_bytes: int
    max_abs_diff: float  # over all outputs on the check images
    top1_agreement: float  # fraction of check images with the same top class
    latency_ms: float  # median, batch of one image, CPU
    images: int
    dynamic_batch: bool
    dynamic_resolution: bool

    def __str__(self):
        return (
            f"{self.format:12s} {self.path}  {self.size_bytes / 2**20:.2f} MiB  "
            f"max|diff| {self.max_abs_diff:.2e}  top-1 agreement {self.top1_agreement:.2f} "
            f"({self.images} images)  latency {self.latency_ms:.2f} ms  "
            f"dynamic batch {'yes' if self.dynamic_batch else 'no'}, "
            f"resolution {'yes' if self.dynamic_resolution else 'no'}"
        )


def _check_format(format):
    if format not in ALL_FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {', '.join(ALL_FORMATS)}.")


def _check_calibration(targets, calibration_images):
    """Full-integer files need calibration images; returns them as float32 or None."""
    if FULL_INTEGER not in targets:
        return None
    if calibration_images is None:
        raise ValueError(
            f"The {FULL_INTEGER} format quantizes activations, inputs and outputs to int8, and needs "
            "calibration_images: about 100 of your own training images, float32 pixels in [0, 255] "
            "in the model's input shape."
        )
    images = np.asarray(calibration_images, "float32")
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"calibration_images must be a batch of images (n, height, width, channels); got shape {images.shape}."
        )
    return images


def _layout(model):
    """('channels_last' | 'channels_first', height, width) of the model's image input."""
    shape = tuple(model.input_shape)
    if len(shape) != 4:
        raise ValueError(f"export expects a model with one image input (batch, h, w, c); got {shape}.")
    if shape[-1] == 3 or (shape[1] != 3 and shape[-1] is not None):
        return "channels_last", shape[1], shape[2]
    return "channels_first", shape[2], shape[3]


def _input_spec_shape(data_format, height, width, channels=3):
    if data_format == "channels_last":
        return (None, height, width, channels)
    return (None, channels, height, width)


# ---------------------------------------------------------------- writing (TensorFlow)


def _serving_function(model, shape):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    def serve(images):
        return model(images, training=False)

    return serve


def _resolution_free(model, data_format):
    """A signature with free height/width if the model accepts it, else the fixed one."""
    fixed = _input_spec_shape(data_format, *_layout(model)[1:])
    free = _input_spec_shape(data_format, None, None)
    if fixed == free:
        return free
    try:
        _serving_function(model, free).get_concrete_function()
        return free
    except Exception:  # a layer that needs a static size: keep the model's own shape
        return fixed


def _write_saved_model(model, path, shape):
    import tensorflow as tf

    module = tf.Module()
    module.model = model
    module.serve = _serving_function(model, shape)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def _fixed_size_model(model, shape):
    """`model` behind an input of static spatial size (TFLite wants one); the batch stays free."""
    import keras

    if tuple(model.input_shape) == tuple(shape):
        return model
    inputs = keras.Input(batch_shape=shape, name="images")
    return keras.Model(inputs, model(inputs, training=False), name=model.name)


def _write_keras_archive(model, directory):
    """The SavedModel `TFLiteConverter.from_keras_model` writes for itself: `model(x, training=False)`.

    A Keras export archive with one endpoint whose signature is the model's
    inputs. `from_keras_model` writes it anew on every `convert()`; written
    once, it serves every TFLite format (the small test model's three: one
    export of 4 s instead of three of 6-9 s). The converted files compute
    bit for bit what `from_keras_model`'s do. A SavedModel of a
    `tf.function` serving function, or a concrete function, is not used:
    with TF 2.21 those gave NaN outputs for ConvNeXt in the interpreter.
    """
    import functools

    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = [tf.TensorSpec(tensor.shape, tensor.dtype, name=tensor.name) for tensor in model.inputs]
    archive.add_endpoint("serve", functools.partial(model.__call__, training=False), signature)
    archive.write_out(directory, verbose=False)


def tflite_converter(archive, format, calibration_images=None):
    """A `tf.lite.TFLiteConverter` of the SavedModel `archive`, configured for a TFLite `format`.

    "tflite": float32. "tflite-fp16": float16 weights. "tflite-int8":
    dynamic-range quantization, int8 weights and float activations, no
    calibration. "tflite-int8-full": int8 weights and activations and int8
    inputs and outputs (what integer-only accelerators and microcontrollers
    run), every op an int8 builtin, with activation ranges calibrated on
    `calibration_images` (float32 `(n, height, width, channels)`, one
    image per calibration step).
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(archive)
    if format in _QUANTIZED:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if format == "tflite-fp16":
        converter.target_spec.supported_types = [tf.float16]
    if format == FULL_INTEGER:
        def representative_dataset():
            for image in calibration_images:
                yield [image[None]]

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter


def _write_tflite_files(model, targets, shape, calibration_images=None):
    """Writes `{tflite format: path}`, all converted from one archive of the fixed-size model."""
    with tempfile.TemporaryDirectory() as scratch:
        archive = os.path.join(scratch, "saved_model")
        _write_keras_archive(_fixed_size_model(model, shape), archive)
        for format, path in targets.items():
            content = tflite_converter(archive, format, calibration_images).convert()
            with open(path, "wb") as f:
                f.write(content)


_ERFC_REGISTERED = []


def _register_erfc_for_onnx():
    """Teaches tf2onnx TensorFlow's Erfc, which exact GELU lowers to: erfc(x) = 1 - erf(x).

    ONNX has Erf but no Erfc. For GELU, x * erfc(-x / sqrt 2) / 2, the
    cancellation in 1 - erf only affects outputs that are ~0 anyway.
    """
    if _ERFC_REGISTERED:
        return
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:  # noqa: F841  (registered by the decorator)
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            node.type = "Erf"
            dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.output[0]))
            one = ctx.make_const(utils.make_name(node.name + "_one"), np.array(1, dtype=dtype))
            ctx.insert_new_node_on_output(
                "Sub", node.output[0], name=utils.make_name(node.name + "_erfc"),
                inputs=[one.output[0], node.output[0]],
            )

    _ERFC_REGISTERED.append(Erfc)


def _write_onnx(model, path, shape):
    import tensorflow as tf
    import tf2onnx

    _register_erfc_for_onnx()

    signature = [tf.TensorSpec(shape, tf.float32, name="images")]
    tf2onnx.convert.from_function(
        _serving_function(model, shape), input_signature=signature, opset=_ONNX_OPSET, output_path=path,
        custom_rewriter=[rewrite_layer_norm],
    )


def write_artifacts(model, targets, image_size=224, calibration_images=None):
    """Writes `{format: path}` with TensorFlow; the TensorFlow backend must be active.

    `image_size` is the TFLite input side for models built without a fixed size;
    `calibration_images` calibrate "tflite-int8-full".
    Returns `{format: dynamic_resolution}`.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("write_artifacts runs on the TensorFlow backend; use export() from other backends.")
    with config.fast_paths(False):
        return _write_artifacts(model, targets, image_size, calibration_images)


def _write_artifacts(model, targets, image_size, calibration_images):
    data_format, height, width = _layout(model)
    free_shape = _resolution_free(model, data_format)
    dynamic = free_shape[1:3] == (None, None) or free_shape[2:4] == (None, None)
    fixed_shape = _input_spec_shape(data_format, height or image_size, width or image_size)
    flags = {}
    tflite = {}
    for format, path in targets.items():
        _check_format(format)
        if format == "saved_model":
            _write_saved_model(model, path, free_shape)
            flags[format] = dynamic
        elif format == "onnx":
            _write_onnx(model, path, free_shape)
            flags[format] = dynamic
        else:
            tflite[format] = path
            flags[format] = False
    if tflite:
        _write_tflite_files(model, tflite, fixed_shape, calibration_images)
    return flags


def _write_in_tensorflow_subprocess(model, targets, image_size, calibration_images=None):
    """Rebuilds `model` on the TensorFlow backend in a subprocess and writes `targets` there."""
    with tempfile.TemporaryDirectory() as scratch:
        keras_file = os.path.join(scratch, "model.keras")
        model.save(keras_file)
        command = [sys.executable, "-m", "keras_convnext.export", "--write", keras_file,
                   "--image-size", str(image_size)]
        if calibration_images is not None:
            calibration_file = os.path.join(scratch, "calibration.npy")
            np.save(calibration_file, calibration_images)
            command += ["--calibration", calibration_file]
        for format, path in targets.items():
            command += ["--target", f"{format}={path}"]
        env = dict(os.environ, KERAS_BACKEND="tensorflow")
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ExportError(
                "The TensorFlow export subprocess failed (exit code "
                f"{result.returncode}):\n{result.stderr[-4000:]}"
            )
        flags = {}
        for line in result.stdout.splitlines():
            if line.startswith("DYNAMIC "):
                format, value = line.split()[1:3]
                flags[format] = value == "1"
        return flags


# ---------------------------------------------------------------- verification


def sample_images(height=224, width=224, data_format="channels_last"):
    """scikit-image's colour sample photographs, resized: float32 `(n, h, w, 3)` in [0, 255]."""
    import skimage.data
    import skimage.transform

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    images = np.stack([
        skimage.transform.resize(photo, (height, width), order=1, anti_aliasing=True, preserve_range=True)
        for photo in photos
    ]).astype("float32")
    if data_format == "channels_first":
        images = np.transpose(images, (0, 3, 1, 2))
    return images


def _outputs_as_list(outputs):
    """A model's outputs (one array, a list, or a dict) as a list of numpy arrays.

    Dicts in sorted key order: the order `tf.nest` and `keras.tree` flatten
    them in, which is the order of an ONNX file's outputs, and the order of
    sorted names in SavedModel and TFLite signatures (dict keys, or
    `output_0` for a single output).
    """
    import keras

    return [np.asarray(keras.ops.convert_to_numpy(output)) for output in keras.tree.flatten(outputs)]


def _model_outputs(model, images):
    """What the artifacts compute: the model's call, as a list (`_outputs_as_list`).

    The call, not `predict`: a task's `predict` may post-process (keras-hub's
    detectors decode boxes and run non-max suppression there), which is
    not part of the exported graph.
    """
    return _outputs_as_list(model(images, training=False))


def _by_sorted_name(named):
    return [np.asarray(named[name]) for name in sorted(named)]


def _tflite_runner(path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner()
    (input_name, input_detail), = runner.get_input_details().items()
    output_details = runner.get_output_details()

    def run(images):
        scale, zero_point = input_detail["quantization"]
        if input_detail["dtype"] == np.int8:  # full-integer: the images quantized as the file says
            images = np.clip(np.round(images / scale + zero_point), -128, 127)
        outputs = runner(**{input_name: images.astype(input_detail["dtype"])})
        for name, detail in output_details.items():
            if detail["dtype"] == np.int8:
                scale, zero_point = detail["quantization"]
                outputs[name] = (outputs[name].astype("float32") - zero_point) * scale
        return _by_sorted_name(outputs)

    return run


def _runner(format, path):
    """A function `images -> list of numpy outputs` running the artifact (order: `_outputs_as_list`)."""
    if format == "saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)
        serve = loaded.signatures["serving_default"]

        def run(images):
            return _by_sorted_name(serve(images=tf.constant(images)))

        return run
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(images):
            return [np.asarray(output) for output in session.run(None, {name: images})]

        return run
    return _tflite_runner(path)


def _median_latency_ms(run, image, repeats=5):
    run(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(image)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def verify(model, format, path, atol=1e-4, min_top1_agreement=1.0, images=None, dynamic_resolution=False,
           image_size=224):
    """Runs the artifact at `path` on real images and compares with `model`.

    Float32 formats must match every output within `atol`; quantized ones
    ("tflite-fp16", "tflite-int8", "tflite-int8-full") must give the same
    top-1 class (the largest value on the last axis: per image for a
    classifier, per pixel for a segmenter, per anchor for a detector's
    outputs) at `min_top1_agreement` of the positions of every output.
    Raises `ExportError` otherwise; returns an `ExportReport`.
    """
    data_format, height, width = _layout(model)
    height, width = height or image_size, width or image_size
    if images is None:
        images = sample_images(height, width, data_format)
    images = np.asarray(images, "float32")
    expected = _model_outputs(model, images)
    run = _runner(format, path)
    got = run(images)
    got_shapes, expected_shapes = [a.shape for a in got], [a.shape for a in expected]
    if got_shapes != expected_shapes:
        raise ExportError(
            f"{format} artifact returned outputs of shapes {got_shapes}; the Keras model returns {expected_shapes}."
        )
    max_diff = max(float(np.max(np.abs(a - e))) for a, e in zip(got, expected))
    agreement = min(float(np.mean(np.argmax(a, -1) == np.argmax(e, -1))) for a, e in zip(got, expected))
    if format in _QUANTIZED:
        if agreement < min_top1_agreement:
            raise ExportError(
                f"{format} artifact agrees with the Keras model on the top-1 class for only "
                f"{agreement:.0%} of the positions of an output on {len(images)} images "
                f"(needed {min_top1_agreement:.0%})."
            )
    elif not max_diff <= atol:
        raise ExportError(
            f"{format} artifact differs from the Keras model by up to {max_diff:.3g} (allowed {atol:g})."
        )
    if dynamic_resolution and format in ("saved_model", "onnx"):
        # The same photos at another size must still match the model (which is
        # fully convolutional up to the global pooling).
        other = sample_images(height + 32, width + 32, data_format)[:2]
        model_is_dynamic = None in tuple(model.input_shape)[1:]
        reference = _model_outputs(model, other) if model_is_dynamic else None
        result = run(other)
        if any(output.shape[0] != 2 for output in result):
            raise ExportError(f"{format} artifact did not accept a batch of 2 at {height + 32}x{width + 32}.")
        if reference is not None and not max(float(np.max(np.abs(a - e))) for a, e in zip(result, reference)) <= atol:
            raise ExportError(f"{format} artifact differs from the model at {height + 32}x{width + 32} pixels.")
    latency = _median_latency_ms(run, images[:1])
    return ExportReport(format, path, _size(path), max_diff, agreement, latency, len(images), True, dynamic_resolution)


# ---------------------------------------------------------------- public entry points


# Temporary files and folders are named `.NAME.keras_convnext-tmp-<pid>-<random>` next to
# the destination NAME, and an overwritten destination is set aside as
# `.NAME.keras_convnext-old-<pid>-<random>` until the new one is in place, so a later run
# can tell a killed export's leftovers from the user's files.
_TEMPORARY_MARK = ".keras_convnext-tmp-"
_ASIDE_MARK = ".keras_convnext-old-"
_LEFTOVER_NAME = re.compile(r"^\.(?P<name>.+)(?P<mark>\.keras_convnext-(?:tmp|old)-)(?P<pid>\d+)-[0-9a-f]+$")


def _temporary_sibling(path, mark=_TEMPORARY_MARK):
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.join(directory, f".{os.path.basename(path)}{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _process_is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(directory):
    """Cleans up after exports into `directory` whose process has ended (killed mid-export).

    Their temporaries are removed. A destination they had set aside is put
    back if nothing took its place, and removed otherwise. Only names made
    by `_temporary_sibling` are touched, and nothing of a running process.
    Returns the paths removed or restored.
    """
    cleaned = []
    try:
        names = os.listdir(directory)
    except OSError:
        return cleaned
    for name in names:
        match = _LEFTOVER_NAME.match(name)
        if not match or _process_is_running(int(match.group("pid"))):
            continue
        path = os.path.join(directory, name)
        destination = os.path.join(directory, match.group("name"))
        if match.group("mark") == _ASIDE_MARK and not os.path.lexists(destination):
            os.replace(path, destination)
        else:
            _remove(path)
        cleaned.append(path)
    return cleaned


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _is_empty_directory(path):
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _check_destinations(targets, overwrite):
    """Refuses destinations that exist (unless `overwrite`), that repeat, or whose folder is a file."""
    paths = [os.path.abspath(path) for path in targets.values()]
    if len(set(paths)) != len(paths):
        raise ValueError(f"Two export formats were given the same destination: {sorted(targets.values())}.")
    for format, path in targets.items():
        if not os.fspath(path):
            raise ValueError(f"The {format} export destination is an empty path.")
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise NotADirectoryError(f"Cannot export to {path}: {parent} is a file, not a folder.")
        if os.path.lexists(path) and not overwrite and not _is_empty_directory(path):
            kind = "folder" if os.path.isdir(path) else "file"
            raise FileExistsError(
                f"Cannot export {format} to {path}: a {kind} of that name exists, and export never "
                "replaces existing files. Choose another path, or pass overwrite=True to replace it "
                "once the new artifact is written and verified."
            )


def _make_parents(targets):
    """Creates missing destination folders; returns those created, deepest first."""
    created = []
    for path in targets.values():
        missing = []
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for folder in reversed(missing):
            os.mkdir(folder)
            created.insert(0, folder)
    return created


def _move_all_into_place(temporary, targets, overwrite):
    """Moves every temporary artifact to its destination, or none of them.

    An existing destination is first renamed aside and deleted only once
    every artifact is in place; if any move fails, the artifacts already
    moved are taken away again and the set-aside destinations put back.
    """
    moved = []  # (destination, its previous content set aside, or None)
    try:
        for format, path in targets.items():
            # Checked again: the destination may have appeared during the export.
            _check_destinations({format: path}, overwrite)
            aside = None
            if os.path.lexists(path):
                aside = _temporary_sibling(path, _ASIDE_MARK)
                os.replace(path, aside)
            moved.append((path, aside))
            os.replace(temporary[format], path)
    except BaseException:
        for path, aside in reversed(moved):
            _remove(path)
            if aside is not None:
                os.replace(aside, path)
        raise
    for _, aside in moved:
        if aside is not None:
            _remove(aside)


def export_formats(model, targets, verify_artifacts=True, atol=1e-4, min_top1_agreement=1.0, verbose=True,
                   image_size=224, overwrite=False, calibration_images=None):
    """Writes several formats with one conversion run (one subprocess off TensorFlow).

    Args:
        model: a Keras model with one image input: a keras_convnext
            classifier or backbone, a keras-hub task on one (RetinaNet,
            DeepLabV3, `ConvNeXtImageClassifier`), any Keras model. Its
            outputs may be one tensor, a list or a dict; every output is
            exported and checked.
        targets: `{format: path}`, or a directory (every format of
            `FORMATS`, named `model<suffix>` inside it).
        verify_artifacts: check each artifact against `model` (see `verify`).
        image_size: for models built without a fixed input size, the side
            in pixels of the TFLite input and of the check images.
        overwrite: replace destinations that exist. Without it an existing
            file or non-empty folder is refused (`FileExistsError`) and
            nothing is written.
        calibration_images: for "tflite-int8-full", float32 images
            `(n, height, width, channels)` in [0, 255] that calibrate the
            int8 activation ranges (about 100 training images).

    All or nothing: every artifact is written and verified under a
    temporary name next to its destination, and only then are all of them
    moved into place; on any failure no destination changes. Temporaries
    left by a killed export are removed by the next one.

    Returns:
        `{format: ExportReport}` (reports with NaN numbers when not verified).
    """
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(f"export takes a Keras model with one image input; got {type(model).__name__}.")
    _layout(model)  # a model without one image input is refused before anything is written
    if not isinstance(targets, (str, os.PathLike, dict)):
        raise TypeError(
            f"targets must be a folder path or a {{format: path}} dict; got {type(targets).__name__}."
        )
    if isinstance(targets, (str, os.PathLike)):
        directory = os.fspath(targets)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise NotADirectoryError(f"Cannot export every format into {directory}: it is a file, not a folder.")
        targets = {format: os.path.join(directory, "model" + _SUFFIX[format]) for format in FORMATS}
    if not targets:
        raise ValueError("targets is empty: give at least one {format: path} entry, or a folder path.")
    for format, path in targets.items():
        _check_format(format)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"The {format} export destination must be a path; got {type(path).__name__}.")
    targets = {format: os.fspath(path) for format, path in targets.items()}
    calibration_images = _check_calibration(targets, calibration_images)
    _check_destinations(targets, overwrite)
    for folder in {os.path.dirname(os.path.abspath(path)) for path in targets.values()}:
        remove_stale_temporaries(folder)
    created = _make_parents(targets)
    temporary = {format: _temporary_sibling(path) for format, path in targets.items()}
    done = False
    try:
        if keras.backend.backend() == "tensorflow":
            flags = write_artifacts(model, temporary, image_size, calibration_images)
        else:
            flags = _write_in_tensorflow_subprocess(model, temporary, image_size, calibration_images)
        reports = {}
        for format, path in targets.items():
            if not os.path.lexists(temporary[format]):
                raise ExportError(f"The {format} export wrote no artifact.")
            if verify_artifacts:
                report = verify(model, format, temporary[format], atol, min_top1_agreement,
                                dynamic_resolution=flags.get(format, False), image_size=image_size)
            else:
                report = ExportReport(format, path, _size(temporary[format]), float("nan"), float("nan"),
                                      float("nan"), 0, True, flags.get(format, False))
            report.path = path
            reports[format] = report
        _move_all_into_place(temporary, targets, overwrite)
        done = True
    finally:
        for path in temporary.values():
            _remove(path)
        if not done:
            for folder in created:
                if _is_empty_directory(folder):
                    os.rmdir(folder)
    if verbose:
        for report in reports.values():
            print(report)
    return reports


def export(model, path, format="saved_model", verify_artifact=True, atol=1e-4, min_top1_agreement=1.0, verbose=True,
           image_size=224, overwrite=False, calibration_images=None):
    """Exports `model` to `path` in `format` from any Keras backend, then verifies it.

    Args:
        model: a Keras model with one image input (a keras_convnext
            classifier, a keras-hub detector or segmenter on one, ...);
            one output, a list or a dict of outputs.
        path: destination file (`.tflite`, `.onnx`) or directory (SavedModel).
        format: one of `ALL_FORMATS`: "saved_model", "tflite", "tflite-fp16",
            "tflite-int8" (dynamic-range: int8 weights), "tflite-int8-full"
            (int8 weights, activations, inputs and outputs; needs
            `calibration_images`) or "onnx".
        verify_artifact: run the artifact on real images against `model`.
        atol: allowed max |difference| of float32 formats.
        min_top1_agreement: needed top-1 agreement of quantized formats.
        image_size: TFLite/check input side for models without a fixed size.
        overwrite: replace an existing file or folder at `path` (only once
            the new artifact is written and verified); without it an
            existing destination is refused with a `FileExistsError`.
        calibration_images: for "tflite-int8-full": float32 images
            `(n, height, width, channels)`, pixels in [0, 255], that set the
            int8 activation ranges; about 100 of your training images.

    Returns:
        An `ExportReport` (size, max difference, top-1 agreement, latency).
    """
    _check_format(format)
    return export_formats(model, {format: path}, verify_artifact, atol, min_top1_agreement, verbose,
                          image_size, overwrite, calibration_images)[format]


def _uses_keras_hub(keras_file):
    """Whether a `.keras` file's model configuration names keras-hub classes."""
    import zipfile

    with zipfile.ZipFile(keras_file) as archive:
        config = archive.read("config.json")
    return b'"keras_hub' in config or b'"keras_convnext.hub' in config


def _main(argv=None):
    """Subprocess entry: load a `.keras` model on TensorFlow and write the targets."""
    parser = argparse.ArgumentParser(description="Write export artifacts on the TensorFlow backend.")
    parser.add_argument("--write", required=True, help=".keras model to load (safe mode)")
    parser.add_argument("--target", action="append", default=[], help="FORMAT=PATH")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--calibration", help=".npy file of calibration images for tflite-int8-full")
    args = parser.parse_args(argv)
    import keras

    import keras_convnext  # noqa: F401  (registers the layers for loading)

    if _uses_keras_hub(args.write):
        import keras_convnext.hub.models  # noqa: F401  (registers keras-hub's and our keras-hub classes)
    model = keras.saving.load_model(args.write, safe_mode=True, compile=False)
    targets = dict(item.split("=", 1) for item in args.target)
    calibration = np.load(args.calibration, allow_pickle=False) if args.calibration else None
    for format, dynamic in write_artifacts(model, targets, args.image_size, calibration).items():
        print(f"DYNAMIC {format} {int(dynamic)}")


if __name__ == "__main__":
    _main()
