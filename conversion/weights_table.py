"""Print the pretrained weights table, or rewrite it in the README.

    python conversion/weights_table.py                # print the Markdown table
    python conversion/weights_table.py --update-readme README.md
"""

import sys

from keras_convnext.weights.registry import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
