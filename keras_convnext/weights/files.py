"""Reading checkpoint files into name -> numpy array mappings.

PyTorch files (`.pt`, `.pth`, `.bin`, `.ckpt`) in the format `torch.save`
writes since PyTorch 1.6 are read by `keras_convnext.weights.torch_zip`,
which needs no PyTorch and runs no code from the file; it is used whether
or not PyTorch is installed, so every user gets the same arrays. Files in
PyTorch's legacy format are read with `torch.load(weights_only=True)` when
PyTorch is installed, and refused with the way to re-save them otherwise.
"""

import importlib.util
import os
import warnings
from collections.abc import Mapping

import numpy as np

from keras_convnext.weights import torch_zip

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
KERAS_SUFFIX = ".weights.h5"
SUPPORTED = PICKLE_SUFFIXES + (SAFETENSORS_SUFFIX, KERAS_SUFFIX)

# Containers a state dict is commonly saved under, most preferred first: the EMA
# weights are the ones the published accuracies are measured with.
WRAPPER_KEYS = ("model_ema", "state_dict_ema", "ema", "model", "state_dict", "model_state", "module", "net")
# Key prefixes of wrapped modules: DataParallel/DistributedDataParallel, torch.compile.
KEY_PREFIXES = ("module.", "_orig_mod.")
_MAX_NESTING = 4


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model."""


def _legacy_resave_hint(path):
    return (
        f"{path} is in PyTorch's legacy (pre-1.6, non-zip) format, which cannot be read safely "
        "without PyTorch. Install PyTorch (the CPU build is enough: pip install torch "
        "--index-url https://download.pytorch.org/whl/cpu), or re-save the file once where "
        "PyTorch is installed: torch.save(torch.load(path, weights_only=True), new_path)."
    )


def _read_legacy_pickle(path):
    if importlib.util.find_spec("torch") is None:
        raise CheckpointError(_legacy_resave_hint(path))
    import torch

    try:
        # weights_only=True: unpickling never runs code from the file.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for bad files
        raise CheckpointError(
            f"Could not read the PyTorch checkpoint {path}: {error}. The file may be truncated "
            "or corrupted (download it again), or not a weights-only checkpoint."
        ) from error


def _read_pickle(path):
    if not torch_zip.is_zip_checkpoint(path):
        return _read_legacy_pickle(path)
    try:
        return torch_zip.load(path)
    except torch_zip.UnreadableTorchFile as error:
        raise CheckpointError(
            f"Could not read the PyTorch checkpoint {path}: {error}. Only tensors and plain "
            "containers (dict, list, numbers, strings) are read from PyTorch files."
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
    """Returns `{name: numpy array}` from a PyTorch or safetensors file.

    Nested containers are unwrapped (see `flatten_state_dict`).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; pass the path of a checkpoint file in it.")
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


def _is_tensor(value):
    """numpy, torch, JAX and TensorFlow arrays; not numpy scalars (metadata such as a best accuracy)."""
    return isinstance(value, np.ndarray) or (
        not isinstance(value, np.generic) and (hasattr(value, "detach") or hasattr(value, "__array__"))
    )


def _to_numpy(name, value, source):
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        return _torch_to_numpy(name, value, source)
    return np.asarray(value)


def _torch_to_numpy(name, value, source):
    """A torch tensor as a numpy array of the same dtype (bfloat16 as float32, which is exact)."""
    import torch

    if value.is_quantized:
        raise CheckpointError(f"{source}: tensor {name!r} is quantized; load a float checkpoint instead.")
    if value.layout != torch.strided:
        raise CheckpointError(
            f"{source}: tensor {name!r} is {value.layout} (sparse); convert it with .to_dense() first."
        )
    if value.device.type == "meta":
        raise CheckpointError(f"{source}: tensor {name!r} has no data (meta device).")
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.numpy()


def _unwrap(state, source):
    """The innermost mapping of tensors, following `WRAPPER_KEYS`; warns when a choice was made."""
    for _ in range(_MAX_NESTING):
        if any(_is_tensor(value) for value in state.values()):
            return state
        wrappers = [key for key in WRAPPER_KEYS if isinstance(state.get(key), Mapping)]
        if not wrappers:
            return state
        if len(wrappers) > 1:
            warnings.warn(
                f"{source} holds weights under {', '.join(repr(k) for k in wrappers)}; "
                f"loading {wrappers[0]!r}.",
                stacklevel=4,
            )
        state = state[wrappers[0]]
    return state


def _describe(value):
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def flatten_state_dict(state, source="the state dict"):
    """Unwraps a checkpoint container into a flat `{name: numpy array}` dict.

    Args:
        state: a mapping of name to tensor (numpy array or torch tensor),
            possibly under one of `WRAPPER_KEYS` (the first one present is
            used; a warning names it when there are several), with
            metadata (numbers, strings, nested optimizer state) beside it,
            which is skipped.
        source: how errors name the checkpoint.

    Returns:
        `{name: numpy array}`, with a DataParallel `module.` (or
        torch.compile `_orig_mod.`) prefix removed from the names.

    Raises:
        CheckpointError: the structure holds no tensors, or something that
            is not a tensor name or a tensor where one was expected.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{source} holds {_describe(state)}, not a dict of tensor names to tensors (a state dict)."
        )
    state = _unwrap(state, source)
    arrays = {}
    for name, value in state.items():
        if not _is_tensor(value):
            continue  # optimizer state, epochs and other metadata
        if not isinstance(name, str):
            raise CheckpointError(
                f"{source} holds a tensor under the key {name!r} ({type(name).__name__}); "
                "tensor names must be strings."
            )
        for prefix in KEY_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name in arrays:
            raise CheckpointError(f"{source} holds the tensor {name!r} twice (with and without a prefix).")
        arrays[name] = _to_numpy(name, value, source)
    if not arrays:
        keys = ", ".join(f"{key!r} ({type(state[key]).__name__})" for key in list(state)[:8]) or "none"
        raise CheckpointError(
            f"{source} contains no tensors (its keys, with the types of their values: {keys}). Expected "
            f"a dict of tensor names to tensors (numpy, torch, JAX or TensorFlow arrays), possibly "
            f"under one of {', '.join(WRAPPER_KEYS)}."
        )
    return arrays
