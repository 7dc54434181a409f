"""Optional dependencies: import them by name, or say in one line how to install them."""

import importlib

# module -> (what pip installs, the keras-convnext extra that declares it)
OPTIONAL = {
    "PIL": ("Pillow", "images"),
    "matplotlib": ("matplotlib", "plots"),
    "sklearn": ("scikit-learn", "data"),
    "skimage": ("scikit-image", "data"),
    "tensorflow_datasets": ("tensorflow-datasets", "tfds"),
    "tensorflow": ("tensorflow", "tensorflow"),
    "tf2onnx": ("tf2onnx", "export"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "ai_edge_litert": ("ai-edge-litert", "export"),
    "transformers": ("transformers", "benchmark"),
    "pycocotools": ("pycocotools", "detection"),
    "torch": ("torch", "torch"),
    "jax": ("jax", "jax"),
}

# PyPI's default torch wheel on Linux is the multi-GB CUDA build.
TORCH_CPU_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


class MissingDependencyError(ImportError):
    """An optional package that a feature needs is not installed; the message says how to install it."""


def install_command(module):
    """The shell command that installs what provides `module`."""
    if module == "torch":
        return TORCH_CPU_INSTALL
    package, extra = OPTIONAL.get(module, (module, None))
    return f"pip install 'keras-convnext[{extra}]'" if extra else f"pip install {package}"


def require(module, purpose):
    """Imports and returns `module`, or raises `MissingDependencyError` naming its install command.

    Args:
        module: the import name, e.g. `"PIL"` or `"tensorflow"`.
        purpose: what needs it, completing "... needs <package>", e.g. `"reading images"`.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.split(".")[0]
        if error.name not in (module, top):
            raise
        top = module.split(".")[0]
        package = OPTIONAL.get(top, (top, None))[0]
        raise MissingDependencyError(
            f"{purpose} needs {package}, which is not installed; install it with: {install_command(top)}"
        ) from None
