"""One loader: checkpoint tensors -> model weights, all or nothing."""

import contextlib
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping

import numpy as np

from keras_convnext.models.variants import find_variant
from keras_convnext.weights.files import KERAS_SUFFIX, CheckpointError, flatten_state_dict, read_checkpoint
from keras_convnext.weights.naming import (
    CLASSIFIER_PREFIX,
    HEAD_PREFIXES,
    NAMINGS,
    NON_ENCODER_KEYS,
    TRANSFORMS,
)

_BLOCK_PATH = re.compile(r"^stage(\d)_block(\d+)/")


def model_weights(model):
    """`{path: variable}` for every weight of a ConvNeXt model."""
    return {variable.path: variable for variable in model.weights}


def detect_naming(names):
    """Which naming (`"official"`, `"timm"`, `"hf"`, ...) a set of keys follows."""
    found = [key for key, (_, marker, _) in NAMINGS.items() if any(marker.match(n) for n in names)]
    if len(found) != 1:
        sample = ", ".join(sorted(names)[:5])
        known = ", ".join(label for label, _, _ in NAMINGS.values())
        raise CheckpointError(
            f"Cannot tell which ConvNeXt checkpoint naming these keys follow (first keys: {sample}). "
            f"Supported namings: {known}."
            + (f" Keys match several: {', '.join(found)}." if found else "")
        )
    return found[0]


def convert_state_dict(state_dict, naming=None):
    """Maps checkpoint tensors to Keras weight paths and layouts.

    Returns `(converted, unmatched)`: `converted` is `{weight path: (key, array)}`,
    `unmatched` the checkpoint keys that no row of the naming's table maps.
    Keys of parts outside the encoder and head (the decoder of a pre-training
    checkpoint, `NON_ENCODER_KEYS`) are skipped.
    """
    naming = naming or detect_naming(state_dict)
    skipped = NON_ENCODER_KEYS.get(naming)
    if skipped is not None:
        state_dict = {key: array for key, array in state_dict.items() if not skipped.match(key)}
    return apply_table(state_dict, NAMINGS[naming][2])


def apply_table(state_dict, rows):
    """`(converted, unmatched)` for one naming table's rows (see `convert_state_dict`)."""
    converted, unmatched = {}, []
    for key, array in state_dict.items():
        for pattern, template, transform in rows:
            match = pattern.match(key)
            if match:
                array = np.asarray(array)
                if TRANSFORMS[transform] is not None:
                    array = TRANSFORMS[transform](array)
                converted[template.format(**match.groupdict())] = (key, array)
                break
        else:
            unmatched.append(key)
    return converted, unmatched


def describe(shapes):
    """A readable description of the architecture behind `{weight path: shape}`."""
    blocks = defaultdict(set)
    for path in shapes:
        match = _BLOCK_PATH.match(path)
        if match:
            blocks[int(match.group(1))].add(int(match.group(2)))
    depths = tuple(len(blocks[stage]) for stage in range(4))
    dims = tuple(
        (shapes.get(f"stage{stage}_block0/dwconv/bias") or (None,))[0] for stage in range(4)
    )
    if any(path.endswith("/grn/gamma") for path in shapes):
        version = "v2"
    elif any(path.endswith("/layer_scale/gamma") for path in shapes):
        version = "v1"
    else:
        version = None
    name = find_variant(version, depths, dims) if version else None
    label = "ConvNeXt V2" if version == "v2" else "ConvNeXt V1" if version == "v1" else "ConvNeXt"
    text = f"{label} with stage depths {depths} and dims {dims}"
    return text + (f" ({name})" if name else ""), (version, depths, dims)


def plan_assignments(model, converted, unmatched, fresh_head, fresh_prefixes=(CLASSIFIER_PREFIX,)):
    """Checks a conversion against the model; returns the assignments or raises."""
    variables = model_weights(model)
    has_top = any(path.startswith(CLASSIFIER_PREFIX) for path in variables)
    dropped = HEAD_PREFIXES if not has_top else fresh_prefixes if fresh_head else ()
    converted = {p: v for p, v in converted.items() if not p.startswith(dropped)}
    expected = {p: v for p, v in variables.items() if not (fresh_head and p.startswith(fresh_prefixes))}

    checkpoint_text, checkpoint_arch = describe({p: a.shape for p, (_, a) in converted.items()})
    model_text, model_arch = describe({p: tuple(v.shape) for p, v in expected.items()})
    if checkpoint_arch != model_arch:
        raise CheckpointError(
            f"This checkpoint is a {checkpoint_text}, but the model '{model.name}' is a "
            f"{model_text}. Build the model that matches the checkpoint."
        )

    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(unmatched) + sorted(
        f"{converted[p][0]} (-> {p})" for p in set(converted) - set(expected)
    )
    mismatched = []
    for path in sorted(set(expected) & set(converted)):
        key, array = converted[path]
        if tuple(array.shape) != tuple(expected[path].shape):
            mismatched.append(
                f"{key} -> {path}: checkpoint {tuple(array.shape)}, model {tuple(expected[path].shape)}"
            )
    problems = []
    if missing:
        problems.append(f"model weights with no checkpoint tensor: {', '.join(missing)}")
    if unexpected:
        problems.append(f"checkpoint tensors the model has no place for: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        hint = ""
        if any(CLASSIFIER_PREFIX in m for m in mismatched):
            hint = (
                " The classifier has another number of classes: to fine-tune, load with "
                "keras_convnext.load_weights(model, path, fresh_head=True), which keeps the "
                "model's new head."
            )
        raise CheckpointError(
            f"The checkpoint does not fit the model '{model.name}' ({model_text}); nothing was "
            f"loaded. " + ". ".join(problems) + "." + hint
        )
    return [(expected[path], array) for path, (_, array) in converted.items()]


def load_state_dict(model, state_dict, *, fresh_head=False, source="the state dict"):
    """Loads an in-memory checkpoint (`{name: array or torch tensor}`) into `model`.

    The naming (official, timm, HF transformers) is detected from the keys.
    Every model weight must receive a tensor and every tensor must be used,
    with matching shapes, or a `CheckpointError` names what is missing,
    unexpected or mismatched, and no weight is changed. Head tensors are
    ignored for models built with `include_top=False`; `fresh_head=True`
    keeps the model's own classifier (fine-tuning to other classes). An
    FCMAE pre-training checkpoint loads its encoder; its decoder is skipped
    and a model with `include_top=True` keeps its fresh head.
    """
    state_dict = flatten_state_dict(dict(state_dict), source=source)
    naming = detect_naming(state_dict)
    converted, unmatched = convert_state_dict(state_dict, naming)
    fresh_prefixes = (CLASSIFIER_PREFIX,)
    if naming in NON_ENCODER_KEYS:
        # A pre-training checkpoint has no head: a classifier keeps its fresh one.
        fresh_head, fresh_prefixes = True, HEAD_PREFIXES
    for variable, array in plan_assignments(model, converted, unmatched, fresh_head, fresh_prefixes):
        variable.assign(array.astype(variable.dtype))
    return model


@contextlib.contextmanager
def _restore_on_error(model):
    saved = [variable.numpy() for variable in model.weights]
    try:
        yield
    except BaseException:
        for variable, value in zip(model.weights, saved):
            variable.assign(value)
        raise


def _load_keras_weights(model, path):
    with _restore_on_error(model), warnings.catch_warnings():
        # Keras only warns about some mismatches; every one is an error here.
        warnings.simplefilter("error")
        try:
            model.load_weights(path)
        except Exception as error:
            raise CheckpointError(
                f"Could not load the Keras weights file {path} into '{model.name}': {error}. "
                "Nothing was loaded; check that the file was saved from the same variant "
                "with the same include_top and classes."
            ) from error
    return model


def load_weights(model, source, *, fresh_head=False):
    """Loads a checkpoint file or an in-memory mapping into a ConvNeXt model.

    Args:
        model: a model built by a keras_convnext constructor.
        source: a path (`.pt`, `.pth`, `.bin`, `.safetensors` in the official,
            timm or HF naming, or a Keras `.weights.h5`), or a mapping of
            name to array.
        fresh_head: keep the model's own classifier instead of loading the
            checkpoint's (for fine-tuning to another number of classes).

    Raises:
        CheckpointError: the file cannot be read or does not fit the model;
            the model is then unchanged.
    """
    if isinstance(source, Mapping):
        return load_state_dict(model, source, fresh_head=fresh_head)
    path = os.fspath(source)
    if path.endswith(KERAS_SUFFIX):
        return _load_keras_weights(model, path)
    return load_state_dict(model, read_checkpoint(path), fresh_head=fresh_head, source=path)
