"""Patch layout of images and the FCMAE reconstruction loss."""

from keras import ops

NORM_PIX_EPSILON = 1e-6


def patchify(images, patch_size):
    """`(batch, H, W, C)` -> `(batch, H/p, W/p, p*p*C)`, pixels in (row, column, channel) order.

    The order matches the official FCMAE `patchify` (`nchpwq -> nhwpqc`), so
    the prediction layer of an official checkpoint lines up with the pixels.
    """
    _, height, width, channels = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    x = ops.reshape(images, (-1, grid_h, patch_size, grid_w, patch_size, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, grid_h, grid_w, patch_size * patch_size * channels))


def unpatchify(patches, patch_size, channels=3):
    """Inverse of `patchify`: `(batch, gh, gw, p*p*C)` -> `(batch, gh*p, gw*p, C)`."""
    _, grid_h, grid_w, _ = patches.shape
    x = ops.reshape(patches, (-1, grid_h, grid_w, patch_size, patch_size, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, grid_h * patch_size, grid_w * patch_size, channels))


def patch_targets(images, patch_size, norm_pix_loss=False):
    """Per-patch targets in float32; with `norm_pix_loss`, each patch standardized by itself.

    The variance is the unbiased one (divided by n - 1), as torch's `var` in
    the official code.
    """
    target = patchify(ops.cast(images, "float32"), patch_size)
    if norm_pix_loss:
        count = target.shape[-1]
        mean = ops.mean(target, axis=-1, keepdims=True)
        variance = ops.sum(ops.square(target - mean), axis=-1, keepdims=True) / (count - 1)
        target = (target - mean) / ops.sqrt(variance + NORM_PIX_EPSILON)
    return target


def masked_patch_loss(pred, target, patch_mask):
    """Mean squared error per patch, averaged over each image's masked patches.

    Args:
        pred, target: `(batch, gh, gw, p*p*C)`.
        patch_mask: `(batch, gh, gw)`, 1 = masked.

    Returns:
        float32 `(batch,)`. Every image masks the same number of patches, so
        the batch mean equals the official loss (sum over all masked patches
        of the batch divided by their count).
    """
    per_patch = _patch_errors(pred, target)
    mask = ops.cast(patch_mask, "float32")
    masked_sum = ops.sum(per_patch * mask, axis=(1, 2))
    return masked_sum / ops.maximum(ops.sum(mask, axis=(1, 2)), 1.0)


def gathered_patch_loss(pred, target):
    """`masked_patch_loss` for patches already gathered: the mean over all of them.

    Args:
        pred, target: `(batch, patches, p*p*C)`, the masked patches of each image.

    Returns:
        float32 `(batch,)`.
    """
    return ops.mean(_patch_errors(pred, target), axis=-1)


def _patch_errors(pred, target):
    return ops.mean(ops.square(ops.cast(pred, "float32") - target), axis=-1)
