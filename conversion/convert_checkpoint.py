"""Convert one ConvNeXt checkpoint (a file or a registry tag) to .weights.h5 and .keras.

    python conversion/convert_checkpoint.py convnextv2_tiny_1k_224_ema.pt --verify
    python conversion/convert_checkpoint.py imagenet --variant ConvNeXtV2Tiny --output-dir out

Same options as `python -m keras_convnext.convert --help`.
"""

import sys

from keras_convnext.convert import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
