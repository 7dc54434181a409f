"""Converted weights on disk: a safetensors file keyed by Keras weight path.

The file needs no model to read: its tensors are named by weight path
(`stage2_block5/pwconv1/kernel`) in the Keras layout, and its safetensors
metadata holds a manifest (`MANIFEST_KEYS`: the format, the library version,
the variant and tag, the SHA-256 of the original checkpoint it was converted
from, and the SHA-256 of its own tensor data), which `check_manifest`
compares with what a load expects.

`write_weights` streams one tensor at a time into a temporary file beside
the destination and renames it into place, so converting never holds a
second copy of the weights and never leaves a half-written file.
"""

import hashlib
import json
import os

import numpy as np

from keras_convnext.weights.files import CheckpointError

FORMAT = "keras_convnext-weights-1"
MANIFEST_KEYS = ("format", "library_version", "variant", "tag", "source_sha256", "data_sha256")
# The data hash is known only once the data is written: the header holds this
# placeholder of the same length, overwritten in place afterwards.
_PENDING_HASH = "p" * 64


def _header(arrays, metadata):
    """The safetensors JSON header: every tensor's dtype, shape and byte range."""
    header, offset = {"__metadata__": {key: str(value) for key, value in metadata.items()}}, 0
    for name, array in arrays.items():
        size = int(array.size) * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # safetensors pads the header with spaces so the data starts 8-byte aligned.
    return text + b" " * (-len(text) % 8)


def write_weights(path, arrays, metadata):
    """Writes `{weight path: float array}` as float32, with `metadata` (strings), atomically."""
    from keras_convnext.weights.download import atomic_path

    arrays = {name: np.asarray(array) for name, array in arrays.items()}
    header = _header(arrays, dict(metadata, data_sha256=_PENDING_HASH))
    digest = hashlib.sha256()
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(len(header).to_bytes(8, "little"))
            handle.write(header)
            for array in arrays.values():
                # One contiguous tensor at a time: a transposed view is copied here, alone.
                data = np.ascontiguousarray(array, dtype=np.float32).data
                digest.update(data)
                handle.write(data)
            handle.seek(8 + header.index(_PENDING_HASH.encode("ascii")))
            handle.write(digest.hexdigest().encode("ascii"))


def read_manifest(path):
    """The manifest of a converted weights file; a CheckpointError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}).") from error
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a keras_convnext converted weights file (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r})."
        )
    return {key: metadata.get(key) for key in MANIFEST_KEYS}


def check_manifest(path, expected):
    """Raises a CheckpointError naming each manifest field that differs from `expected`."""
    manifest = read_manifest(path)
    wrong = [
        f"{key} {manifest.get(key)!r} (expected {value!r})"
        for key, value in expected.items()
        if value is not None and manifest.get(key) != value
    ]
    if wrong:
        raise CheckpointError(f"{path} does not match this release: {', '.join(wrong)}.")
    return manifest


def read_weights(path):
    """`(arrays, data_sha256)`: `{weight path: float32 array}` and the hash of the tensor data.

    Each tensor is read straight into its own array (no memory map, so the
    file's pages do not stay resident beside the copies); the header is
    checked as safetensors checks it: float32 only, contiguous offsets that
    cover the data exactly.
    """
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
            header.pop("__metadata__", None)
            data_size = os.fstat(handle.fileno()).st_size - 8 - header_size
            entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
            digest, arrays, position = hashlib.sha256(), {}, 0
            for name, info in entries:
                start, end = info["data_offsets"]
                shape = tuple(int(size) for size in info["shape"])
                if info["dtype"] != "F32" or start != position or end - start != 4 * int(np.prod(shape)):
                    raise ValueError(f"the header entry of {name} is inconsistent")
                array = np.fromfile(handle, dtype="<f4", count=(end - start) // 4)
                if array.size * 4 != end - start:
                    raise ValueError("the file is truncated")
                digest.update(array.data)
                arrays[name] = array.reshape(shape)
                position = end
            if position != data_size:
                raise ValueError(f"{data_size - position} bytes follow the last tensor")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} could not be read ({error}); the file is damaged.") from error
    return arrays, digest.hexdigest()
