"""The pretrained-weights cache: download once, convert once, check on every load.

Layout (under `KERAS_CONVNEXT_CACHE_DIR`, default
`$KERAS_HOME/models/keras_convnext`, with `KERAS_HOME` defaulting to `~/.keras`):

- `converted/<Constructor>-<tag>.safetensors`: the converted weights, keyed
  by Keras weight path (an FCMAE release's decoder as `decoder/<name>`,
  see `expected_shapes`), with a manifest (`weights_file.MANIFEST_KEYS`) and
  the SHA-256 of its tensor data. Loads read only this file: no original,
  no PyTorch, no model but the caller's.
- `hashes/<official file name>.sha256`: the SHA-256 and size of the first
  download that converted cleanly. No hash of the official files is
  published, so the first one is trusted; every later download of that
  file, and every converted file's manifest, must match it.
- `downloads/<official file name>`: the original while it is converted;
  removed afterwards (under the lock, so no other process still needs it).
  One left by a killed run is complete (downloads appear only by rename)
  and is converted on the next run, if it matches the trusted hash.
- `locks/<Constructor>-<tag>.lock`: held (fcntl, POSIX) while a process
  downloads or converts that entry, so concurrent processes share one
  download and one conversion: the second waits and then finds the result.

A converted file that cannot be read, or whose manifest, data hash or
tensors do not match, is removed and rebuilt once, with a message naming it.

Files supplied by hand: put the official file (or a converted
`<Constructor>-<tag>.safetensors`) in the directory named by
`KERAS_CONVNEXT_WEIGHTS_DIR`, or pass a checkpoint's path as `weights=`.
"""

import contextlib
import os
import sys

from keras_convnext.weights import download
from keras_convnext.weights import weights_file
from keras_convnext.weights.files import CheckpointError, read_checkpoint
from keras_convnext.weights.loader import (
    check_tensors,
    checkpoint_names,
    convert_decoder,
    convert_state_dict,
    detect_naming,
)
from keras_convnext.weights.shapes import pretraining_shapes, variant_shapes

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first loads may download twice
    fcntl = None

CACHE_ENV = "KERAS_CONVNEXT_CACHE_DIR"
WEIGHTS_DIR_ENV = download.WEIGHTS_DIR_ENV


def cache_dir():
    """The directory holding converted weights, hashes, locks and downloads."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
        root = os.path.join(keras_home, "models", "keras_convnext")
    return root


def converted_name(entry):
    return f"{entry.variant}-{entry.tag}.safetensors"


def _path(kind, name):
    return os.path.join(cache_dir(), kind, name)


class CacheUnusableError(OSError):
    """The weights cache directory cannot be created or written."""


def _open_lock(path):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, "a+b")
    except OSError as error:
        raise CacheUnusableError(
            f"The weights cache {cache_dir()} cannot be used ({error.strerror or error}: "
            f"{error.filename or path}). Set {CACHE_ENV} to a writable directory."
        ) from error


@contextlib.contextmanager
def file_lock(path):
    """Holds an exclusive advisory lock on `path` (created if needed) for the block."""
    with _open_lock(path) as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _supplied_by_hand(name):
    directory = os.environ.get(WEIGHTS_DIR_ENV)
    if directory:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------- trusted hashes


def known_hash(entry):
    """`(sha256, size)` the entry's original must have: the registry's, else the recorded one."""
    if entry.sha256:
        return entry.sha256.lower(), entry.size
    record = _path("hashes", entry.filename + ".sha256")
    if not os.path.isfile(record):
        return None, entry.size
    with open(record, encoding="ascii") as handle:
        fields = handle.read().split()
    if len(fields) != 2 or len(fields[0]) != 64:
        os.remove(record)  # a damaged record trusts nothing; the next download records anew
        return None, entry.size
    return fields[0], int(fields[1])


def _record_hash(entry, sha256, size):
    if entry.sha256 or known_hash(entry)[0]:
        return
    with download.atomic_path(_path("hashes", entry.filename + ".sha256")) as temporary:
        with open(temporary, "w", encoding="ascii") as handle:
            handle.write(f"{sha256} {size}\n")


# ---------------------------------------------------------------- conversion


def expected_shapes(entry):
    """`{weight path: shape}` of the entry's converted file.

    The variant with the entry's head, or for an FCMAE pre-training release
    (no classifier) the backbone and the official decoder (`decoder/...`).
    """
    if entry.encoder_only:
        return pretraining_shapes(entry.variant)
    return variant_shapes(entry.variant, entry.classes)


def _check_against_variant(entry, converted, unmatched, naming):
    """Raises unless the converted tensors are exactly the entry's variant and head (or decoder)."""
    expected = expected_shapes(entry)
    missing = checkpoint_names(sorted(set(expected) - set(converted)), naming, converted)
    extra = sorted(unmatched) + sorted(converted[p][0] for p in set(converted) - set(expected))
    wrong = sorted(
        f"{converted[p][0]}: {tuple(converted[p][1].shape)}, expected {expected[p]}"
        for p in set(expected) & set(converted)
        if tuple(converted[p][1].shape) != expected[p]
    )
    problems = [
        f"{label}: {', '.join(items)}"
        for label, items in (("missing", missing), ("unexpected", extra), ("wrong shapes", wrong))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"it is not the {entry.variant} checkpoint the registry describes "
            f"({entry.classes or 'no'} classes): " + "; ".join(problems) + "."
        )


def convert(entry, checkpoint_path, destination, source_sha256):
    """Converts an official checkpoint into a converted weights file, without a model."""
    state_dict = read_checkpoint(checkpoint_path)
    naming = detect_naming(state_dict)
    converted, unmatched = convert_state_dict(state_dict, naming)
    decoder, decoder_unmatched = convert_decoder(state_dict, naming)
    state_dict.clear()
    converted.update(decoder)
    _check_against_variant(entry, converted, unmatched + decoder_unmatched, naming)
    from keras_convnext import __version__

    manifest = {
        "format": weights_file.FORMAT, "library_version": __version__, "variant": entry.variant,
        "tag": entry.tag, "source_sha256": source_sha256,
    }
    weights_file.write_weights(destination, {path: array for path, (_, array) in converted.items()}, manifest)


def _fetch(entry, progress):
    """`(path, sha256, downloaded)` of the entry's original: supplied by hand or downloaded."""
    expected, size = known_hash(entry)
    by_hand = _supplied_by_hand(entry.filename)
    if by_hand:
        actual = download.sha256_of(by_hand)
        download.check_sha256(actual, expected, by_hand)
        return by_hand, actual, False
    path = _path("downloads", entry.filename)
    download.remove_stale_temporaries(path)
    if os.path.isfile(path):
        # Complete (it was renamed into place), left by a run killed before converting it.
        actual = download.sha256_of(path)
        if expected is None or actual == expected:
            return path, actual, True
        os.remove(path)
    print(f"Downloading {entry.url}", file=sys.stderr)
    actual = download.download(entry.url, path, expected, size, progress=progress)
    return path, actual, True


def _build(entry, destination, progress):
    """Downloads (or takes by hand) and converts the entry into `destination`."""
    checkpoint, sha256, downloaded = _fetch(entry, progress)
    try:
        convert(entry, checkpoint, destination, sha256)
        _record_hash(entry, sha256, os.path.getsize(checkpoint))
    except CheckpointError as error:
        raise CheckpointError(
            f"The checkpoint {entry.filename} for {entry.variant} weights={entry.tag!r} could not "
            f"be converted{' and was removed from the cache' if downloaded else ''}: {error}"
        ) from error
    finally:
        if downloaded:
            with contextlib.suppress(FileNotFoundError):
                os.remove(checkpoint)


@contextlib.contextmanager
def original_checkpoint(entry, progress=True):
    """Yields the path of the entry's original checkpoint (by hand, or downloaded and checked).

    A downloaded file is removed when the block ends; the entry's lock is
    held throughout, so no other process removes it while it is in use.
    """
    with file_lock(_path("locks", f"{entry.variant}-{entry.tag}.lock")):
        checkpoint, sha256, downloaded = _fetch(entry, progress)
        try:
            yield checkpoint
            _record_hash(entry, sha256, os.path.getsize(checkpoint))
        finally:
            if downloaded:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(checkpoint)


# ---------------------------------------------------------------- checked loads


def read_checked(entry, path):
    """`{weight path: array}` of a converted file whose manifest and data match the entry."""
    source_sha256, _ = known_hash(entry)
    expected = {"variant": entry.variant, "tag": entry.tag, "source_sha256": source_sha256}
    manifest = weights_file.check_manifest(path, expected)
    arrays, data_sha256 = weights_file.read_weights(path)
    if manifest.get("data_sha256") != data_sha256:
        raise CheckpointError(f"{path} is damaged: its tensor data does not have the SHA-256 its manifest records.")
    check_tensors(arrays, what=f"weights in {path}")
    expected_tensors = expected_shapes(entry)
    found = {name: tuple(array.shape) for name, array in arrays.items()}
    if found != expected_tensors:
        differ = sorted(set(found) ^ set(expected_tensors)) or sorted(
            name for name in found if found[name] != expected_tensors[name]
        )
        raise CheckpointError(
            f"{path} does not hold the tensors of {entry.variant} weights={entry.tag!r} "
            f"(these differ: {', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''})."
        )
    return arrays


def converted_weights(entry, progress=True):
    """The entry's weights as `{weight path: array}`, downloading and converting once.

    Raises:
        WeightsUnavailableError: the file is not cached and cannot be downloaded.
        CheckpointError: the download is incomplete, differs from the trusted
            SHA-256, or cannot be read or converted; nothing is left in the
            cache then.
    """
    by_hand = _supplied_by_hand(converted_name(entry))
    if by_hand:
        return read_checked(entry, by_hand)
    path = _path("converted", converted_name(entry))
    with file_lock(_path("locks", f"{entry.variant}-{entry.tag}.lock")):
        download.remove_stale_temporaries(path)
        if os.path.isfile(path):
            try:
                return read_checked(entry, path)
            except CheckpointError as error:
                print(
                    f"The cached weights {path} are unusable ({error}); removing the file and "
                    "converting the release again.", file=sys.stderr,
                )
                os.remove(path)
        _build(entry, path, progress)
        return read_checked(entry, path)
