"""Reading PyTorch checkpoint files without PyTorch, and without running code from them.

`torch.save` (PyTorch 1.6 and later) writes a zip archive:

    <archive>/data.pkl      a pickle of the saved object; each tensor is a call of
                            `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
                            and each storage a persistent id
                            `("storage", torch.FloatStorage, key, location, numel)`
    <archive>/data/<key>    the raw bytes of storage `key`
    <archive>/byteorder     "little" or "big" (absent in files older than PyTorch 1.10: little)

`load` unpickles `data.pkl` with an unpickler that knows only tensors,
storages, `collections.OrderedDict` and Python's plain values (dict, list,
tuple, str, bytes, numbers, bool, None). Every other global in the pickle,
such as the `os.system` of a malicious `__reduce__`, is refused before it is
called, as `torch.load(..., weights_only=True)` does. Tensors come back as
numpy arrays (bfloat16 as float32, which holds every bfloat16 value
exactly). Files in PyTorch's legacy format (before 1.6, not a zip) are not
read here: `is_zip_checkpoint` tells them apart.
"""

import pickle
import zipfile
from collections import OrderedDict

import numpy as np


class UnreadableTorchFile(ValueError):
    """A PyTorch file that this reader cannot or will not read; the message says why."""


# Storage classes by the name `torch.save` pickles, with their element type.
# Storages of PyTorch 2's untyped kind hold bytes; `_rebuild_tensor_v3` names the dtype.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
_TORCH_DTYPES = {
    name: name
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128")
}
# Globals PyTorch may write that are refused here, with the reason in the user's terms.
_REFUSED_KINDS = {
    "torch._utils._rebuild_qtensor": "a quantized tensor",
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch._utils._rebuild_sparse_csr_tensor": "a sparse tensor",
    "torch._utils._rebuild_nested_tensor": "a nested tensor",
    "torch._utils._rebuild_meta_tensor_no_storage": "a tensor without data (meta device)",
    "torch._utils._rebuild_wrapper_subclass": "a tensor subclass",
    "torch._tensor._rebuild_from_type_v2": "a tensor subclass",
    "torch._utils._rebuild_parameter_with_state": "a parameter with extra Python state",
}
_ARCHIVE_RECORD = "data.pkl"


class _StorageType:
    """What `torch.FloatStorage` and the like unpickle to: just the element type."""

    def __init__(self, dtype):
        self.dtype = dtype


class _TensorDtype:
    """What `torch.float32` and the like unpickle to."""

    def __init__(self, dtype):
        self.dtype = dtype


class _Storage:
    """One storage's raw bytes, its element type and the file's byte order."""

    def __init__(self, data, dtype, byteorder):
        self.data = data
        self.dtype = dtype
        self.byteorder = byteorder

    def elements(self, dtype):
        """The bytes as a flat array of `dtype` (bfloat16 as raw uint16), in the file's byte order."""
        element = _numpy_dtype(dtype, self.byteorder)
        return np.frombuffer(self.data, element, count=len(self.data) // element.itemsize)

    def __setstate__(self, state):
        raise UnreadableTorchFile("the pickle tries to set the state of a storage")


class Tensor:
    """A tensor read from the file, before it is handed out as a numpy array."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    def __setstate__(self, state):
        raise UnreadableTorchFile("the pickle tries to set the state of a tensor")


def _numpy_dtype(dtype, byteorder):
    if dtype == "bfloat16":
        return np.dtype("uint16").newbyteorder(byteorder)
    return np.dtype(dtype).newbyteorder(byteorder)


def _strided_copy(storage, dtype, offset, size, stride):
    """The tensor `size` at element `offset` with element strides `stride` of `storage`, copied out."""
    shape_ok = (
        isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size + stride + (offset,))
    )
    if not shape_ok:
        raise UnreadableTorchFile(
            f"a tensor has an invalid layout (offset {offset!r}, size {size!r}, stride {stride!r})"
        )
    elements = storage.elements(dtype)
    if 0 in size:
        array = np.zeros(size, elements.dtype.newbyteorder("="))
    else:
        # Checked before any view is made: a hostile file must not reach past its storage.
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= elements.size:
            raise UnreadableTorchFile(
                f"a tensor of size {size} reaches element {last} of a storage of {elements.size} elements; "
                "the file is truncated or damaged"
            )
        count = int(np.prod(size))
        if elements.dtype.isnative and _contiguous(size, stride):
            # A view of the storage, not a copy: a checkpoint then takes its own size in memory once.
            array = elements[offset : offset + count].reshape(size)
        else:
            itemsize = elements.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(
                elements[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
            )
            array = np.array(view, dtype=elements.dtype.newbyteorder("="))
    if dtype == "bfloat16":
        # bfloat16 is the upper half of a float32: shifting the bits is exact.
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _contiguous(size, stride):
    """Whether element strides `stride` lay out a tensor of `size` row-major without gaps."""
    expected = 1
    for length, step in zip(reversed(size), reversed(stride)):
        if length != 1 and step != expected:
            return False
        expected *= length
    return True


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise UnreadableTorchFile("a tensor refers to something that is not a storage")
    return Tensor(_strided_copy(storage, storage.dtype, offset, size, stride))


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(storage, _Storage) or not isinstance(dtype, _TensorDtype):
        raise UnreadableTorchFile("a tensor refers to something that is not a storage of a known dtype")
    return Tensor(_strided_copy(storage, dtype.dtype, offset, size, stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, Tensor):
        raise UnreadableTorchFile("a parameter holds something that is not a tensor")
    return data


def _encode_bytes(text, encoding="latin1"):
    """`_codecs.encode`, which pickle protocol 2 uses for bytes, limited to that use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnreadableTorchFile("the pickle encodes bytes in an unexpected way")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "collections.OrderedDict": OrderedDict,
    "_codecs.encode": _encode_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles tensors and plain containers; refuses every other global before calling it."""

    def __init__(self, file, read_storage):
        super().__init__(file)
        self._read_storage = read_storage

    def find_class(self, module, name):
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[qualified]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TensorDtype(_TORCH_DTYPES[name])
        quantized_storage = module == "torch" and name.startswith(("QInt", "QUInt")) and name.endswith("Storage")
        if qualified in _REFUSED_KINDS or quantized_storage:
            kind = _REFUSED_KINDS.get(qualified, "a quantized tensor")
            raise UnreadableTorchFile(f"it holds {kind}, which this reader does not convert to weights")
        raise UnreadableTorchFile(
            f"it refers to the Python object {qualified}, which is not a tensor or a plain container; "
            "reading it could run code from the file, so it was refused (as torch.load(weights_only=True) "
            "does)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise UnreadableTorchFile(f"the pickle refers to an unknown external object {pid!r:.80}")
        return self._read_storage(pid[1].dtype, pid[2], pid[4])


def _archive_prefix(archive):
    """The top folder of the records (`archive/` for file objects, the file's stem otherwise)."""
    pickles = [name for name in archive.namelist() if name.count("/") == 1 and name.endswith("/" + _ARCHIVE_RECORD)]
    if len(pickles) != 1:
        names = set(archive.namelist())
        if any(name.split("/", 1)[-1].startswith("code/") for name in names):
            raise UnreadableTorchFile(
                "it is a TorchScript archive (torch.jit.save), not a saved state dict; "
                "save the model's state_dict() with torch.save instead"
            )
        raise UnreadableTorchFile("it is a zip file but not one written by torch.save (no single data.pkl)")
    return pickles[0][: -len(_ARCHIVE_RECORD)]


def _byteorder(archive, prefix):
    try:
        text = archive.read(prefix + "byteorder").decode("ascii").strip()
    except KeyError:
        return "<"
    if text not in ("little", "big"):
        raise UnreadableTorchFile(f"its byteorder record says {text!r}")
    return "<" if text == "little" else ">"


def _plain(value, seen):
    """`value` with every `Tensor` replaced by its numpy array; refuses anything else unexpected."""
    if isinstance(value, Tensor):
        return value.array
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if type(value) not in (dict, OrderedDict, list, tuple):
        raise UnreadableTorchFile(f"it holds a {type(value).__name__} where tensors or containers were expected")
    if id(value) in seen:
        raise UnreadableTorchFile("it holds a container that contains itself")
    seen = seen | {id(value)}
    if isinstance(value, dict):
        return type(value)((key, _plain(item, seen)) for key, item in value.items())
    return type(value)(_plain(item, seen) for item in value)


def is_zip_checkpoint(path):
    """True for files in the format of `torch.save` since PyTorch 1.6 (a zip archive)."""
    return zipfile.is_zipfile(path)


def load(path):
    """Reads a `torch.save` zip file: the saved object with tensors as numpy arrays.

    Raises `UnreadableTorchFile` (a ValueError) for files that are not such
    archives, are damaged, or hold anything but tensors and plain containers.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive)
            byteorder = _byteorder(archive, prefix)
            storages = {}

            def read_storage(dtype, key, numel):
                if key not in storages:
                    # Writeable memory, so that the arrays viewing it are ordinary writeable arrays.
                    storages[key] = _Storage(bytearray(archive.read(f"{prefix}data/{key}")), dtype, byteorder)
                    available = storages[key].elements(dtype).size
                    if isinstance(numel, int) and available < numel:
                        raise UnreadableTorchFile(f"storage {key} has {available} of its {numel} elements")
                return storages[key]

            with archive.open(prefix + _ARCHIVE_RECORD) as pickled:
                loaded = _RestrictedUnpickler(pickled, read_storage).load()
            return _plain(loaded, frozenset())
    except UnreadableTorchFile:
        raise
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise UnreadableTorchFile(f"it is truncated or damaged ({error})") from error
    except (TypeError, ValueError, AttributeError, IndexError, RecursionError, MemoryError) as error:
        raise UnreadableTorchFile(f"its pickle is not a plain checkpoint ({type(error).__name__}: {error})") from error
