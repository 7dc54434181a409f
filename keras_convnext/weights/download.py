"""Download official checkpoints, convert them once, and cache the Keras weights.

Cache layout (under `KERAS_CONVNEXT_CACHE_DIR`, default
`$KERAS_HOME/models/keras_convnext`, with `KERAS_HOME` defaulting to `~/.keras`):

- `downloads/<official file name>`: the original checkpoint while it is
  being converted; removed once the conversion is cached.
- `converted/<Constructor>-<tag>.weights.h5`: the converted weights, saved
  from the constructor's default model (`include_top` unless encoder-only,
  the entry's classes). Later loads read only this file: no original, no torch.

Every file appears under its final name only through `os.replace` of a
complete temporary file, so an interrupted download or conversion never
leaves something that a later run takes for a good file.

Files supplied by hand: put the official file (or a converted
`<Constructor>-<tag>.weights.h5`) in the directory named by
`KERAS_CONVNEXT_WEIGHTS_DIR`, or pass its path as `weights=`.
"""

import contextlib
import hashlib
import importlib.util
import os
import socket
import tempfile
import urllib.error
import urllib.request

import keras

from keras_convnext.models.convnext import CONSTRUCTORS
from keras_convnext.weights.files import PICKLE_SUFFIXES, CheckpointError, read_checkpoint
from keras_convnext.weights.loader import load_state_dict, load_weights

CACHE_ENV = "KERAS_CONVNEXT_CACHE_DIR"
WEIGHTS_DIR_ENV = "KERAS_CONVNEXT_WEIGHTS_DIR"
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60


class WeightsUnavailableError(OSError):
    """A checkpoint could not be downloaded (no network, server down, HTTP error)."""


def cache_dir():
    """The directory holding downloads and converted weights (created on demand)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
        root = os.path.join(keras_home, "models", "keras_convnext")
    return root


def converted_name(entry):
    return f"{entry.variant}-{entry.tag}.weights.h5"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path, expected, url):
    """Raises a CheckpointError when `path` does not have the SHA-256 `expected`."""
    if expected is None:
        return
    actual = _sha256(path)
    if actual != expected.lower():
        raise CheckpointError(
            f"The checkpoint from {url} has SHA-256 {actual}, but {expected} was expected: the "
            "file is corrupted or incomplete, or not the published release. It was not kept; "
            "run again to download it anew."
        )


def _offline_error(url, filename, reason):
    hand = os.environ.get(WEIGHTS_DIR_ENV) or "/path/to/dir"
    return WeightsUnavailableError(
        f"Could not download {url} ({reason}). To supply the file by hand, download it on a "
        f"machine with network access and either pass its path as weights='/path/to/{filename}', "
        f"or put it in a directory and set {WEIGHTS_DIR_ENV}={hand} (the file keeps its name "
        f"{filename})."
    )


@contextlib.contextmanager
def atomic_path(final_path):
    """Yields a temporary path beside `final_path`; renames it there only on success."""
    directory, name = os.path.split(final_path)
    directory = directory or "."
    os.makedirs(directory, exist_ok=True)
    # Keep the double suffix (.weights.h5) that Keras' save_weights requires.
    suffix = ".weights.h5" if name.endswith(".weights.h5") else os.path.splitext(name)[1]
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".part" + suffix, dir=directory)
    os.close(handle)
    try:
        yield temporary
        # mkstemp creates owner-only files; give the result the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, final_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def download(url, destination, sha256=None, progress=True):
    """Downloads `url` to `destination` atomically, with a progress bar and checks.

    The transfer must deliver as many bytes as the server announced, and the
    file must have `sha256` when one is given; otherwise nothing is written.
    """
    filename = os.path.basename(destination)
    with atomic_path(destination) as temporary:
        try:
            response = urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS)
        except (urllib.error.URLError, socket.timeout, ConnectionError) as error:
            reason = getattr(error, "reason", None) or error
            raise _offline_error(url, filename, reason) from error
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            bar = keras.utils.Progbar(total, unit_name="byte") if progress else None
            received = 0
            try:
                with open(temporary, "wb") as handle:
                    for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                        handle.write(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(received)
            except Exception as error:  # a reset connection, http.client.IncompleteRead, ...
                raise CheckpointError(
                    f"The download of {url} broke off after {received} bytes ({error!r}); "
                    "nothing was kept. Run again to retry."
                ) from error
        if total is not None and received != total:
            raise CheckpointError(
                f"The download of {url} is incomplete: {received} of {total} bytes arrived; "
                "nothing was kept. Run again to retry."
            )
        check_sha256(temporary, sha256, url)
    return destination


def _supplied_by_hand(name):
    directory = os.environ.get(WEIGHTS_DIR_ENV)
    if directory:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def fetch_checkpoint(entry, progress=True):
    """Path of the entry's original checkpoint: supplied by hand, cached, or downloaded.

    Returns `(path, downloaded)`; `downloaded` is True when the file lives in
    the cache (and may be removed after conversion).
    """
    by_hand = _supplied_by_hand(entry.filename)
    if by_hand:
        check_sha256(by_hand, entry.sha256, by_hand)
        return by_hand, False
    path = os.path.join(cache_dir(), "downloads", entry.filename)
    if os.path.isfile(path):
        try:
            check_sha256(path, entry.sha256, path)
            return path, True
        except CheckpointError:
            os.remove(path)  # a stale or damaged copy: download it again
    print(f"Downloading {entry.url}")
    return download(entry.url, path, entry.sha256, progress=progress), True


@contextlib.contextmanager
def _reference_settings():
    # The cached file must not depend on the caller's global settings: float32
    # variables (a bfloat16 policy would round the weights) in channels_last.
    policy, data_format = keras.config.dtype_policy(), keras.config.image_data_format()
    keras.config.set_dtype_policy("float32")
    keras.config.set_image_data_format("channels_last")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)
        keras.config.set_image_data_format(data_format)


def reference_model(entry):
    """The model the converted file is saved from: the constructor's defaults."""
    with _reference_settings():
        if entry.encoder_only:
            return CONSTRUCTORS[entry.variant](include_top=False)
        return CONSTRUCTORS[entry.variant](classes=entry.classes)


def _weights_of(model):
    return {variable.path: variable.numpy() for variable in model.weights}


def convert_checkpoint(entry, checkpoint_path, destination):
    """Converts an original checkpoint into `destination` (`.weights.h5`), atomically.

    Returns the converted weights as `{weight path: array}`.
    """
    state_dict = read_checkpoint(checkpoint_path)  # a damaged file fails here, before any model is built
    model = reference_model(entry)
    load_state_dict(model, state_dict, source=checkpoint_path)
    with atomic_path(destination) as temporary:
        model.save_weights(temporary)
    return _weights_of(model)


def _torch_available():
    return importlib.util.find_spec("torch") is not None


def _require_torch_for(entry):
    # Checked before downloading: a multi-GB file that cannot be read helps nobody.
    if entry.filename.endswith(PICKLE_SUFFIXES) and not _torch_available():
        raise CheckpointError(
            f"{entry.variant} weights={entry.tag!r} is published as a PyTorch pickle "
            f"({entry.url}), which needs PyTorch to read once for the conversion: "
            f"pip install torch (the CPU build is enough). Alternatively convert it elsewhere "
            f"(python -m keras_convnext.convert {entry.tag} --variant {entry.variant}) and put "
            f"{converted_name(entry)} in the directory named by {WEIGHTS_DIR_ENV}."
        )


def converted_weights(entry, progress=True):
    """The entry's weights as `{weight path: array}`, downloading and converting once.

    The first call downloads the original (or takes it from
    `KERAS_CONVNEXT_WEIGHTS_DIR`), converts it and caches the `.weights.h5`;
    later calls read only that file.

    Raises:
        WeightsUnavailableError: the file is not cached and cannot be downloaded.
        CheckpointError: the download is incomplete, has the wrong SHA-256, or
            cannot be read or converted; nothing is left in the cache then.
    """
    name = converted_name(entry)
    cached = _supplied_by_hand(name) or os.path.join(cache_dir(), "converted", name)
    if os.path.isfile(cached):
        model = reference_model(entry)
        load_weights(model, cached)
        return _weights_of(model)
    _require_torch_for(entry)
    checkpoint, downloaded = fetch_checkpoint(entry, progress=progress)
    try:
        weights = convert_checkpoint(entry, checkpoint, cached)
    except CheckpointError as error:
        if downloaded:
            with contextlib.suppress(FileNotFoundError):
                os.remove(checkpoint)
        raise CheckpointError(
            f"The checkpoint {entry.filename} for {entry.variant} weights={entry.tag!r} could not "
            f"be converted{' and was removed from the cache' if downloaded else ''}: {error}"
        ) from error
    if downloaded:
        # The converted file is all later loads need; another process may have removed it already.
        with contextlib.suppress(FileNotFoundError):
            os.remove(checkpoint)
    return weights
