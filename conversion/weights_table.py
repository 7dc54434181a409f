"""Print the pretrained weights table, or rewrite the tables in README.md and docs/weights.md.

    python conversion/weights_table.py                # print the full Markdown table
    python conversion/weights_table.py --update-docs .
"""

import sys

from keras_convnext.weights.registry import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
