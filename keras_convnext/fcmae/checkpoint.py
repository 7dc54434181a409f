"""Official FCMAE pre-training weights into `keras_convnext.FCMAE`: encoder, decoder and mask token.

Both sources, an official checkpoint file (or its state dict) and the
registry's `weights="fcmae"`, go through the package's one loader: every
tensor is checked (layout, floating point, finite) and every weight planned
(exact shape, nothing missing or left over) before the first assignment.
"""

from collections.abc import Mapping

from keras_convnext.weights import cache
from keras_convnext.weights.files import CheckpointError, flatten_state_dict, read_checkpoint
from keras_convnext.weights.loader import (
    assign_all,
    checkpoint_path,
    convert_decoder,
    convert_state_dict,
    detect_naming,
    plan_assignments,
)
from keras_convnext.weights.naming import DECODER_PREFIX, NON_ENCODER_KEYS


def _plan_decoder(decoder, converted, unmatched):
    """`[(variable, array)]` for the decoder, from `{"decoder/<name>": (key, array)}`, or raises."""
    expected = {DECODER_PREFIX + name: variable for name, variable in decoder.named_weights().items()}
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
            problems.append(
                f"shape mismatch {key} -> {name}: checkpoint {tuple(array.shape)}, model {tuple(expected[name].shape)}"
            )
    if problems:
        raise CheckpointError(
            "The FCMAE checkpoint's decoder does not fit this FCMAE model (check decoder_dim, "
            f"decoder_depth and patch_size: decoder_dim={decoder.decoder_dim}, "
            f"decoder_depth={decoder.decoder_depth}, patch_size={decoder.patch_size} here); nothing "
            "was loaded. " + ". ".join(problems) + "."
        )
    return [(expected[name], array) for name, (_, array) in converted.items()]


def _load(model, encoder, unmatched, decoder, decoder_unmatched):
    """Plans the encoder and the decoder, then assigns both; nothing is assigned if either fails."""
    assignments = plan_assignments(model.encoder, encoder, unmatched, fresh_head=False)
    assignments += _plan_decoder(model.decoder, decoder, decoder_unmatched)
    encoder.clear()
    decoder.clear()
    assign_all(assignments)
    return model


def load_fcmae_checkpoint(model, source):
    """Loads an official FCMAE checkpoint (file path or mapping) into an `FCMAE` model.

    The encoder, the decoder and the mask token must all fit; otherwise a
    `CheckpointError` says what differs and no weight changes.
    """
    if isinstance(source, Mapping):
        state_dict = flatten_state_dict(dict(source))
        label = "the state dict"
    else:
        label = checkpoint_path(source)
        state_dict = read_checkpoint(label)
    naming = detect_naming(state_dict)
    if naming not in NON_ENCODER_KEYS:
        raise CheckpointError(
            f"{label} is not an FCMAE pre-training checkpoint (its keys follow the {naming} naming); "
            "load classifier checkpoints into a ConvNeXt V2 model instead."
        )
    encoder, unmatched = convert_state_dict(state_dict, naming)
    decoder, decoder_unmatched = convert_decoder(state_dict, naming)
    state_dict.clear()
    return _load(model, encoder, unmatched, decoder, decoder_unmatched)


def load_fcmae_pretrained(model, entry):
    """Loads a registry FCMAE release (`weights="fcmae"`) into an `FCMAE` model: encoder and decoder.

    The release holds the official decoder (`weights.shapes.OFFICIAL_DECODER`:
    decoder_dim 512, decoder_depth 1, patch_size 32); a model built with
    another decoder gets a `CheckpointError` and no weight changes.
    """
    arrays = cache.converted_weights(entry)
    encoder = {name: (name, array) for name, array in arrays.items() if not name.startswith(DECODER_PREFIX)}
    decoder = {name: (name, array) for name, array in arrays.items() if name.startswith(DECODER_PREFIX)}
    arrays.clear()
    try:
        return _load(model, encoder, [], decoder, [])
    except CheckpointError as error:
        raise CheckpointError(f"weights={entry.tag!r} ({entry.filename}): {error}") from error
