"""One loader: checkpoint tensors -> model weights, all or nothing."""

import os
import re
from collections import defaultdict
from collections.abc import Mapping

import keras
import numpy as np

from keras_convnext.models.variants import find_variant
from keras_convnext.weights.files import KERAS_SUFFIX, CheckpointError, flatten_state_dict, read_checkpoint
from keras_convnext.weights.naming import (
    CLASSIFIER_PREFIX,
    DECODER_PREFIX,
    FCMAE_DECODER,
    HEAD_PREFIXES,
    NAMINGS,
    NON_ENCODER_KEYS,
    TRANSFORMS,
    LayoutError,
    checkpoint_key,
)

_BLOCK_PATH = re.compile(r"^stage(\d)_block(\d+)/")


def model_weights(model):
    """`{path: variable}` for every weight of a ConvNeXt model."""
    return {variable.path: variable for variable in model.weights}


def detect_naming(names):
    """Which naming (`"official"`, `"timm"`, `"hf"`, ...) a set of keys follows."""
    odd = [repr(name) for name in names if not isinstance(name, str)]
    if odd:
        raise CheckpointError(
            f"Checkpoint keys must be tensor names (strings); these are not: {_listed(odd)}."
        )
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


def _listed(items, limit=12):
    """`a, b, c` for at most `limit` items, then how many more."""
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def tensor_problem(array):
    """Why `array` cannot be a weight (not floating point, NaN/Inf values), or None."""
    dtype = getattr(array, "dtype", None)
    if not isinstance(dtype, np.dtype):
        return f"a {type(array).__name__}, not an array"
    if dtype.kind != "f" and dtype.name != "bfloat16":
        return f"{dtype} values, not floating point"
    if not np.isfinite(array).all():
        return "NaN or infinite values"
    return None


def check_tensors(arrays, what="checkpoint tensors"):
    """Raises one CheckpointError naming every entry of `{name: array}` that is not a usable weight."""
    problems = []
    for name, array in arrays.items():
        problem = tensor_problem(array)
        if problem:
            problems.append(f"{name} ({problem})")
    if problems:
        raise CheckpointError(
            f"These {what} cannot be weights: {_listed(problems)}. Weights must be finite "
            "floating-point numbers; the file is damaged, from a diverged training run, or not "
            "a weights checkpoint. Nothing was loaded."
        )


def convert_state_dict(state_dict, naming=None):
    """Maps checkpoint tensors to Keras weight paths and layouts.

    Returns `(converted, unmatched)`: `converted` is `{weight path: (key, array)}`,
    `unmatched` the checkpoint keys that no row of the naming's table maps.
    Keys of parts outside the encoder and head (the decoder of a pre-training
    checkpoint, `NON_ENCODER_KEYS`) are skipped. Every mapped tensor must be
    a finite floating-point array in the layout its naming documents, or a
    CheckpointError names each one that is not.
    """
    naming = naming or detect_naming(state_dict)
    skipped = NON_ENCODER_KEYS.get(naming)
    if skipped is not None:
        state_dict = {key: array for key, array in state_dict.items() if not skipped.match(key)}
    return apply_table(state_dict, NAMINGS[naming][2])


def convert_decoder(state_dict, naming):
    """`(converted, unmatched)` of a pre-training checkpoint's decoder tensors.

    `converted` is `{"decoder/<name>": (key, array)}`, `<name>` as
    `keras_convnext.fcmae.FCMAEDecoder.named_weights()` names the weights
    (`decoder/proj/kernel`, `decoder/mask_token`); both are empty for a
    naming without a decoder. The tensors are checked as in `convert_state_dict`.
    """
    is_decoder = NON_ENCODER_KEYS.get(naming)
    if is_decoder is None:
        return {}, []
    part = {key: array for key, array in state_dict.items() if is_decoder.match(key)}
    converted, unmatched = apply_table(part, FCMAE_DECODER)
    return {DECODER_PREFIX + name: value for name, value in converted.items()}, unmatched


def apply_table(state_dict, rows):
    """`(converted, unmatched)` for one naming table's rows (see `convert_state_dict`)."""
    converted, unmatched, matched, layouts, targets = {}, [], {}, [], defaultdict(list)
    for key, array in state_dict.items():
        for pattern, _, template, transform in rows:
            match = pattern.match(key)
            if match:
                matched[key] = (template.format(**match.groupdict()), transform, array)
                targets[matched[key][0]].append(key)
                break
        else:
            unmatched.append(key)
    shared = [f"{' and '.join(keys)} (-> {path})" for path, keys in targets.items() if len(keys) > 1]
    if shared:
        raise CheckpointError(
            f"Several checkpoint tensors map to one weight: {_listed(shared)}. Nothing was loaded; "
            "the checkpoint mixes two models' tensors."
        )
    check_tensors({key: array for key, (_, _, array) in matched.items()})
    for key, (path, transform, array) in matched.items():
        try:
            converted[path] = (key, TRANSFORMS[transform](array) if transform else array)
        except LayoutError as error:
            layouts.append(f"{key} ({error})")
    if layouts:
        raise CheckpointError(
            f"These checkpoint tensors are not in the layout their naming stores: {_listed(layouts)}. "
            "Nothing was loaded; the checkpoint is damaged or from another architecture."
        )
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


def checkpoint_names(paths, naming, converted):
    """Weight paths as the checkpoint would name them: `stages.0.0.dwconv.weight (-> path)`."""
    if naming is None:
        return list(paths)
    first_key = next((key for key, _ in converted.values()), "")
    placeholders = {"hf": first_key.split(".", 1)[0]}
    names = []
    for path in paths:
        if path.startswith(DECODER_PREFIX):
            key = checkpoint_key(FCMAE_DECODER, path[len(DECODER_PREFIX):], placeholders)
        else:
            key = checkpoint_key(NAMINGS[naming][2], path, placeholders)
        names.append(f"{key} (-> {path})" if key else path)
    return names


def plan_assignments(
    model, converted, unmatched, fresh_head, fresh_prefixes=(CLASSIFIER_PREFIX,), naming=None
):
    """Checks a conversion against the model; returns `[(variable, array)]` or raises.

    `converted` is `{weight path: (checkpoint key, array)}`. Every model
    weight (less a fresh head) must receive exactly one tensor of exactly its
    shape, and every tensor must have a weight; otherwise a CheckpointError
    lists what is missing (in the checkpoint's own `naming`, when given),
    unexpected or mismatched, before anything is assigned.
    """
    variables = model_weights(model)
    has_top = any(path.startswith(CLASSIFIER_PREFIX) for path in variables)
    dropped = HEAD_PREFIXES if not has_top else fresh_prefixes if fresh_head else ()
    converted = {p: v for p, v in converted.items() if not p.startswith(dropped)}
    expected = {p: v for p, v in variables.items() if not (fresh_head and p.startswith(fresh_prefixes))}

    if not converted and unmatched:
        raise CheckpointError(
            f"No tensor of the checkpoint has a name of its {NAMINGS[naming][0] if naming else 'ConvNeXt'} "
            f"naming (first keys: {_listed(sorted(map(repr, unmatched)), 5)}); nothing was loaded. "
            "The keys may carry an extra prefix, suffix or spacing."
        )
    checkpoint_text, checkpoint_arch = describe({p: a.shape for p, (_, a) in converted.items()})
    model_text, model_arch = describe({p: tuple(v.shape) for p, v in expected.items()})
    if checkpoint_arch != model_arch:
        raise CheckpointError(
            f"This checkpoint is a {checkpoint_text}, but the model '{model.name}' is a "
            f"{model_text}. Build the model that matches the checkpoint."
        )

    missing = checkpoint_names(sorted(set(expected) - set(converted)), naming, converted)
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
        problems.append(f"tensors the checkpoint lacks: {', '.join(missing)}")
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


def assign_all(assignments):
    """Assigns checked `[(variable, array)]` pairs, emptying the list as it goes.

    Each array leaves the list when its variable holds it, so the memory of
    a checkpoint that the caller no longer references is given back tensor
    by tensor instead of after the last one. Every array has been checked
    (shape, floating point, finite) before this runs, so no assignment fails
    halfway for a reason of the checkpoint's.
    """
    assignments.reverse()
    while assignments:
        variable, array = assignments.pop()
        # Keras casts to the variable's dtype; the contiguous copy is one tensor's worth.
        variable.assign(np.ascontiguousarray(array))
        del array


def check_target(model, fresh_head):
    """Raises a TypeError unless `model` is a keras_convnext model and `fresh_head` a bool."""
    paths = [getattr(variable, "path", "") for variable in getattr(model, "weights", None) or ()]
    if not isinstance(model, keras.Model) or "stem_conv/kernel" not in paths:
        name = getattr(model, "name", None)
        what = f"the model '{name}'" if isinstance(model, keras.Model) else f"an object of type {type(model).__name__}"
        raise TypeError(
            f"Checkpoints load into models built by keras_convnext constructors (for example "
            f"keras_convnext.ConvNeXtV2Tiny()); got {what}, which has no ConvNeXt stem. For an FCMAE "
            "model, use model.load_checkpoint(path)."
        )
    if not isinstance(fresh_head, (bool, np.bool_)):
        raise TypeError(f"fresh_head must be True or False; got {fresh_head!r}.")


def _load_arrays(model, state_dict, fresh_head, source):
    """Loads `{key: array}`, which this function owns and empties (see `assign_all`)."""
    naming = detect_naming(state_dict)
    converted, unmatched = convert_state_dict(state_dict, naming)
    state_dict.clear()
    fresh_prefixes = (CLASSIFIER_PREFIX,)
    if naming in NON_ENCODER_KEYS:
        # A pre-training checkpoint has no head: a classifier keeps its fresh one.
        fresh_head, fresh_prefixes = True, HEAD_PREFIXES
    try:
        assignments = plan_assignments(model, converted, unmatched, fresh_head, fresh_prefixes, naming)
    except CheckpointError as error:
        if source == "the state dict":
            raise
        raise CheckpointError(f"{source}: {error}") from error
    converted.clear()
    assign_all(assignments)
    return model


def load_state_dict(model, state_dict, *, fresh_head=False, source="the state dict"):
    """Loads an in-memory checkpoint (`{name: array or torch tensor}`) into `model`.

    The naming (official, timm, HF transformers) is detected from the keys.
    Every model weight must receive a tensor and every tensor must be used,
    with exactly the model's shape (in the naming's documented layout), a
    floating-point dtype and finite values, or a `CheckpointError` names what
    is missing (in the checkpoint's naming), unexpected or wrong, and no
    weight is changed. Head tensors are ignored for models built with
    `include_top=False`; `fresh_head=True` keeps the model's own classifier
    (fine-tuning to other classes). An FCMAE pre-training checkpoint loads
    its encoder; its decoder is skipped and a model with `include_top=True`
    keeps its fresh head.
    """
    check_target(model, fresh_head)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"load_state_dict takes a mapping of tensor names to arrays (a state dict); got a "
            f"{type(state_dict).__name__}. For a checkpoint file, use keras_convnext.load_weights(model, path)."
        )
    return _load_arrays(model, flatten_state_dict(dict(state_dict), source=source), fresh_head, source)


def checkpoint_path(source):
    """`source` as a path string, or a TypeError naming what a checkpoint source may be."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, str):
            return path
    kind = "bytes" if isinstance(source, (bytes, bytearray)) else f"an object of type {type(source).__name__}"
    hint = " (for a file's contents, save them to a file and pass its path)" if kind == "bytes" else ""
    raise TypeError(
        f"A checkpoint must be given as a file path (a str or os.PathLike) or as a mapping of tensor "
        f"names to arrays (a state dict); got {kind}{hint}."
    )


def load_weights(model, source, *, fresh_head=False):
    """Loads a checkpoint file or an in-memory mapping into a ConvNeXt model.

    Args:
        model: a model built by a keras_convnext constructor.
        source: a path (`.pt`, `.pth`, `.bin`, `.safetensors` in the official,
            timm or HF naming, or a Keras `.weights.h5`) as a str or
            os.PathLike, or a mapping of name to array.
        fresh_head: keep the model's own classifier instead of loading the
            checkpoint's (for fine-tuning to another number of classes).
            For a `.weights.h5` file this also loads a backbone saved with
            `include_top=False` (an FCMAE encoder) into a classifier.

    Raises:
        CheckpointError: the file cannot be read or does not fit the model;
            the model is then unchanged.
        TypeError: `source` is neither a path nor a mapping.
    """
    check_target(model, fresh_head)
    if isinstance(source, Mapping):
        return load_state_dict(model, source, fresh_head=fresh_head)
    path = checkpoint_path(source)
    if path.endswith(KERAS_SUFFIX):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No checkpoint file at {path}.")
        from keras_convnext.weights.keras_file import load_keras_weights

        return load_keras_weights(model, path, fresh_head=fresh_head)
    state_dict = read_checkpoint(path)
    return _load_arrays(model, state_dict, fresh_head, path)
