"""The throughput benchmark of `keras-convnext benchmark`: every backend against the PyTorch reference.

`keras_convnext.benchmark.run(["--model", "ConvNeXtV2Atto", ...])` runs it
with the command's flags; `keras_convnext.benchmark.throughput` holds the
measurements and the report's tables; `keras_convnext.benchmark.presets` the
GPU presets over them (`python -m keras_convnext.benchmark.presets --preset gpu-train`).
"""

from keras_convnext.benchmark.throughput import build_parser, markdown, median_results
from keras_convnext.benchmark.throughput import main as run

__all__ = ["run", "build_parser", "markdown", "median_results"]
