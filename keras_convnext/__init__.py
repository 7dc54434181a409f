"""ConvNeXt V1 and V2 for Keras 3 (TensorFlow, JAX and PyTorch backends)."""

# Before Keras is imported: the `keras-convnext` command picks its backend here.
from keras_convnext import _startup

_startup.choose_command_line_backend()

from keras_convnext import analysis, config, layers, roadmap
from keras_convnext.distribution import model_parallel_layout_map
from keras_convnext.export import export, export_formats
from keras_convnext.fcmae import FCMAE, FCMAEDecoder, transfer_encoder
from keras_convnext.imagenet import decode_predictions, imagenet_classes, normalize_imagenet, preprocess_input
from keras_convnext.models.convnext import (
    CONSTRUCTORS,
    ConvNeXt,
    ConvNeXtAtto,
    ConvNeXtBase,
    ConvNeXtFemto,
    ConvNeXtLarge,
    ConvNeXtNano,
    ConvNeXtPico,
    ConvNeXtSmall,
    ConvNeXtTiny,
    ConvNeXtV2Atto,
    ConvNeXtV2Base,
    ConvNeXtV2Femto,
    ConvNeXtV2Huge,
    ConvNeXtV2Large,
    ConvNeXtV2Nano,
    ConvNeXtV2Pico,
    ConvNeXtV2Tiny,
    ConvNeXtXLarge,
    stage_features,
)
from keras_convnext.models.isotropic import (
    ConvNeXtIsotropic,
    ConvNeXtIsotropicBase,
    ConvNeXtIsotropicLarge,
    ConvNeXtIsotropicSmall,
)
from keras_convnext.models.model import ConvNeXtModel
from keras_convnext.models.variants import VARIANTS
from keras_convnext.process import reuse_freed_memory
from keras_convnext import workflows  # noqa: E402  (train, finetune, evaluate, pretrain_fcmae)
from keras_convnext.weights import (
    CheckpointError,
    convert_state_dict,
    list_weights,
    load_state_dict,
    load_weights,
    read_checkpoint,
)

__version__ = "0.1.0"
