"""Checkpoint namings, the loader, and the pretrained registry."""

import os

from keras_convnext.models import convnext as _convnext
from keras_convnext.weights import registry
from keras_convnext.weights.files import CheckpointError, read_checkpoint
from keras_convnext.weights.loader import convert_state_dict, load_state_dict, load_weights


def load_for_constructor(model, weights, variant_name):
    """`weights=` of the constructors: a file path, or a registry tag."""
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and os.path.exists(weights)):
        return load_weights(model, weights)
    return registry.resolve(model, weights, variant_name)


_convnext.set_weights_loader(load_for_constructor)

__all__ = [
    "CheckpointError",
    "convert_state_dict",
    "load_state_dict",
    "load_weights",
    "read_checkpoint",
]
