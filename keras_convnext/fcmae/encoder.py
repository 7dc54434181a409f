"""The ConvNeXt encoder (V2, or V1) run with sparse-convolution semantics on masked images.

FCMAE (Woo et al. 2023) treats the visible patches as a sparse point set
and runs the encoder with submanifold sparse convolutions: a masked position
never influences a visible one. Two equivalent implementations:

- `dense_masked_forward`, the reference: dense tensors with masked positions
  kept at zero; the result is re-masked after every operation that could
  make them nonzero (depthwise conv, LayerNorm, the downsampling conv), with
  the blocks' own `spatial_part` and `pointwise_part` given the mask.
- `fast_forward`: the pointwise part of each block (LayerNorm, both Linear
  layers, GELU, GRN), about 90% of its FLOPs, runs only on the gathered
  visible positions (a static count per image); tokens are scattered back
  to a dense map only for the depthwise conv and the downsampling conv.

Both run each block through its own `spatial_part` and `pointwise_part`, so a
V1 encoder (layer scale, no GRN: the ConvNeXt V2 paper's V1 + FCMAE model of
its feature-collapse study) and a V2 encoder (GRN, no layer scale) compute
exactly what their blocks define.

GRN statistics: the spatial L2 norm of each channel is taken per image over
its visible positions, the definition in the paper. The official
MinkowskiEngine code pools it over every visible position of the whole
batch; the two agree for a batch of one, and per-image statistics keep an
image's features independent of its batch mates.
"""

from typing import NamedTuple

from keras import ops

from keras_convnext.fcmae.masking import VisiblePositions, upsample_mask, visible_count

ENCODER_STRIDE = 32
STAGE_STRIDES = (4, 8, 16, 32)


class EncoderLayers(NamedTuple):
    """The layers of a built ConvNeXt V1 or V2 backbone, found by their template names."""

    preprocessing: object  # ImageNormalization or None
    channels_first: bool
    stem_conv: object
    stem_norm: object
    downsample_norms: tuple  # stages 1-3
    downsample_convs: tuple
    stages: tuple  # four tuples of ConvNeXtBlock


def find_encoder_layers(encoder):
    """Checks that `encoder` is a hierarchical ConvNeXt V1 or V2 backbone and returns its layers."""
    by_name = {layer.name: layer for layer in encoder.layers}
    if "stem_conv" not in by_name:
        raise ValueError(
            f"The FCMAE encoder must be a ConvNeXt V1 or V2 model built by keras_convnext "
            f"(for example keras_convnext.ConvNeXtV2Atto(include_top=False)); "
            f"'{encoder.name}' has no layer named stem_conv."
        )
    if "predictions" in by_name or "avg_pool" in by_name or "max_pool" in by_name:
        raise ValueError(
            f"The FCMAE encoder must be a backbone without head or pooling; build "
            f"'{encoder.name}' with include_top=False and pooling=None."
        )
    downsampling = ["stem_norm"] + [f"downsample{i}_{part}" for i in (1, 2, 3) for part in ("norm", "conv")]
    if any(name not in by_name for name in downsampling):
        raise ValueError(
            f"FCMAE masks 32-pixel patches of a hierarchical ConvNeXt (four stages, total stride 32); "
            f"'{encoder.name}' has no stem norm or downsampling layers (an isotropic ConvNeXt?). Use a "
            "ConvNeXt or ConvNeXt V2 model such as keras_convnext.ConvNeXtV2Atto(include_top=False)."
        )
    stages = []
    for stage in range(4):
        blocks = [by_name[f"stage{stage}_block{j}"] for j in range(len(by_name)) if f"stage{stage}_block{j}" in by_name]
        stages.append(tuple(blocks))
    return EncoderLayers(
        preprocessing=by_name.get("preprocessing"),
        channels_first="to_channels_last" in by_name,
        stem_conv=by_name["stem_conv"],
        stem_norm=by_name["stem_norm"],
        downsample_norms=tuple(by_name[f"downsample{i}_norm"] for i in (1, 2, 3)),
        downsample_convs=tuple(by_name[f"downsample{i}_conv"] for i in (1, 2, 3)),
        stages=tuple(stages),
    )


def prepare_images(layers, images):
    """Encoder input as the model sees it: normalized, channels_last, compute dtype."""
    x = images
    if layers.preprocessing is not None:
        x = layers.preprocessing(x)
    if layers.channels_first:
        x = ops.transpose(x, (0, 2, 3, 1))
    return ops.cast(x, layers.stem_conv.compute_dtype)


def cell_masks(patch_mask, patch_size):
    """Masks at the four stage resolutions, `(batch, h_s, w_s)`, 1 = masked."""
    return [upsample_mask(patch_mask, patch_size // stride) for stride in STAGE_STRIDES]


def _visible(mask, dtype):
    return ops.expand_dims(ops.cast(1.0 - mask, dtype), -1)


def dense_masked_forward(layers, x, patch_mask, patch_size, training=None):
    """Reference sparse-semantics encoder on dense tensors.

    Args:
        layers: `EncoderLayers` of the backbone.
        x: normalized channels_last images `(batch, H, W, 3)` (see `prepare_images`).
        patch_mask: `(batch, H / patch_size, W / patch_size)`, 1 = masked.
        patch_size: pixels per patch side.

    Returns:
        `(batch, H / 32, W / 32, dims[-1])`, zero at masked positions.
    """
    masks = cell_masks(patch_mask, patch_size)
    x = layers.stem_norm(layers.stem_conv(x))
    for stage, blocks in enumerate(layers.stages):
        if stage > 0:
            # LayerNorm maps a zero vector to its bias: zero the masked cells again
            # so the strided conv only sees visible inputs.
            x = layers.downsample_norms[stage - 1](x) * _visible(masks[stage - 1], x.dtype)
            x = layers.downsample_convs[stage - 1](x)
        visible = _visible(masks[stage], x.dtype)
        x = x * visible
        for block in blocks:
            branch = block.spatial_part(x, visible)
            x = x + block.pointwise_part(branch, training, visible)
    return x


def fast_forward(layers, x, patch_mask, patch_size, mask_ratio, training=None):
    """Same result as `dense_masked_forward`; pointwise layers see visible tokens only."""
    masks = cell_masks(patch_mask, patch_size)
    num_patches = patch_mask.shape[1] * patch_mask.shape[2]
    kept = visible_count(num_patches, mask_ratio)
    positions = [
        VisiblePositions(mask, kept * (patch_size // stride) ** 2)
        for mask, stride in zip(masks, STAGE_STRIDES)
    ]
    x = layers.stem_conv(x)
    tokens = layers.stem_norm(positions[0].gather(x))
    for stage, blocks in enumerate(layers.stages):
        if stage > 0:
            tokens = layers.downsample_norms[stage - 1](tokens)
            x = layers.downsample_convs[stage - 1](positions[stage - 1].scatter(tokens))
            tokens = positions[stage].gather(x)
        for block in blocks:
            branch = positions[stage].gather(block.spatial_part(positions[stage].scatter(tokens)))
            # As a (batch, tokens, 1, channels) map, GRN's spatial sums cover the visible tokens.
            branch = block.pointwise_part(ops.expand_dims(branch, 2), training)
            tokens = tokens + ops.squeeze(branch, 2)
    return positions[3].scatter(tokens)
