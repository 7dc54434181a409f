"""Chooses the Keras backend of the `keras-convnext` command before Keras is imported.

Keras reads its backend once, when it is first imported, and importing
keras_convnext imports Keras. So when this process is the command line
(the `keras-convnext` console script or `python -m keras_convnext.cli`),
the package calls `choose_command_line_backend()` first: `--backend`,
before or after the command, wins over `KERAS_BACKEND`; with neither, Keras'
configured backend is kept if installed, else the first installed one is
used. A request for help (or a command line without a known command) is
answered right here, before Keras is imported, so `keras-convnext --help`
is quick and works in any install.
A library import (any other program) is left to Keras' own rules.
"""

import importlib.util
import json
import os
import sys

BACKENDS = ("tensorflow", "jax", "torch")
BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
BACKEND_INSTALL = {
    "tensorflow": "pip install 'keras-convnext[tensorflow]'",
    "jax": "pip install 'keras-convnext[jax]'",
    "torch": "pip install torch --index-url https://download.pytorch.org/whl/cpu",
}
CONSOLE_SCRIPT = "keras-convnext"
CLI_MODULE = "keras_convnext.cli"


def command_line_arguments():
    """The command's arguments when this process is the command line, else None."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    if name in (CONSOLE_SCRIPT, CONSOLE_SCRIPT + ".exe", CONSOLE_SCRIPT + "-script.py"):
        return sys.argv[1:]
    # Under `python -m`, sys.argv[0] is still "-m" while the package is imported.
    original = list(getattr(sys, "orig_argv", []))
    for index, argument in enumerate(original[:-1]):
        if argument == "-m" and original[index + 1] == CLI_MODULE:
            return original[index + 2 :]
    return None


def backend_argument(arguments):
    """The value of the last `--backend X` or `--backend=X` in `arguments` (None if absent)."""
    backend = None
    for index, argument in enumerate(arguments):
        if argument == "--":
            break
        if argument == "--backend" and index + 1 < len(arguments):
            backend = arguments[index + 1]
        elif argument.startswith("--backend="):
            backend = argument.split("=", 1)[1]
    return backend


def answerable_without_keras(arguments, commands):
    """True for a request for help (`-h`/`--help` before any `--`), no command, or an unknown command."""
    rest = list(arguments)
    while rest and rest[0].startswith("--backend"):
        rest = rest[1:] if "=" in rest[0] else rest[2:]
    if not rest or rest[0] not in commands:
        return True
    for argument in rest:
        if argument == "--":
            return False
        if argument in ("-h", "--help"):
            return True
    return False


def installed(backend):
    return importlib.util.find_spec(BACKEND_MODULES[backend]) is not None


def configured_backend():
    """The backend Keras would start on: KERAS_BACKEND, else keras.json's, else TensorFlow."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as file:
            return json.load(file).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def _fail(message, status):
    print(f"{CONSOLE_SCRIPT}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def choose_command_line_backend():
    """Sets KERAS_BACKEND for the command line; does nothing in any other program.

    Exits with status 2 for a `--backend` that is not a backend, and 1 when
    the chosen backend (or any backend at all) is not installed. Answers a
    request for help and exits.
    """
    arguments = command_line_arguments()
    if arguments is None or "keras" in sys.modules:
        return
    requested = backend_argument(arguments)
    if requested is not None and requested not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}; got {requested!r}.", 2)
    backend = requested or configured_backend()
    if backend in BACKENDS and installed(backend):
        os.environ["KERAS_BACKEND"] = backend
    from keras_convnext import command_line  # imports nothing of Keras

    if answerable_without_keras(arguments, command_line.COMMANDS):
        raise SystemExit(command_line.main(arguments))
    if backend in BACKENDS and installed(backend):
        return
    if requested or os.environ.get("KERAS_BACKEND"):
        _fail(f"the {backend} backend is not installed; install it with: {BACKEND_INSTALL.get(backend, backend)}", 1)
    available = [name for name in BACKENDS if installed(name)]
    if not available:
        _fail("no Keras backend is installed; install one, e.g. " + BACKEND_INSTALL["jax"], 1)
    os.environ["KERAS_BACKEND"] = available[0]
