"""Convert every official checkpoint in the registry; unreachable ones are skipped.

    python conversion/convert_all.py --output-dir converted [--verify]

Prints a summary table at the end; the exit status is 1 when a conversion or
verification failed.
"""

import sys

from keras_convnext.convert import main

if __name__ == "__main__":
    sys.exit(main(["--all", *sys.argv[1:]]))
