"""Library-wide settings: the switches for the backends' fast paths and for compiled eager calls.

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

Compiled eager calls: on JAX and TensorFlow, calling a model on concrete
arrays (`model(images)`) compiles its inference once per input shape and
reuses the program, as `predict` does: much faster per call than running
one operation at a time, but compiling costs seconds per model and shape,
which a program that calls many models once each (a notebook comparing
variants) pays every time (docs/workflows.md has the figures):
`set_compiled_calls(False)`, or `KERAS_CONVNEXT_COMPILED_CALLS=0`, runs
such calls one operation at a time, as `keras.Model` does. The results are
the same. The switch is read at each call.
"""

import contextlib
import os

FAST_PATHS_VARIABLE = "KERAS_CONVNEXT_FAST_PATHS"
_OFF_VALUES = ("0", "false", "off", "no")

COMPILED_CALLS_VARIABLE = "KERAS_CONVNEXT_COMPILED_CALLS"


def _environment_switch(variable):
    return os.environ.get(variable, "1").strip().lower() not in _OFF_VALUES


_state = {
    "fast_paths": _environment_switch(FAST_PATHS_VARIABLE),
    "compiled_calls": _environment_switch(COMPILED_CALLS_VARIABLE),
}


def fast_paths_enabled():
    """Whether the backends' fast paths are on (the default)."""
    return _state["fast_paths"]


def set_fast_paths(enabled):
    """Turns the backends' fast paths on (`True`, the default) or off (`False`) for the process."""
    _state["fast_paths"] = bool(enabled)


def fast_paths(enabled):
    """`set_fast_paths(enabled)` inside a `with` block; the previous setting afterwards."""
    return _switched("fast_paths", enabled)


def compiled_calls_enabled():
    """Whether eager model calls on JAX and TensorFlow run a compiled program (the default)."""
    return _state["compiled_calls"]


def set_compiled_calls(enabled):
    """Compiles eager model calls on JAX and TensorFlow (`True`, the default) or runs them one
    operation at a time (`False`), for the process."""
    _state["compiled_calls"] = bool(enabled)


def compiled_calls(enabled):
    """`set_compiled_calls(enabled)` inside a `with` block; the previous setting afterwards."""
    return _switched("compiled_calls", enabled)


@contextlib.contextmanager
def _switched(switch, enabled):
    previous = _state[switch]
    _state[switch] = bool(enabled)
    try:
        yield
    finally:
        _state[switch] = previous
