"""ConvNeXt throughput on every installed Keras backend against the PyTorch reference.

The benchmark is `keras_convnext.benchmark` (also `keras-convnext benchmark`);
this script runs it from the source repository and keeps its results in
`benchmarks/results/`:

    python benchmarks/run.py --model ConvNeXtV2Tiny --batch-size 8 --resolution 224
    python benchmarks/run.py --preset host-overhead    # keras_convnext.benchmark.host_overhead
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from keras_convnext.benchmark import host_overhead, throughput  # noqa: E402

RESULTS = os.path.join(HERE, "results")

if __name__ == "__main__":
    if host_overhead.requested(sys.argv[1:]):
        sys.exit(host_overhead.main(sys.argv[1:], output_dir=RESULTS))
    sys.exit(throughput.main(output_dir=RESULTS))
