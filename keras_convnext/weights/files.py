"""Reading checkpoint files into name -> numpy array mappings."""

import os

import numpy as np

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
KERAS_SUFFIX = ".weights.h5"
SUPPORTED = PICKLE_SUFFIXES + (SAFETENSORS_SUFFIX, KERAS_SUFFIX)


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model."""


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor; bfloat16/float16 go through float32
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _read_pickle(path):
    try:
        import torch
    except ImportError as error:
        raise CheckpointError(
            f"Reading {path} needs PyTorch, since .pt/.pth/.bin files are PyTorch pickles. "
            "Install it (`pip install torch`), or use a .safetensors copy of the checkpoint, "
            "which needs no PyTorch."
        ) from error
    try:
        # weights_only=True: unpickling never runs code from the file.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for bad files
        raise CheckpointError(
            f"Could not read the PyTorch checkpoint {path}: {error}. The file may be truncated "
            "or corrupted (download it again), or not a weights-only checkpoint."
        ) from error


def _read_safetensors(path):
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as error:
        raise CheckpointError(
            f"Could not read the safetensors file {path}: {error}. The file may be truncated "
            "or corrupted."
        ) from error


def read_checkpoint(path):
    """Returns `{name: numpy array}` from a PyTorch pickle or safetensors file.

    Nested containers are unwrapped: official checkpoints keep the weights
    under `"model"`, others under `"state_dict"`; a `module.` prefix (from
    DistributedDataParallel) is removed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    if path.endswith(SAFETENSORS_SUFFIX):
        state = _read_safetensors(path)
    elif path.endswith(PICKLE_SUFFIXES):
        state = _read_pickle(path)
    else:
        raise CheckpointError(
            f"Unsupported checkpoint file {path}: expected one of {', '.join(SUPPORTED)}."
        )
    return flatten_state_dict(state, source=path)


def flatten_state_dict(state, source="the state dict"):
    """Unwraps a checkpoint container into a flat `{name: numpy array}` dict."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} does not hold a dict of tensors (got {type(state).__name__}).")
    for wrapper in ("model", "state_dict", "model_state"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    arrays = {}
    for name, value in state.items():
        if isinstance(value, dict) or value is None or isinstance(value, (str, int, float)):
            continue  # optimizer state, epochs and other metadata
        if name.startswith("module."):
            name = name[len("module."):]
        arrays[name] = _to_numpy(value)
    if not arrays:
        raise CheckpointError(f"{source} contains no tensors.")
    return arrays
