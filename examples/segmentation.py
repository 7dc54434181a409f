"""Fine-tune a DeepLabV3 on a ConvNeXt encoder and score it by mIoU, on any Keras backend.

    python examples/segmentation.py --backend jax --epochs 5       # offline: digits on canvases
    python examples/segmentation.py --data oxford_iiit_pet --image-size 224 --model ConvNeXtV2Femto \\
        --weights imagenet

Runs `keras_convnext.workflows.finetune_segmenter`: keras-hub's DeepLabV3
over the ConvNeXt feature pyramid, AdamW with warm-up and cosine decay,
then the mean IoU on held-out images (`keras.metrics.MeanIoU`), next to the
chance level of calling every pixel background. Writes `model.keras`,
`metrics.json` and `predictions.png` into `--output-dir`. Needs
`pip install "keras-convnext[hub,train]"`.
"""

import os
import sys

if __name__ == "__main__" and "--backend" in sys.argv[:-1]:  # Keras reads its backend once, when imported
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]

from keras_convnext.workflows import segmentation, tasks  # noqa: E402


def main(argv=None):
    """Returns the workflow's dict: `model`, `history`, `evaluation`, `plot`."""
    parser = tasks.task_parser("segmentation.py", __doc__.splitlines()[0], segmentation.DATA_CHOICES,
                               "segmentation_run")
    result = segmentation.finetune_segmenter(**tasks.options(parser.parse_args(argv)))
    scores = result["evaluation"]
    print(f"held-out mIoU {scores['miou']:.3f} (every pixel background: {scores['chance_miou']:.3f}); "
          f"plot: {result['plot']}")
    return result


if __name__ == "__main__":
    main()
