"""What `keras-convnext` runs, as functions: training, fine-tuning, evaluation, FCMAE pre-training.

    from keras_convnext import workflows

    result = workflows.train(data="digits", epochs=3, output_dir="run")
    workflows.evaluate("run/model.keras", data="digits", history="run/history.json")
    workflows.finetune(data="tf_flowers", weights="convnextv2_atto_1k_224_ema.pt")
    workflows.pretrain_fcmae(data="digits", epochs=10, output_dir="fcmae")
    workflows.finetune_detector(data="digit_canvases", epochs=5)    # RetinaNet, COCO mAP
    workflows.finetune_segmenter(data="digit_canvases", epochs=5)   # DeepLabV3, mIoU

Each writes its files into `output_dir` (a temporary file, then a rename)
and returns a dict of what it measured. Data is `"digits"` (scikit-learn's,
offline), a tensorflow-datasets name, or a folder of images with one
sub-directory per class (`keras_convnext.data`). The benchmark lives in
`keras_convnext.benchmark`.
"""

from keras_convnext.workflows.classification import finetune, train
from keras_convnext.workflows.detection import finetune_detector
from keras_convnext.workflows.evaluation import evaluate, evaluate_classifier
from keras_convnext.workflows.pretraining import pretrain_fcmae
from keras_convnext.workflows.segmentation import finetune_segmenter

__all__ = ["train", "finetune", "evaluate", "evaluate_classifier", "pretrain_fcmae", "finetune_detector",
           "finetune_segmenter"]
