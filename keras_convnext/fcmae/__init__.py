"""FCMAE: ConvNeXt V2 masked-autoencoder pre-training."""

from keras_convnext.fcmae.decoder import FCMAEDecoder
from keras_convnext.fcmae.loss import masked_patch_loss, patch_targets, patchify, unpatchify
from keras_convnext.fcmae.masking import random_patch_mask, visible_count
from keras_convnext.fcmae.model import FCMAE, transfer_encoder

__all__ = [
    "FCMAE",
    "FCMAEDecoder",
    "masked_patch_loss",
    "patch_targets",
    "patchify",
    "random_patch_mask",
    "transfer_encoder",
    "unpatchify",
    "visible_count",
]
