"""Bad inputs, one table row each: the error type, a phrase of its message, and nothing changed.

Rows cover export destinations, checkpoint files (hostile, damaged and oddly
shaped) and other checkpoint sources, images a data pipeline delivers, and
FCMAE arguments. After each row the test checks that the files
next to the destination and the model's weights are exactly as before.
"""

import os
import pathlib
import pickle
import zipfile
from typing import Callable, NamedTuple

import keras
import numpy as np
import pytest


import keras_convnext as kc
from keras_convnext.weights import files

TINY = ((1, 1, 1, 1), (8, 16, 24, 32))


class Case(NamedTuple):
    name: str
    prepare: Callable  # prepare(setup) makes the row's files and returns the failing call
    error: type
    phrase: str  # a regular expression the message must match


class Setup(NamedTuple):
    """What a row may use: a scratch folder, pytest's monkeypatch, a classifier, an FCMAE model."""

    folder: str
    monkeypatch: object
    model: object
    fcmae: object


def _weights(model):
    return [np.array(variable.numpy()) for variable in model.weights]


def _tree(root):
    tree = {}
    for folder, folders, names in os.walk(root):
        for name in folders:
            tree[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                tree[os.path.relpath(os.path.join(folder, name), root)] = handle.read()
    return tree


# ---------------------------------------------------------------- export destinations


def _in(setup, *parts):
    return os.path.join(setup.folder, *parts)


def _user_file(setup, name, content=b"user data"):
    path = _in(setup, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(content)
    return path


def _export_into_user_folder(setup):
    _user_file(setup, "my_project/notes.txt")
    _user_file(setup, "my_project/src/train.py")
    return lambda: kc.export(setup.model, _in(setup, "my_project"), format="saved_model")


def _export_over_user_file(format, name):
    def prepare(setup):
        path = _user_file(setup, name)
        return lambda: kc.export(setup.model, path, format=format)

    return prepare


def _export_formats_with_one_existing(setup):
    from keras_convnext.export import export_formats

    _user_file(setup, "out/model.onnx")
    return lambda: export_formats(setup.model, _in(setup, "out"))


def _export_under_a_file(setup):
    _user_file(setup, "not_a_folder")
    return lambda: kc.export(setup.model, _in(setup, "not_a_folder", "model.tflite"), format="tflite")


def _export_every_format_into_a_file(setup):
    from keras_convnext.export import export_formats

    path = _user_file(setup, "exported")
    return lambda: export_formats(setup.model, path)


def _export_two_formats_to_one_path(setup):
    from keras_convnext.export import export_formats

    path = _in(setup, "model.bin")
    return lambda: export_formats(setup.model, {"tflite": path, "tflite-fp16": path})


def _vector_model(setup):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    return lambda: kc.export(model, _in(setup, "vector.onnx"), format="onnx")


def _call(function, *args, **kwargs):
    """A row that needs no files: the failing call itself."""
    return lambda setup: lambda: function(setup, *args, **kwargs)


EXPORT_CASES = [
    Case("saved_model into a folder with user files", _export_into_user_folder, FileExistsError, "overwrite=True"),
    Case("saved_model over a user file", _export_over_user_file("saved_model", "model"), FileExistsError, "a file of that name exists"),
    Case("tflite over a user file", _export_over_user_file("tflite", "model.tflite"), FileExistsError, "never replaces"),
    Case("onnx over a user file", _export_over_user_file("onnx", "model.onnx"), FileExistsError, "never replaces"),
    Case("tflite-int8 over a user file", _export_over_user_file("tflite-int8", "m.tflite"), FileExistsError, "never replaces"),
    Case("every format, one destination exists", _export_formats_with_one_existing, FileExistsError, "model.onnx"),
    Case("no target at all", _call(lambda setup: kc.export_formats(setup.model, {})), ValueError, "targets is empty"),
    Case("destination under a file", _export_under_a_file, NotADirectoryError, "is a file, not a folder"),
    Case("every format into a file", _export_every_format_into_a_file, NotADirectoryError, "is a file, not a folder"),
    Case("two formats, one path", _export_two_formats_to_one_path, ValueError, "same destination"),
    Case("unknown format", _call(lambda s: kc.export(s.model, _in(s, "m.mlmodel"), format="coreml")), ValueError, "Unknown export format 'coreml'"),
    Case("empty path", _call(lambda s: kc.export(s.model, "", format="onnx")), ValueError, "empty path"),
    Case("no path", _call(lambda s: kc.export(s.model, None, format="onnx")), TypeError, "must be a path"),
    Case("targets of the wrong type", _call(lambda s: kc.export_formats(s.model, 42)), TypeError, r"\{format: path\} dict"),
    Case("not a Keras model", _call(lambda s: kc.export("ConvNeXtV2Atto", _in(s, "m.onnx"), format="onnx")), TypeError, "takes a Keras model"),
    Case("a model without an image input", _vector_model, ValueError, "one image input"),
]


# ---------------------------------------------------------------- checkpoint files


def _torch():
    return pytest.importorskip("torch")


def _saved(setup, name, obj, **save_kwargs):
    path = _in(setup, name)
    _torch().save(obj, path, **save_kwargs)
    return path


def _load(setup, path):
    return lambda: kc.load_weights(setup.model, path)


def _v1_weights_file(setup):
    """A `.weights.h5` file saved from a V1 model of the classifier's size, for the V2 classifier."""
    path = _in(setup, "v1.weights.h5")
    kc.ConvNeXt(*TINY, version="v1", classes=4, input_shape=(32, 32, 3)).save_weights(path)
    return _load(setup, path)


def _load_saved(obj, name="checkpoint.pth", **save_kwargs):
    def prepare(setup):
        return _load(setup, _saved(setup, name, obj() if callable(obj) else obj, **save_kwargs))

    return prepare


class _RunsCode:
    """Unpickling this runs a shell command that creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(wrapper):
    def prepare(setup):
        payload = _RunsCode(_in(setup, "code_ran"))  # the tree comparison notices the marker
        obj = {"model": {"w": _torch().ones(2)}, "x": payload} if wrapper else payload
        return _load(setup, _saved(setup, "malicious.pth", obj))

    return prepare


def _handmade_archive(setup, name, records):
    path = _in(setup, name)
    with zipfile.ZipFile(path, "w") as archive:
        for record, data in records.items():
            archive.writestr(record, data)
    return path


def _pickled_reduce(setup):
    """A bare pickle calling `builtins.eval`, in a zip laid out as torch.save's."""
    code = f"open({_in(setup, 'code_ran')!r}, 'w').write('1')".encode()
    payload = b"\x80\x02cbuiltins\neval\nX" + len(code).to_bytes(4, "little") + code + b"\x85R."
    return _load(setup, _handmade_archive(setup, "eval.pt", {"archive/data.pkl": payload}))


def _out_of_bounds_view(setup):
    """A tensor whose size and stride reach past its storage's bytes (must not read memory)."""
    path = _saved(setup, "good.pt", {"w": _torch().ones(4)})
    with zipfile.ZipFile(path) as source:
        records = {name: source.read(name) for name in source.namelist()}
    prefix = next(name for name in records if name.endswith("data.pkl"))[: -len("data.pkl")]
    records[prefix + "data.pkl"] = records[prefix + "data.pkl"].replace(b"K\x04\x85", b"M\x00\x10\x85", 1)
    return _load(setup, _handmade_archive(setup, "oob.pt", records))


def _edited_archive(setup, name, edit):
    """A torch.save file of `{"w": ones(4)}` with `edit(records, prefix)` applied to its records."""
    path = _saved(setup, "good.pt", {"w": _torch().ones(4)})
    with zipfile.ZipFile(path) as source:
        records = {record: source.read(record) for record in source.namelist()}
    prefix = next(record for record in records if record.endswith("data.pkl"))[: -len("data.pkl")]
    edit(records, prefix)
    return _load(setup, _handmade_archive(setup, name, records))


def _set_record(record, value):
    def edit(records, prefix):
        records[prefix + record] = value

    return edit


def _unknown_persistent_id(setup):
    import io

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "outside" if obj == "elsewhere" else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"w": "elsewhere"})
    return _load(setup, _handmade_archive(setup, "pid.pt", {"archive/data.pkl": buffer.getvalue()}))


def _plain_pickle_archive(obj):
    def prepare(setup):
        payload = pickle.dumps(obj, protocol=2)
        return _load(setup, _handmade_archive(setup, "plain.pt", {"archive/data.pkl": payload}))

    return prepare


def _missing_storage(setup):
    path = _saved(setup, "good.pt", {"w": _torch().ones(4)})
    with zipfile.ZipFile(path) as source:
        records = {name: source.read(name) for name in source.namelist() if "/data/" not in name}
    return _load(setup, _handmade_archive(setup, "nostorage.pt", records))


def _truncated(setup):
    path = _saved(setup, "full.pt", {"w": _torch().ones(1000)})
    with open(path, "rb") as handle:
        data = handle.read()
    with open(_in(setup, "cut.pt"), "wb") as handle:
        handle.write(data[: len(data) // 2])
    return _load(setup, _in(setup, "cut.pt"))


def _garbage(setup):
    return _load(setup, _user_file(setup, "garbage.pth", b"not a checkpoint at all" * 10))


def _empty_file(setup):
    return _load(setup, _user_file(setup, "empty.pt", b""))


def _torchscript(setup):
    torch = _torch()
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = _in(setup, "scripted.pt")
    torch.jit.save(scripted, path)
    return _load(setup, path)


def _legacy_without_torch(setup):
    path = _saved(setup, "legacy.pth", {"w": _torch().ones(2)}, _use_new_zipfile_serialization=False)
    setup.monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None)
    return _load(setup, path)


def _quantized():
    import warnings

    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's notice that quantized tensors are deprecated
        return {"w": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)}


def _self_referencing(setup):
    cycle = []
    cycle.append(cycle)
    payload = pickle.dumps({"w": cycle}, protocol=2)
    return _load(setup, _handmade_archive(setup, "cycle.pt", {"archive/data.pkl": payload}))


def _namespace():
    import argparse

    return {"model": {"w": _torch().ones(2)}, "args": argparse.Namespace(lr=0.1)}


def _in_memory(mapping):
    def prepare(setup):
        return lambda: kc.load_weights(setup.model, mapping() if callable(mapping) else mapping)

    return prepare


def _safetensors_damaged(setup):
    return _load(setup, _user_file(setup, "w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"))


CHECKPOINT_CASES = [
    Case("pickle that runs a shell command", _malicious(wrapper=False), kc.CheckpointError, r"\.system.*could run code"),
    Case("shell command beside real weights", _malicious(wrapper=True), kc.CheckpointError, "refused"),
    Case("hand-made archive calling eval", _pickled_reduce, kc.CheckpointError, r"builtins\.eval"),
    Case("argparse.Namespace beside the weights", _load_saved(_namespace), kc.CheckpointError, r"argparse\.Namespace"),
    Case("tensor view past its storage", _out_of_bounds_view, kc.CheckpointError, "reaches element"),
    Case("storage record missing", _missing_storage, kc.CheckpointError, "truncated or damaged"),
    Case("truncated download", _truncated, kc.CheckpointError, "truncated"),
    Case("not a checkpoint", _garbage, kc.CheckpointError, "Could not read"),
    Case("empty file", _empty_file, kc.CheckpointError, "Could not read"),
    Case("TorchScript archive", _torchscript, kc.CheckpointError, "TorchScript"),
    Case("legacy format without PyTorch", _legacy_without_torch, kc.CheckpointError, "re-save"),
    Case("self-referencing container", _self_referencing, kc.CheckpointError, "contains itself"),
    Case("a zip of other files", lambda s: _load(s, _handmade_archive(s, "other.pt", {"a.txt": "hello"})), kc.CheckpointError, "not one written by torch.save"),
    Case("a byteorder record of nonsense", lambda s: _edited_archive(s, "order.pt", _set_record("byteorder", b"middle")), kc.CheckpointError, "byteorder record"),
    Case("a storage shorter than its tensor", lambda s: _edited_archive(s, "short.pt", _set_record("data/0", b"\x00" * 4)), kc.CheckpointError, "has 1 of its 4 elements"),
    Case("a pickled set", _plain_pickle_archive({"w": {1, 2}}), kc.CheckpointError, r"__builtin__\.set"),
    Case("an unknown persistent id", _unknown_persistent_id, kc.CheckpointError, "unknown external object"),
    Case("a list at the top", _load_saved(lambda: [_torch().ones(2)]), kc.CheckpointError, "holds a list of 1 items"),
    Case("a number at the top", _load_saved(3.5), kc.CheckpointError, "holds a float"),
    Case("a bare tensor at the top", _load_saved(lambda: _torch().ones(2)), kc.CheckpointError, "holds a ndarray"),
    Case("only metadata", _load_saved({"epoch": 3, "args": "lr=0.1"}), kc.CheckpointError, r"no tensors \(its keys.*'epoch' \(int\)"),
    Case("wrapper with no tensors", _load_saved({"model_ema": {"epoch": 3}}), kc.CheckpointError, "no tensors"),
    Case("integer tensor names", _load_saved(lambda: {0: _torch().ones(2)}), kc.CheckpointError, "under the key 0"),
    Case("quantized tensor", _load_saved(_quantized), kc.CheckpointError, "quantized"),
    Case("sparse tensor", _load_saved(lambda: {"w": _torch().ones(2, 2).to_sparse()}), kc.CheckpointError, "sparse"),
    Case("module. prefix clash", _load_saved(lambda: {"w": _torch().ones(2), "module.w": _torch().ones(2)}), kc.CheckpointError, "twice"),
    Case("damaged safetensors", _safetensors_damaged, kc.CheckpointError, "safetensors"),
    Case("unsupported suffix", lambda s: _load(s, _user_file(s, "w.npz")), kc.CheckpointError, "Unsupported checkpoint file"),
    Case("missing file", lambda s: _load(s, _in(s, "nowhere.pt")), FileNotFoundError, "No checkpoint file"),
    Case("in-memory list", _in_memory(lambda: {"model": [np.ones(2)]}), kc.CheckpointError, "no tensors"),
    Case("in-memory quantized tensor", _in_memory(_quantized), kc.CheckpointError, "quantized"),
    Case("in-memory integer names", _in_memory({1: np.ones(2)}), kc.CheckpointError, "under the key 1"),
    Case("in-memory dict of lists", _in_memory({"stem.0.weight": [1.0, 2.0]}), kc.CheckpointError, r"'stem\.0\.weight' \(list\)"),
    *[
        Case(f"a {label} as the source", _in_memory(source), TypeError, f"file path .*or as a mapping.*got .*{got}")
        for label, source, got in (
            ("list", lambda: [np.ones(2)], "type list"), ("number", 3, "type int"), ("None", None, "type NoneType"),
            ("bytes", b"checkpoint.pt", "bytes"), ("array", lambda: np.ones(3), "type ndarray"),
        )
    ],
    Case("load_state_dict of a list", lambda s: lambda: kc.load_state_dict(s.model, [np.ones(2)]), TypeError, "load_state_dict takes a mapping"),
    Case("keys that match no row", _in_memory(lambda: {"downsample_layers.0.0.weight ": np.ones((8, 3, 4, 4), "float32")}), kc.CheckpointError, "No tensor of the checkpoint has a name of its official"),
    Case("fresh_head as text", lambda s: lambda: kc.load_weights(s.model, {"w": np.ones(2)}, fresh_head="yes"), TypeError, "fresh_head must be True or False"),
    Case("no model to load into", lambda s: lambda: kc.load_weights(None, {"w": np.ones(2)}), TypeError, "built by keras_convnext constructors"),
    Case("a model that is not a ConvNeXt", lambda s: lambda: kc.load_weights(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), {"w": np.ones(2)}), TypeError, "has no ConvNeXt stem"),
    Case("a directory as the checkpoint", lambda s: _load(s, s.folder), IsADirectoryError, "is a directory"),
    Case("missing .weights.h5 file", lambda s: _load(s, _in(s, "none.weights.h5")), FileNotFoundError, "No checkpoint file"),
    Case(".weights.h5 of the other version", _v1_weights_file, kc.CheckpointError, r"ConvNeXt V1 \(layer scale\) model; 'tiny' is a ConvNeXt V2 \(GRN\)"),
    Case("weights= of the wrong type", _call(lambda s: kc.ConvNeXt(*TINY, input_shape=(32, 32, 3), weights=["imagenet"])), TypeError, "weights must be None, a registry tag"),
    Case("an unusable cache directory", lambda s: _registry_load_with_cache_in(s, _user_file(s, "cache_is_a_file")), OSError, "cannot be used.*KERAS_CONVNEXT_CACHE_DIR"),
]


def _registry_load_with_cache_in(setup, directory):
    from keras_convnext.weights import cache

    setup.monkeypatch.setenv(cache.CACHE_ENV, directory)
    # A cheap network under a registry name: the registry path without a large model.
    return lambda: kc.ConvNeXt(*TINY, variant_name="ConvNeXtV2Atto", weights="imagenet", input_shape=(32, 32, 3))


# ---------------------------------------------------------------- images given to a model


def _predict(images):
    return _call(lambda s: s.model.predict(images() if callable(images) else images, verbose=0))


IMAGE_CASES = [
    Case("predict on None", _predict(None), ValueError, "takes a batch of images as one array or tensor.*got None"),
    Case("predict on a file name", _predict("cat.png"), ValueError, r"got the path 'cat\.png'\. Load image files first"),
    Case("predict on a list of images", _predict(lambda: [np.zeros((32, 32, 3), "float32")] * 2), ValueError, r"a list of 2 arrays.*np\.stack"),
    Case("predict on text", _predict(lambda: np.full((1, 32, 32, 3), "a")), ValueError, "real numbers .* dtype <U1"),
    Case("call on complex images", _call(lambda s: s.model(np.zeros((1, 32, 32, 3), np.complex64))), ValueError, "dtype complex64"),
    Case("predict on an empty batch", _predict(lambda: np.zeros((0, 32, 32, 3), "float32")), ValueError, "an empty batch"),
]


# ---------------------------------------------------------------- images a pipeline delivers


def _unknown_size_dataset(size, labels=False):
    """A tf.data pipeline of `size`x`size` images whose element spec says (None, None, 3)."""
    import tensorflow as tf

    def images():
        for _ in range(2):
            image = np.zeros((size, size, 3), "float32")
            yield (image, np.int64(1)) if labels else image

    spec = tf.TensorSpec((None, None, 3), tf.float32)
    signature = (spec, tf.TensorSpec((), tf.int64)) if labels else spec
    return tf.data.Dataset.from_generator(images, output_signature=signature).batch(2)


def _compiled_model_on(method, data_fn):
    """A row calling `method` ("fit", "evaluate") of a fresh compiled classifier on `data_fn()`."""

    def prepare(setup):
        model = kc.ConvNeXt(*TINY, version="v2", classes=4, input_shape=(None, None, 3))
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        steps = {"fit": {"steps_per_epoch": 2}, "evaluate": {"steps": 2}}[method]
        return lambda: getattr(model, method)(data_fn(), verbose=0, **steps)

    return prepare


def _small_batches():
    while True:
        yield np.zeros((2, 16, 16, 3), "float32"), np.ones((2,), "int64")


SMALL = r"at least 32x32 pixels; got 16x16 \(images of shape \(2, 16, 16, 3\), channels_last\)"


def _mixed_size_batches(index):
    """Batch `index` of a source whose first batch is 32x32 and later ones 16x16, so that its
    shape, as Keras infers it from the first batches, leaves the image size unknown."""
    size = 32 if index == 0 else 16
    return np.zeros((2, size, size, 3), "float32"), np.ones((2,), "int64")


class _MixedSizePyDataset(keras.utils.PyDataset):
    def __len__(self):
        return 3

    def __getitem__(self, index):
        return _mixed_size_batches(index)


def _mixed_size_loader():
    import torch

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return _mixed_size_batches(index)

    return torch.utils.data.DataLoader(Batches(), batch_size=None)

PIPELINE_CASES = [
    Case("predict on tf.data of unknown size", _call(lambda s: s.model.predict(_unknown_size_dataset(16), verbose=0)), ValueError, SMALL),
    Case("evaluate on tf.data of unknown size", _compiled_model_on("evaluate", lambda: _unknown_size_dataset(16, labels=True)), ValueError, SMALL),
    Case("fit on tf.data of unknown size", _compiled_model_on("fit", lambda: _unknown_size_dataset(16, labels=True)), ValueError, SMALL),
    Case("fit on a generator of small batches", _compiled_model_on("fit", _small_batches), ValueError, SMALL),
    Case("fit on a PyDataset of mixed sizes", _compiled_model_on("fit", _MixedSizePyDataset), ValueError, SMALL),
    Case("evaluate on a PyDataset of mixed sizes", _compiled_model_on("evaluate", _MixedSizePyDataset), ValueError, SMALL),
    Case("fit on a PyTorch DataLoader of mixed sizes", _compiled_model_on("fit", _mixed_size_loader), ValueError, SMALL),
]


# ---------------------------------------------------------------- FCMAE


def _fcmae(**kwargs):
    arguments = {"encoder": "ConvNeXtV2Atto", "input_shape": (64, 64, 3), "decoder_dim": 8, **kwargs}
    return lambda setup: lambda: kc.FCMAE(**arguments)


def _transfer(first, second):
    from keras_convnext.fcmae import transfer_encoder

    return lambda setup: lambda: transfer_encoder(first(setup), second(setup))


def _mask_with_visible(counts, grid=(2, 2)):
    """Masks `(len(counts), *grid)` with `counts[i]` visible (0) patches in image i."""
    masks = np.ones((len(counts),) + grid, "float32")
    for image, count in enumerate(counts):
        masks[image].reshape(-1)[:count] = 0
    return masks


def _call_with_mask(mask, **kwargs):
    images = np.zeros((mask.shape[0], 64, 64, 3), "float32")
    return _call(lambda setup: setup.fcmae(images, patch_mask=mask, **kwargs))


def _encode_with_mask(mask):
    images = np.zeros((mask.shape[0], 64, 64, 3), "float32")
    return _call(lambda setup: setup.fcmae.encode(images, mask, fast_path=True))


_call_with_batch_mismatch = _call(
    lambda setup: setup.fcmae(np.zeros((3, 64, 64, 3), "float32"), patch_mask=_mask_with_visible([2, 2]))
)


FCMAE_CASES = [
    Case("transfer_encoder, arguments swapped", _transfer(lambda s: s.model, lambda s: s.fcmae), TypeError, "takes the pre-trained FCMAE model first"),
    Case("transfer_encoder into a path", _transfer(lambda s: s.fcmae, lambda s: "model.keras"), TypeError, "must be a ConvNeXt model; got str"),
    Case("input_shape None", _fcmae(input_shape=None), ValueError, r"needs a fixed input_shape.*got None"),
    Case("mask_ratio 0", _fcmae(mask_ratio=0.0), ValueError, r"in \(0, 1\).*loss is always 0"),
    Case("mask_ratio 1", _fcmae(mask_ratio=1.0), ValueError, r"in \(0, 1\)"),
    Case("negative mask_ratio", _fcmae(mask_ratio=-0.5), ValueError, r"in \(0, 1\)"),
    Case("mask_ratio above 1", _fcmae(mask_ratio=60), ValueError, r"in \(0, 1\)"),
    Case("NaN mask_ratio", _fcmae(mask_ratio=float("nan")), ValueError, r"in \(0, 1\)"),
    Case("mask_ratio as text", _fcmae(mask_ratio="0.6"), TypeError, "must be a number"),
    Case("mask_ratio True", _fcmae(mask_ratio=True), TypeError, "must be a number"),
    Case("input_shape without channels", _fcmae(input_shape=(64, 64)), ValueError, r"\(height, width, channels\)"),
    Case("encoder as a number", _fcmae(encoder=42), TypeError, "encoder must be a constructor name"),
    Case("an unknown encoder name", _fcmae(encoder="ConvNeXtV3Tiny"), ValueError, "Unknown FCMAE encoder"),
    Case("32x32 at the default ratio", _fcmae(input_shape=(32, 32, 3)), ValueError, "no patch visible"),
    Case("64x64 at ratio 0.8", _fcmae(mask_ratio=0.8), ValueError, "no patch visible"),
    Case("ratio too small to mask a patch", _fcmae(mask_ratio=1e-17), ValueError, "no patch masked"),
    Case("a classifier release as weights", _fcmae(weights="imagenet"), ValueError, "weights='fcmae'"),
    Case("an unknown weights tag", _fcmae(weights="fcmae-22k"), ValueError, "neither an existing file nor a known tag"),
    Case("missing weights file", _fcmae(weights=pathlib.Path("/nonexistent/fcmae.pt")), FileNotFoundError, "No checkpoint file"),
    Case("patch_mask with more visible patches", _call_with_mask(_mask_with_visible([3, 3])), ValueError, "keeps 3 patches visible in image 0.*exactly 2"),
    Case("patch_mask with fewer visible patches", _call_with_mask(_mask_with_visible([2, 1])), ValueError, "keeps 1 patches visible in image 1"),
    Case("patch_mask, dense path, wrong count", _call_with_mask(_mask_with_visible([4, 4]), fast_path=False), ValueError, "exactly 2"),
    Case("patch_mask in training", _call_with_mask(_mask_with_visible([0, 0]), training=True), ValueError, "keeps 0 patches"),
    Case("encode with a wrong mask on the fast path", _encode_with_mask(_mask_with_visible([3])), ValueError, "exactly 2"),
    Case("patch_mask of the wrong grid", _call_with_mask(np.zeros((2, 4, 4), "float32")), ValueError, r"shape \(batch, 2, 2\)"),
    Case("patch_mask not 0/1", _call_with_mask(np.full((2, 2, 2), 0.5, "float32")), ValueError, "only 0 .visible. and 1"),
    Case("patch_mask for another batch size", _call_with_batch_mismatch, ValueError, "masks for 2 images, but 3"),
    Case("decoder_dim 0", _fcmae(decoder_dim=0), ValueError, "decoder_dim must be an integer of at least 1; got 0"),
    Case("decoder_dim 8.5", _fcmae(decoder_dim=8.5), ValueError, "decoder_dim must be an integer"),
    Case("decoder_dim as text", _fcmae(decoder_dim="8"), ValueError, "decoder_dim must be an integer"),
    Case("negative decoder_depth", _fcmae(decoder_depth=-1), ValueError, "decoder_depth must be an integer of at least 0"),
    Case("seed as text", _fcmae(seed="0"), ValueError, "seed must be an integer or None; got '0'"),
    Case("weights as a number", _fcmae(weights=123), TypeError, "file path .*or as a mapping"),
    Case("load_checkpoint of None", _call(lambda s: s.fcmae.load_checkpoint(None)), TypeError, "file path .*or as a mapping"),
    Case("images of another size", _call(lambda s: s.fcmae(np.zeros((1, 32, 32, 3), "float32"))), ValueError, r"built for 64x64 images.*Resize the images\."),
    Case("a single image", _call(lambda s: s.fcmae(np.zeros((64, 64, 3), "float32"))), ValueError, r"add a batch axis"),
]

CASES = EXPORT_CASES + CHECKPOINT_CASES + IMAGE_CASES + PIPELINE_CASES + FCMAE_CASES


@pytest.fixture(scope="module")
def models():
    classifier = kc.ConvNeXt(*TINY, version="v2", classes=4, input_shape=(None, None, 3), name="tiny")
    encoder = kc.ConvNeXt(*TINY, version="v2", include_top=False, input_shape=(64, 64, 3))
    fcmae = kc.FCMAE(encoder, input_shape=(64, 64, 3), mask_ratio=0.5, decoder_dim=8)
    return classifier, fcmae


def test_the_table_is_large_enough():
    assert len(CASES) >= 100 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case, models, tmp_path, monkeypatch):
    classifier, fcmae = models
    failing_call = case.prepare(Setup(str(tmp_path), monkeypatch, classifier, fcmae))
    files_before = _tree(tmp_path)
    weights_before = _weights(classifier) + _weights(fcmae)
    with pytest.raises(case.error, match=case.phrase):
        failing_call()
    # Nothing written, replaced or removed (no artifact, temporary, or marker of code that ran).
    assert _tree(tmp_path) == files_before
    for before, after in zip(weights_before, _weights(classifier) + _weights(fcmae)):
        np.testing.assert_array_equal(before, after)


def test_validation_images_are_checked_before_any_training():
    model = kc.ConvNeXt(*TINY, version="v2", classes=4, input_shape=(None, None, 3))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    weights_before = _weights(model)
    images, labels = np.ones((2, 32, 32, 3), "float32"), np.ones((2,), "int64")
    with pytest.raises(ValueError, match=SMALL):
        model.fit(images, labels, validation_data=(np.ones((2, 16, 16, 3), "float32"), labels), verbose=0)
    with pytest.raises(ValueError, match=SMALL):
        model.fit(images, labels, validation_data=_small_batches(), validation_steps=1, verbose=0)
    for before, after in zip(weights_before, _weights(model)):
        np.testing.assert_array_equal(before, after)


def test_the_model_works_after_a_bad_batch_from_a_pipeline(models):
    classifier, _ = models
    weights_before = _weights(classifier)
    with pytest.raises(ValueError, match=SMALL):
        classifier.predict(_unknown_size_dataset(16), verbose=0)
    # Then a pipeline of unknown size with good images passes its checks (on JAX, a
    # failed predict used to leave every variable without its value).
    predictions = classifier.predict(_unknown_size_dataset(32), verbose=0)
    assert predictions.shape == (2, 4) and np.allclose(predictions.sum(axis=-1), 1.0)
    for before, after in zip(weights_before, _weights(classifier)):
        np.testing.assert_array_equal(before, after)
