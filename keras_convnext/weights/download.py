"""Downloading a file: atomically, with an overall deadline, a moving progress bar and checks.

A download is written to a hidden temporary file beside its destination and
renamed into place only when every byte the server announced has arrived
and, where one is known, the SHA-256 matches; a failed or interrupted
download leaves nothing that a later run could take for a good file.
"""

import contextlib
import hashlib
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request

from keras_convnext.weights.files import CheckpointError

WEIGHTS_DIR_ENV = "KERAS_CONVNEXT_WEIGHTS_DIR"
DEADLINE_ENV = "KERAS_CONVNEXT_DOWNLOAD_DEADLINE"
DEFAULT_DEADLINE_SECONDS = 3600  # the largest release, 2.6 GB, at about 6 Mbit/s
READ_TIMEOUT_SECONDS = 60  # one silent read this long ends the transfer
CHUNK_BYTES = 1 << 20
PROGRESS_INTERVAL_SECONDS = 0.25
TEMPORARY_MARK = ".part"


class WeightsUnavailableError(OSError):
    """A checkpoint could not be downloaded (no network, server down, HTTP error, deadline)."""


def sha256_of(path):
    """The SHA-256 of a file, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(actual, expected, source):
    """Raises a CheckpointError when the hex digest `actual` is not `expected` (None: any)."""
    if expected is not None and actual != expected.lower():
        raise CheckpointError(
            f"The checkpoint from {source} has SHA-256 {actual}, but {expected} was expected: the "
            "file is corrupted or incomplete, or not the published release. It was not kept; "
            "run again to download it anew."
        )


def deadline_seconds():
    """The overall time a download may take, from `KERAS_CONVNEXT_DOWNLOAD_DEADLINE` (seconds)."""
    value = os.environ.get(DEADLINE_ENV)
    if not value:
        return DEFAULT_DEADLINE_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"{DEADLINE_ENV} must be a positive number of seconds; got {value!r}.")
    return seconds


@contextlib.contextmanager
def atomic_path(final_path):
    """Yields a temporary path beside `final_path`; renames it there only on success."""
    directory, name = os.path.split(final_path)
    directory = directory or "."
    os.makedirs(directory, exist_ok=True)
    # Keep the double suffix (.weights.h5) that Keras' save_weights requires.
    suffix = ".weights.h5" if name.endswith(".weights.h5") else os.path.splitext(name)[1]
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMPORARY_MARK + suffix, dir=directory)
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


def remove_stale_temporaries(final_path):
    """Removes temporary files that killed runs left beside `final_path`.

    Call it only while holding the lock that guards `final_path`, so no
    running writer's file is taken for a stale one.
    """
    directory, name = os.path.split(final_path)
    if not os.path.isdir(directory or "."):
        return
    for other in os.listdir(directory or "."):
        if other.startswith(f".{name}.") and TEMPORARY_MARK in other:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, other))


class Progress:
    """A one-line progress bar on stderr, redrawn at most every `PROGRESS_INTERVAL_SECONDS`."""

    def __init__(self, label, total, stream=None):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.last_draw = None

    def update(self, received, final=False):
        now = time.monotonic()
        if not final and self.last_draw is not None and now - self.last_draw < PROGRESS_INTERVAL_SECONDS:
            return
        self.last_draw = now
        done = f"{received / 2**20:.1f} MB"
        if self.total:
            fraction = received / self.total
            bar = "#" * int(30 * fraction)
            done = f"[{bar:<30}] {received / 2**20:.1f}/{self.total / 2**20:.1f} MB ({fraction:.0%})"
        self.stream.write(f"\r{self.label}: {done}" + ("\n" if final else ""))
        self.stream.flush()


def _offline_error(url, filename, reason):
    hand = os.environ.get(WEIGHTS_DIR_ENV) or "/path/to/dir"
    return WeightsUnavailableError(
        f"Could not download {url} ({reason}). To supply the file by hand, download it on a "
        f"machine with network access and either pass its path as weights='/path/to/{filename}', "
        f"or put it in a directory and set {WEIGHTS_DIR_ENV}={hand} (the file keeps its name "
        f"{filename})."
    )


def _copy_body(response, handle, url, total, progress):
    """Streams the response into `handle`; returns `(bytes received, sha256 hex)`."""
    deadline = deadline_seconds()
    started = time.monotonic()
    digest, received = hashlib.sha256(), 0
    bar = Progress(f"Downloading {os.path.basename(url)}", total) if progress else None
    for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
        handle.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        if bar is not None:
            bar.update(received)
        if time.monotonic() - started > deadline:
            raise WeightsUnavailableError(
                f"The download of {url} did not finish within {deadline:g} s ({received} bytes "
                f"arrived); nothing was kept. Set {DEADLINE_ENV} to allow more time, or supply "
                f"the file by hand ({WEIGHTS_DIR_ENV})."
            )
    if bar is not None:
        bar.update(received, final=True)
    return received, digest.hexdigest()


def download(url, destination, sha256=None, size=None, progress=True):
    """Downloads `url` to `destination` atomically; returns the file's SHA-256 (hex).

    The transfer must deliver as many bytes as the server announced (and
    `size`, when given), within the overall deadline (`deadline_seconds()`),
    and the file must have `sha256` when one is given; otherwise nothing is
    written and a WeightsUnavailableError (network, deadline) or
    CheckpointError (incomplete or different file) says why.
    """
    filename = os.path.basename(destination)
    with atomic_path(destination) as temporary:
        try:
            response = urllib.request.urlopen(url, timeout=READ_TIMEOUT_SECONDS)
        except (urllib.error.URLError, socket.timeout, ConnectionError) as error:
            reason = getattr(error, "reason", None) or error
            raise _offline_error(url, filename, reason) from error
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length else size
            try:
                with open(temporary, "wb") as handle:
                    received, actual = _copy_body(response, handle, url, total, progress)
            except WeightsUnavailableError:
                raise
            except Exception as error:  # a reset connection, http.client.IncompleteRead, a timeout ...
                raise CheckpointError(
                    f"The download of {url} broke off ({error!r}); nothing was kept. Run again to retry."
                ) from error
        for announced in {total, size} - {None}:
            if received != announced:
                raise CheckpointError(
                    f"The download of {url} is incomplete or not the expected file: {received} bytes "
                    f"arrived, {announced} were expected; nothing was kept. Run again to retry."
                )
        check_sha256(actual, sha256, url)
    return actual
