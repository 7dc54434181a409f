"""Loading official FCMAE pre-training checkpoints into `keras_convnext.FCMAE`."""

import os
from collections.abc import Mapping

import numpy as np

from keras_convnext.weights.files import CheckpointError, flatten_state_dict, read_checkpoint
from keras_convnext.weights.loader import apply_table, convert_state_dict, detect_naming, plan_assignments
from keras_convnext.weights.naming import FCMAE_DECODER, NON_ENCODER_KEYS


def _convert_decoder(state_dict):
    """`{decoder weight name: (key, array)}` and the decoder keys no row maps."""
    return apply_table(state_dict, FCMAE_DECODER)


def _plan_decoder(decoder, converted, unmatched):
    expected = decoder.named_weights()
    problems = []
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(unmatched) + sorted(converted[p][0] for p in set(converted) - set(expected))
    if missing:
        problems.append(f"decoder weights with no checkpoint tensor: {', '.join(missing)}")
    if unexpected:
        problems.append(f"decoder tensors the model has no place for: {', '.join(unexpected)}")
    for name in sorted(set(expected) & set(converted)):
        key, array = converted[name]
        if tuple(array.shape) != tuple(expected[name].shape):
            problems.append(f"shape mismatch {key} -> {name}: checkpoint {array.shape}, model {tuple(expected[name].shape)}")
    if problems:
        raise CheckpointError(
            "The FCMAE checkpoint's decoder does not fit this FCMAE model (check decoder_dim, "
            "decoder_depth and patch_size); nothing was loaded. " + ". ".join(problems) + "."
        )
    return [(expected[name], array) for name, (_, array) in converted.items()]


def load_fcmae_checkpoint(model, source):
    """Loads an official FCMAE checkpoint (file path or mapping) into an `FCMAE` model.

    The encoder, the decoder and the mask token must all fit; otherwise a
    `CheckpointError` says what differs and no weight changes.
    """
    if isinstance(source, Mapping):
        state_dict = flatten_state_dict(dict(source))
        label = "the state dict"
    else:
        label = os.fspath(source)
        state_dict = read_checkpoint(label)
    naming = detect_naming(state_dict)
    if naming not in NON_ENCODER_KEYS:
        raise CheckpointError(
            f"{label} is not an FCMAE pre-training checkpoint (its keys follow the {naming} naming); "
            "load classifier checkpoints into a ConvNeXt V2 model instead."
        )
    is_decoder = NON_ENCODER_KEYS[naming]
    decoder_part = {k: v for k, v in state_dict.items() if is_decoder.match(k)}
    encoder_part = {k: v for k, v in state_dict.items() if not is_decoder.match(k)}
    converted, unmatched = convert_state_dict(encoder_part, naming)
    assignments = plan_assignments(model.encoder, converted, unmatched, fresh_head=False)
    assignments += _plan_decoder(model.decoder, *_convert_decoder(decoder_part))
    values = [(variable, _checked_value(variable, array, label)) for variable, array in assignments]
    for variable, value in values:
        variable.assign(value)
    return model


def _checked_value(variable, array, label):
    """`array` cast to the variable's dtype, once it is known to hold finite real numbers."""
    array = np.asarray(array)
    if array.dtype.kind != "f":
        raise CheckpointError(
            f"{label}: the tensor for {variable.path} holds {array.dtype} values, not floating-point "
            "weights; nothing was loaded."
        )
    if not np.all(np.isfinite(array)):
        raise CheckpointError(
            f"{label}: the tensor for {variable.path} holds NaN or infinite values; nothing was loaded. "
            "The checkpoint is damaged or comes from a diverged run."
        )
    return array.astype(variable.dtype)
