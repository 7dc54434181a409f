import os
import platform
import subprocess
import sys

import keras
import pytest

_SCRIPT = """
import resource, sys, warnings
import numpy as np
import keras_convnext

applied = keras_convnext.reuse_freed_memory() if sys.argv[1] == "reuse" else None
if sys.argv[2] == "started":
    import keras
    keras.ops.convert_to_numpy(keras.ops.ones((2,)) + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = keras_convnext.reuse_freed_memory()
    print("warned", any("before the first model" in str(w.message) for w in caught))

# NumPy asks for huge pages on large arrays (2 MB pages, few faults); XLA and PyTorch do not.
multiarray = getattr(np, "_core", None) or np.core
multiarray.multiarray._set_madvise_hugepage(False)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

block = np.ones(64 * 2**20 // 8)  # 64 MB, above glibc's largest threshold for mapping blocks on their own
del block
before = faults()
block = np.ones(64 * 2**20 // 8)
print("applied", applied, "faults", faults() - before)
"""


# glibc's allocator behaves the same under every Keras backend: checked once, in the PyTorch run
# (the backend whose import is the quickest in each subprocess).
_needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or keras.backend.backend() != "torch",
    reason="glibc's settings, checked in the PyTorch run",
)


def _without_glibc_settings(environment):
    """`environment` without glibc's malloc variables: each test sets its own."""
    return {key: value for key, value in environment.items() if not key.startswith(("MALLOC_", "GLIBC_TUNABLES"))}


def _run(*args, environment=None):
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *args], capture_output=True, text=True, timeout=300,
        env=dict(_without_glibc_settings(os.environ), **(environment or {})), check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _faults(output):
    return int(output.split("faults")[-1].split()[0])


@pytest.mark.slow
@_needs_glibc
def test_reuse_freed_memory_hands_out_freed_pages_again():
    """A 64 MB block freed and allocated again faults every page by default, none after the call."""
    default = _run("default", "fresh")
    reused = _run("reuse", "fresh")
    assert "applied None" in default and "applied True" in reused
    assert _faults(default) > 8000, default  # 16384 pages of 4 KB
    assert _faults(reused) < 500, reused


@pytest.mark.slow
@_needs_glibc
def test_reuse_freed_memory_environment_does_the_same_for_a_new_process():
    """The environment variables that the benchmark's `--malloc reuse` gives its workers."""
    from keras_convnext.process import REUSE_FREED_MEMORY_ENVIRONMENT

    reused = _run("default", "fresh", environment=REUSE_FREED_MEMORY_ENVIRONMENT)
    assert "applied None" in reused and _faults(reused) < 500, reused
    # One setting alone is not enough: the block is still mapped on its own and unmapped when freed.
    arenas_only = _run("default", "fresh", environment={"MALLOC_ARENA_MAX": "1"})
    assert _faults(arenas_only) > 8000, arenas_only


@pytest.mark.skipif(
    keras.backend.backend() != "jax" or platform.libc_ver()[0] != "glibc", reason="JAX's worker threads"
)
def test_reuse_freed_memory_warns_once_jax_has_run():
    assert "warned True" in _run("default", "started")
