"""Entry point of the `keras-convnext` console script and of `python -m keras_convnext.cli`.

The commands live in `keras_convnext.command_line`, which the package also
uses to answer `--help` before Keras is imported (`keras_convnext._startup`).
"""

import sys

from keras_convnext.command_line import COMMANDS, main

__all__ = ["COMMANDS", "main"]

if __name__ == "__main__":
    sys.exit(main())
