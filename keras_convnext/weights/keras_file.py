"""Keras `.weights.h5` files into ConvNeXt models, with the loader's checks.

A `.weights.h5` file addresses weights by the position of each layer in
the model that saved it, so Keras can only read it into a model of the same
structure. To load one into a model with another head (an FCMAE encoder
saved with `save_weights` into a classifier, a 1000-class file into a
10-class model), the file is first read into a model built like the one
that saved it, the "file model", and its weights then go through the same
plan as every other checkpoint: exact shapes, finite floats, all or nothing.
"""

import contextlib
import warnings

import h5py
import keras

from keras_convnext.models.convnext import ConvNeXt
from keras_convnext.weights.files import CheckpointError
from keras_convnext.weights.loader import (
    assign_all,
    check_tensors,
    describe,
    model_weights,
    plan_assignments,
)
from keras_convnext.weights.naming import CLASSIFIER_PREFIX, HEAD_PREFIXES

# Keras names a layer's group in the file after its class, in the model's layer order.
_DENSE_KERNEL = "layers/dense/vars/0"
_NORMALIZATION_GROUP = "layers/image_normalization"
_CHANNELS_FIRST_GROUP = "layers/permute"
# What the file's first block holds tells the ConvNeXt version that saved it.
_VERSION_GROUPS = {"v2": "layers/conv_ne_xt_block/grn", "v1": "layers/conv_ne_xt_block/layer_scale"}
_VERSION_NAMES = {"v1": "ConvNeXt V1 (layer scale)", "v2": "ConvNeXt V2 (GRN)"}


def _file_layout(path):
    """`(classes or None, has preprocessing, channels_first, version or None)` of the model that saved `path`."""
    try:
        with h5py.File(path, "r") as handle:
            kernel = handle.get(_DENSE_KERNEL)
            classes = None if kernel is None else int(kernel.shape[-1])
            version = next((name for name, group in _VERSION_GROUPS.items() if group in handle), None)
            return classes, _NORMALIZATION_GROUP in handle, _CHANNELS_FIRST_GROUP in handle, version
    except OSError as error:
        raise CheckpointError(
            f"Could not read the Keras weights file {path} ({error}); it is damaged or not a "
            ".weights.h5 file."
        ) from error


@contextlib.contextmanager
def _settings(channels_first):
    policy, data_format = keras.config.dtype_policy(), keras.config.image_data_format()
    keras.config.set_dtype_policy("float32")
    keras.config.set_image_data_format("channels_first" if channels_first else "channels_last")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)
        keras.config.set_image_data_format(data_format)


def _file_model(model, path):
    """A model of `model`'s architecture with the head of the model that saved `path`."""
    shapes = {p: tuple(v.shape) for p, v in model_weights(model).items()}
    text, (version, depths, dims) = describe(shapes)
    if version is None or None in dims:
        raise CheckpointError(f"'{model.name}' is not a ConvNeXt model ({text}).")
    kernel_size = shapes["stage0_block0/dwconv/kernel"][0]
    classes, preprocessing, channels_first, file_version = _file_layout(path)
    if file_version is not None and file_version != version:
        raise CheckpointError(
            f"{path} holds the weights of a {_VERSION_NAMES[file_version]} model; '{model.name}' is a "
            f"{_VERSION_NAMES[version]} model. Nothing was loaded; load it into a model of the version "
            "that saved it."
        )
    with _settings(channels_first):
        return ConvNeXt(
            depths, dims, version=version, include_top=classes is not None, classes=classes or 1,
            include_preprocessing=preprocessing, kernel_size=kernel_size, name="file_model",
        )


def _read_into(file_model, path, model_name):
    with warnings.catch_warnings():
        # Keras only warns about some mismatches; every one is an error here.
        warnings.simplefilter("error")
        try:
            file_model.load_weights(path)
        except Exception as error:
            raise CheckpointError(
                f"Could not load the Keras weights file {path} into '{model_name}': {error}. "
                "Nothing was loaded; check that the file was saved from the same variant."
            ) from error


def load_keras_weights(model, path, fresh_head=False):
    """Loads a `.weights.h5` file into `model`, all or nothing.

    `fresh_head=True` keeps the model's own classifier: a file without a
    head (saved from `include_top=False`, such as an FCMAE encoder) also
    keeps the model's head LayerNorm; a classifier file gives its head
    LayerNorm. Without it, the file's head must fit the model's.
    """
    file_model = _file_model(model, path)
    _read_into(file_model, path, model.name)
    arrays = {variable.path: variable.numpy() for variable in file_model.weights}
    file_has_top = any(name.startswith(CLASSIFIER_PREFIX) for name in arrays)
    del file_model
    check_tensors(arrays, what=f"weights in {path}")
    converted = {name: (name, array) for name, array in arrays.items()}
    arrays.clear()
    fresh_prefixes = (CLASSIFIER_PREFIX,) if file_has_top else HEAD_PREFIXES
    try:
        assignments = plan_assignments(model, converted, [], fresh_head, fresh_prefixes)
    except CheckpointError as error:
        hint = ""
        if not fresh_head and not file_has_top and any(
            name.startswith(CLASSIFIER_PREFIX) for name in model_weights(model)
        ):
            hint = (
                " The file holds a backbone without a head; to start a classifier from it, "
                "load with keras_convnext.load_weights(model, path, fresh_head=True)."
            )
        raise CheckpointError(f"{path}: {error}{hint}") from error
    converted.clear()
    assign_all(assignments)
    return model
