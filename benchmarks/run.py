"""ConvNeXt throughput on every installed Keras backend against the PyTorch reference.

The benchmark is `keras_convnext.benchmark` (also `keras-convnext benchmark`);
this script runs it from the source repository and keeps its results in
`benchmarks/results/`:

    python benchmarks/run.py --model ConvNeXtV2Tiny --batch-size 8 --resolution 224
    python benchmarks/run.py --preset gpu-inference      # or gpu-train: keras_convnext.benchmark.presets
    python benchmarks/run.py --preset host-overhead      # keras_convnext.benchmark.host_overhead
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from keras_convnext.benchmark import host_overhead, presets, throughput  # noqa: E402

RESULTS = os.path.join(HERE, "results")


def main(argv):
    if host_overhead.requested(argv):
        return host_overhead.main(argv, output_dir=RESULTS)
    if "--preset" in argv:
        return presets.main(argv, output_dir=RESULTS)
    return throughput.main(argv, output_dir=RESULTS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
