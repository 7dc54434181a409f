"""Compare a converted Keras model with the PyTorch reference on the same inputs.

The reference is HF transformers' ConvNeXt / ConvNeXt V2 (or timm, when it
is installed and asked for), loaded straight from the checkpoint through its
own key renaming below: a mistake in keras_convnext's naming tables cannot
hide in it.
"""

import re

import numpy as np

import keras

from keras_convnext.layers.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from keras_convnext.models.variants import VARIANTS

# scikit-image's bundled sample photos (no download needed).
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")

# Checkpoint key -> HF transformers key, for the official and timm namings.
# `{prefix}` is "convnext" or "convnextv2".
_TO_HF = [
    (r"downsample_layers\.0\.0\.", "{prefix}.embeddings.patch_embeddings."),
    (r"downsample_layers\.0\.1\.", "{prefix}.embeddings.layernorm."),
    (r"downsample_layers\.(\d)\.(\d)\.", r"{prefix}.encoder.stages.\1.downsampling_layer.\2."),
    (r"stages\.(\d)\.(\d+)\.gamma$", r"{prefix}.encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"stages\.(\d)\.(\d+)\.norm\.", r"{prefix}.encoder.stages.\1.layers.\2.layernorm."),
    (r"stages\.(\d)\.(\d+)\.grn\.gamma$", r"{prefix}.encoder.stages.\1.layers.\2.grn.weight"),
    (r"stages\.(\d)\.(\d+)\.grn\.beta$", r"{prefix}.encoder.stages.\1.layers.\2.grn.bias"),
    (r"stages\.(\d)\.(\d+)\.(dwconv|pwconv1|pwconv2)\.", r"{prefix}.encoder.stages.\1.layers.\2.\3."),
    # timm (its head keys go before the official `head.`, which would also match them)
    (r"head\.norm\.", "{prefix}.layernorm."),
    (r"head\.fc\.", "classifier."),
    (r"stem\.0\.", "{prefix}.embeddings.patch_embeddings."),
    (r"stem\.1\.", "{prefix}.embeddings.layernorm."),
    (r"stages\.(\d)\.downsample\.(\d)\.", r"{prefix}.encoder.stages.\1.downsampling_layer.\2."),
    (r"stages\.(\d)\.blocks\.(\d+)\.gamma$", r"{prefix}.encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"stages\.(\d)\.blocks\.(\d+)\.conv_dw\.", r"{prefix}.encoder.stages.\1.layers.\2.dwconv."),
    (r"stages\.(\d)\.blocks\.(\d+)\.norm\.", r"{prefix}.encoder.stages.\1.layers.\2.layernorm."),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.", r"{prefix}.encoder.stages.\1.layers.\2.pwconv1."),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.grn\.", r"{prefix}.encoder.stages.\1.layers.\2.grn."),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.", r"{prefix}.encoder.stages.\1.layers.\2.pwconv2."),
    (r"norm\.", "{prefix}.layernorm."),
    (r"head\.", "classifier."),
]


class ReferenceUnavailable(RuntimeError):
    """No PyTorch reference can run this checkpoint here."""


def to_hf_names(state_dict, prefix):
    """Renames official or timm keys to HF transformers keys (HF keys stay)."""
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith(("convnext.", "convnextv2.", "classifier.")):
            renamed[key] = value
            continue
        for pattern, replacement in _TO_HF:
            new_key, count = re.subn("^" + pattern, replacement.replace("{prefix}", prefix), key)
            if count:
                renamed[new_key] = value
                break
        else:
            raise ReferenceUnavailable(f"The PyTorch reference has no place for checkpoint key {key!r}.")
    # timm keeps GRN as (C,), HF as (1, 1, 1, C).
    return {
        key: (np.reshape(value, (1, 1, 1, -1)) if ".grn." in key else value) for key, value in renamed.items()
    }


def hf_reference(variant_name, state_dict, classes):
    """An HF transformers model holding `state_dict` (strict: every key used, none missing)."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise ReferenceUnavailable(
            "Verification needs PyTorch and HF transformers: pip install torch transformers"
        ) from error
    if variant_name not in VARIANTS:
        raise ReferenceUnavailable(f"HF transformers has no model of {variant_name}'s structure to verify against.")
    variant = VARIANTS[variant_name]
    common = dict(
        depths=list(variant.stage_depths), hidden_sizes=list(variant.stage_dims),
        layer_norm_eps=1e-6, num_labels=classes or 1,  # official LayerNorms use eps 1e-6
    )
    if variant.version == "v2":
        config, prefix = transformers.ConvNextV2Config(**common), "convnextv2"
        model_class = transformers.ConvNextV2ForImageClassification
    else:
        config, prefix = transformers.ConvNextConfig(**common), "convnext"
        model_class = transformers.ConvNextForImageClassification
    model = model_class(config).eval()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_hf_names(state_dict, prefix).items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if classes is None:  # a backbone checkpoint: the head stays unused
        missing = [k for k in missing if not k.startswith(("classifier.", f"{prefix}.layernorm."))]
    if missing or unexpected:
        raise ReferenceUnavailable(
            f"The checkpoint does not fit the HF reference: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )

    def run(pixels):
        with torch.no_grad():
            normalized = (pixels - np.array(IMAGENET_MEAN, "float32")) / np.array(IMAGENET_STD, "float32")
            inputs = torch.from_numpy(np.ascontiguousarray(normalized.transpose(0, 3, 1, 2), "float32"))
            if classes is None:
                hidden = getattr(model, prefix)(pixel_values=inputs).last_hidden_state
                return hidden.numpy().transpose(0, 2, 3, 1)
            return model(pixel_values=inputs).logits.numpy()

    return run


def sample_photos(size):
    """The scikit-image sample photos, resized to `(n, size, size, 3)` float32 pixels in [0, 255]."""
    import skimage.data
    import skimage.transform

    photos = []
    for name in SAMPLE_PHOTOS:
        image = getattr(skimage.data, name)()[..., :3].astype("float32")
        resized = skimage.transform.resize(image, (size, size), preserve_range=True, anti_aliasing=True)
        photos.append(resized)
    return np.stack(photos).astype("float32")


def random_pixels(count, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=(count, size, size, 3)).astype("float32")


def compare(keras_model, reference, size, batches=None):
    """Runs both models on photos and random pixels; returns a result per input set.

    `keras_model` takes pixels in [0, 255] (include_preprocessing=True) and
    returns logits (or features for a backbone). Each result holds
    `max_diff` (max |Keras - reference| over all outputs) and, for
    classifiers, `top1_agree` / `count`.
    """
    batches = batches or {"photos": sample_photos(size), "random": random_pixels(2, size)}
    # One forward pass over all inputs (one compilation), split per set afterwards.
    pixels = np.concatenate(list(batches.values()))
    ours = keras.ops.convert_to_numpy(keras_model(pixels, training=False))
    theirs = reference(pixels)
    if ours.shape != theirs.shape:
        raise ValueError(f"Output shapes differ: Keras {ours.shape}, reference {theirs.shape}.")
    results, start = {}, 0
    for label, batch in batches.items():
        mine, ref = ours[start:start + len(batch)], theirs[start:start + len(batch)]
        start += len(batch)
        result = {"max_diff": float(np.abs(mine - ref).max()), "count": len(batch)}
        if mine.ndim == 2:
            result["top1_agree"] = int((mine.argmax(-1) == ref.argmax(-1)).sum())
        results[label] = result
    return results
