"""Settings of the running process that the models' speed depends on."""

import ctypes
import platform
import sys
import warnings

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# The same settings as environment variables, which glibc reads as a process
# starts, before any thread has allocated: for programs started afresh (the
# benchmark's worker processes take them with `--malloc reuse`).
REUSE_FREED_MEMORY_ENVIRONMENT = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "8000000000",
}


def reuse_freed_memory():
    """Makes glibc keep memory the process frees and hand it out again, instead of new pages.

    Training on the JAX or PyTorch backend allocates gigabytes afresh at every
    step: XLA:CPU's temporary buffer for each call (2.7 GB for ConvNeXt V2 Tiny
    at batch 16), eager PyTorch each large result. glibc maps such blocks from
    the system as new pages and unmaps them when freed, so every 4 KB page
    faults when it is first written, at every step; with these settings the
    pages are reused and the faults disappear (docs/performance.md has the
    training-step times). TensorFlow keeps its own memory and gains nothing.

    The settings are the process's, as the environment variables of
    `REUSE_FREED_MEMORY_ENVIRONMENT` would make them: every thread allocates
    from one arena, nothing is mapped on its own, and freed memory is not
    returned to the system, so the process keeps its peak memory until it
    exits. Call this at the start of a program, before the first model is
    built: threads that have already allocated (JAX's workers, once JAX has
    run anything) keep arenas of their own, whose large blocks are mapped
    afresh whatever this sets.

    Returns True where the settings were made (Linux with glibc), False
    elsewhere, where nothing changes.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # -1 reaches glibc as the largest size: never trim.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    if not all(mallopt(parameter, value) == 1 for parameter, value in settings):
        return False
    if _jax_has_started():
        warnings.warn(
            "reuse_freed_memory() was called after JAX started running: its worker threads keep "
            "their own arenas, so XLA's temporary buffers still come as new pages. Call it before "
            "the first model is built.",
            stacklevel=2,
        )
    return True


def _jax_has_started():
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))
