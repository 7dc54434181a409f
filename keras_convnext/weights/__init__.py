"""Checkpoint namings, the loader, and the pretrained registry.

The package sits above the models: it reads their variants table and, for
Keras `.weights.h5` files, builds a model; the models never import it at
module load. The builder imports `load_for_constructor` inside
`keras_convnext.ConvNeXt` when `weights=` is given.
"""

import os

from keras_convnext.weights import registry
from keras_convnext.weights.files import CheckpointError, read_checkpoint
from keras_convnext.weights.loader import convert_state_dict, load_state_dict, load_weights
from keras_convnext.weights.registry import list_weights


def load_for_constructor(model, weights, variant_name):
    """`weights=` of the constructors: a file path, or a registry tag."""
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and os.path.exists(weights)):
        return load_weights(model, weights)
    if not isinstance(weights, str):
        raise TypeError(
            f"weights must be None, a registry tag such as 'imagenet', or a checkpoint file path "
            f"(a str or os.PathLike); got a {type(weights).__name__}. For an in-memory state dict, "
            "build the model, then call keras_convnext.load_weights(model, state_dict)."
        )
    return registry.resolve(model, weights, variant_name)


__all__ = [
    "CheckpointError",
    "convert_state_dict",
    "list_weights",
    "load_for_constructor",
    "load_state_dict",
    "load_weights",
    "read_checkpoint",
]
