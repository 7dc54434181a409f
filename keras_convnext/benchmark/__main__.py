"""`python -m keras_convnext.benchmark ...`: the same as `keras-convnext benchmark ...`."""

import sys

from keras_convnext.benchmark.throughput import main

sys.exit(main())
