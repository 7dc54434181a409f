"""ConvNeXt V1 and V2 for Keras 3 (TensorFlow, JAX and PyTorch backends)."""

from keras_convnext import config, layers
from keras_convnext.export import export, export_formats
from keras_convnext.fcmae import FCMAE, FCMAEDecoder, transfer_encoder
from keras_convnext.imagenet import decode_predictions, imagenet_classes, preprocess_input
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
from keras_convnext.models.model import ConvNeXtModel
from keras_convnext.models.variants import VARIANTS
from keras_convnext.process import reuse_freed_memory
from keras_convnext.weights import (
    CheckpointError,
    convert_state_dict,
    load_state_dict,
    load_weights,
    read_checkpoint,
)

__version__ = "0.1.0"
