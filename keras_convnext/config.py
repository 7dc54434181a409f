"""Library-wide settings: the switch for the backends' fast paths.

Every layer of keras_convnext computes through `keras_convnext.ops`, which
for each operation has one portable definition written with `keras.ops`
and, per backend, faster formulations of the same result. With the fast
paths off, every operation runs its portable definition, and
`ConvNeXtModel` calls run Keras' functional graph as `keras.Model` does
(no compiled eager call, no PyTorch layer chain): the graph any Keras tool
or converter knows. Export traces its artifacts that way.

The switch is read when a function is traced: a model's compiled functions
(`predict`, `fit`, a `jax.jit` or `tf.function` of it) keep the paths they
were traced with. Set it before the first call, or in a `fast_paths(...)`
block around the tracing.

The environment variable `KERAS_CONVNEXT_FAST_PATHS=0` (or `false`, `off`,
`no`) starts a process with the fast paths off.
"""

import contextlib
import os

FAST_PATHS_VARIABLE = "KERAS_CONVNEXT_FAST_PATHS"
_OFF_VALUES = ("0", "false", "off", "no")

_state = {"fast_paths": os.environ.get(FAST_PATHS_VARIABLE, "1").strip().lower() not in _OFF_VALUES}


def fast_paths_enabled():
    """Whether the backends' fast paths are on (the default)."""
    return _state["fast_paths"]


def set_fast_paths(enabled):
    """Turns the backends' fast paths on (`True`, the default) or off (`False`) for the process."""
    _state["fast_paths"] = bool(enabled)


@contextlib.contextmanager
def fast_paths(enabled):
    """`set_fast_paths(enabled)` inside the block; the previous setting afterwards."""
    previous = fast_paths_enabled()
    set_fast_paths(enabled)
    try:
        yield
    finally:
        set_fast_paths(previous)
