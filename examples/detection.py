"""Fine-tune a RetinaNet on a ConvNeXt encoder and score it by COCO mAP, on any Keras backend.

    python examples/detection.py --backend jax --epochs 5          # offline: digits on canvases
    python examples/detection.py --data voc --image-size 384 --weights imagenet

Runs `keras_convnext.workflows.finetune_detector`: keras-hub's RetinaNet
over the ConvNeXt feature pyramid, AdamW with warm-up and cosine decay,
then mAP@[.5:.95] and mAP@.5 on held-out images by pycocotools, next to the
chance level of random boxes. Writes `model.keras`, `metrics.json` and
`predictions.png` into `--output-dir`. Needs
`pip install "keras-convnext[detection,train]"`.
"""

import os
import sys

if __name__ == "__main__" and "--backend" in sys.argv[:-1]:  # Keras reads its backend once, when imported
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]

from keras_convnext.workflows import detection, tasks  # noqa: E402


def main(argv=None):
    """Returns the workflow's dict: `model`, `history`, `evaluation`, `plot`."""
    parser = tasks.task_parser("detection.py", __doc__.splitlines()[0], detection.DATA_CHOICES, "detection_run")
    parser.add_argument("--anchor-size", type=float, default=None,
                        help="anchors at pyramid level l are 2**l * this many pixels (default: from the data).")
    parser.add_argument("--head-conv-layers", type=int, default=2,
                        help="3x3 convolutions in each RetinaNet head (default 2; the paper's 4).")
    result = detection.finetune_detector(**tasks.options(parser.parse_args(argv)))
    scores = result["evaluation"]
    print(f"held-out mAP@[.5:.95] {scores['map']:.3f}, mAP@.5 {scores['map50']:.3f} "
          f"(random boxes: {scores['chance_map']:.4f}, {scores['chance_map50']:.4f}); plot: {result['plot']}")
    return result


if __name__ == "__main__":
    main()
