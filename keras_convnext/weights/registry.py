"""Every official ConvNeXt V1/V2 checkpoint, by constructor and tag, as data.

`ConvNeXtV2Tiny(weights="imagenet")` looks up `("ConvNeXtV2Tiny", "imagenet")`
here, downloads the official file once, converts it once into the cache
(keras_convnext.weights.cache) and loads that. `keras_convnext.list_weights()`
lists the entries.

Tags (the same meaning for every size that has them):

- `imagenet`: trained on ImageNet-1k at 224 (V2: FCMAE pre-training, then
  ImageNet-1k fine-tuning; also the isotropic V1 models); `imagenet-384`: V1 ImageNet-1k at 384.
- `imagenet22k`: V1 trained on ImageNet-22k only (21841 classes).
- `imagenet22k-ft-1k`, `imagenet22k-ft-1k-384`, `imagenet22k-ft-1k-512`:
  ImageNet-22k (pre-)training, then ImageNet-1k fine-tuning at that size.
- `fcmae`: V2 FCMAE self-supervised pre-training on ImageNet-1k; the
  encoder (no classifier), for `include_top=False` or fine-tuning, and the
  FCMAE decoder, which `keras_convnext.FCMAE(weights="fcmae")` loads too.

Licenses, as the official repositories state them: the ConvNeXt (V1)
weights are MIT; the ConvNeXt V2 weights, FCMAE pre-trained and fine-tuned,
are CC-BY-NC 4.0 (non-commercial use).

Run `python -m keras_convnext.weights.registry --update-docs .` to regenerate the README's
and docs/weights.md's tables.
"""

import argparse
import os
import re
import sys
from typing import NamedTuple, Optional

from keras_convnext.models.isotropic import ISOTROPIC_VARIANTS
from keras_convnext.models.variants import VARIANTS
from keras_convnext.weights import cache
from keras_convnext.weights.files import CheckpointError
from keras_convnext.weights.loader import assign_all, model_weights, plan_assignments
from keras_convnext.weights.naming import CLASSIFIER_PREFIX, DECODER_PREFIX, HEAD_PREFIXES

V1_BASE_URL = "https://dl.fbaipublicfiles.com/convnext/"
V2_BASE_URL = "https://dl.fbaipublicfiles.com/convnext/convnextv2/"
IMAGENET22K_CLASSES = 21841
V1_LICENSE = "MIT"
V2_LICENSE = "CC-BY-NC-4.0"
LICENSE_URLS = {
    V1_LICENSE: "https://github.com/facebookresearch/ConvNeXt/blob/main/LICENSE",
    V2_LICENSE: "https://github.com/facebookresearch/ConvNeXt-V2/blob/main/LICENSE",
}


class Pretrained(NamedTuple):
    """One official checkpoint release."""

    variant: str  # constructor name, e.g. "ConvNeXtV2Tiny"
    tag: str  # the `weights=` value, e.g. "imagenet22k-ft-1k-384"
    url: str
    training_data: str
    resolution: int  # image side in pixels the release was trained/fine-tuned at
    classes: Optional[int]  # None: encoder only, no classifier in the file
    top1: Optional[float]  # official ImageNet-1k top-1 (%) at `resolution`, where published
    license: str  # SPDX identifier, as the official repository states it
    sha256: Optional[str] = None  # None: the first clean download's hash is trusted (cache.py)
    size: Optional[int] = None  # bytes, where known

    @property
    def encoder_only(self):
        """No classifier: an FCMAE pre-training release (its file also holds the FCMAE decoder)."""
        return self.classes is None

    @property
    def filename(self):
        return self.url.rsplit("/", 1)[-1]


IN1K = "ImageNet-1k"
IN22K = "ImageNet-22k"
IN22K_1K = "ImageNet-22k, fine-tuned on ImageNet-1k"
FCMAE_1K = "ImageNet-1k, FCMAE self-supervised (no labels)"
V2_1K = "ImageNet-1k: FCMAE pre-training, then fine-tuning"
V2_22K = "ImageNet-22k (after FCMAE), fine-tuned on ImageNet-1k"


def _v1(size, tag, file_tag, data, resolution, classes, top1):
    return Pretrained(
        f"ConvNeXt{size.capitalize() if size != 'xlarge' else 'XLarge'}", tag,
        f"{V1_BASE_URL}convnext_{size}_{file_tag}.pth", data, resolution, classes, top1, V1_LICENSE,
    )


def _v2(size, tag, folder, file_tag, data, resolution, classes, top1):
    return Pretrained(
        f"ConvNeXtV2{size.capitalize()}", tag,
        f"{V2_BASE_URL}{folder}/convnextv2_{size}_{file_tag}.pt", data, resolution, classes, top1,
        V2_LICENSE,
    )


# Top-1 numbers: the results tables of facebookresearch/ConvNeXt and
# facebookresearch/ConvNeXt-V2 (ImageNet-1k validation, single crop).
_V1 = [
    # size, tag, file tag, training data, resolution, classes, top-1
    ("tiny", "imagenet", "1k_224_ema", IN1K, 224, 1000, 82.1),
    ("small", "imagenet", "1k_224_ema", IN1K, 224, 1000, 83.1),
    ("base", "imagenet", "1k_224_ema", IN1K, 224, 1000, 83.8),
    ("large", "imagenet", "1k_224_ema", IN1K, 224, 1000, 84.3),
    ("base", "imagenet-384", "1k_384", IN1K, 384, 1000, 85.1),
    ("large", "imagenet-384", "1k_384", IN1K, 384, 1000, 85.5),
    *[(size, "imagenet22k", "22k_224", IN22K, 224, IMAGENET22K_CLASSES, None)
      for size in ("tiny", "small", "base", "large", "xlarge")],
    ("tiny", "imagenet22k-ft-1k", "22k_1k_224", IN22K_1K, 224, 1000, 82.9),
    ("small", "imagenet22k-ft-1k", "22k_1k_224", IN22K_1K, 224, 1000, 84.6),
    ("base", "imagenet22k-ft-1k", "22k_1k_224", IN22K_1K, 224, 1000, 85.8),
    ("large", "imagenet22k-ft-1k", "22k_1k_224", IN22K_1K, 224, 1000, 86.6),
    ("xlarge", "imagenet22k-ft-1k", "22k_1k_224_ema", IN22K_1K, 224, 1000, 87.0),
    ("tiny", "imagenet22k-ft-1k-384", "22k_1k_384", IN22K_1K, 384, 1000, 84.1),
    ("small", "imagenet22k-ft-1k-384", "22k_1k_384", IN22K_1K, 384, 1000, 85.8),
    ("base", "imagenet22k-ft-1k-384", "22k_1k_384", IN22K_1K, 384, 1000, 86.8),
    ("large", "imagenet22k-ft-1k-384", "22k_1k_384", IN22K_1K, 384, 1000, 87.5),
    ("xlarge", "imagenet22k-ft-1k-384", "22k_1k_384_ema", IN22K_1K, 384, 1000, 87.8),
]

_V2_SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
_V2_1K_TOP1 = (76.7, 78.5, 80.3, 81.9, 83.0, 84.9, 85.8, 86.3)
_V2 = [
    *[(size, "fcmae", "pt_only", "1k_224_fcmae", FCMAE_1K, 224, None, None) for size in _V2_SIZES],
    *[(size, "imagenet", "im1k", "1k_224_ema", V2_1K, 224, 1000, top1)
      for size, top1 in zip(_V2_SIZES, _V2_1K_TOP1)],
    ("nano", "imagenet22k-ft-1k", "im22k", "22k_224_ema", V2_22K, 224, 1000, 82.1),
    ("nano", "imagenet22k-ft-1k-384", "im22k", "22k_384_ema", V2_22K, 384, 1000, 83.4),
    ("tiny", "imagenet22k-ft-1k", "im22k", "22k_224_ema", V2_22K, 224, 1000, 83.9),
    ("tiny", "imagenet22k-ft-1k-384", "im22k", "22k_384_ema", V2_22K, 384, 1000, 85.1),
    ("base", "imagenet22k-ft-1k", "im22k", "22k_224_ema", V2_22K, 224, 1000, 86.8),
    ("base", "imagenet22k-ft-1k-384", "im22k", "22k_384_ema", V2_22K, 384, 1000, 87.7),
    ("large", "imagenet22k-ft-1k", "im22k", "22k_224_ema", V2_22K, 224, 1000, 87.3),
    ("large", "imagenet22k-ft-1k-384", "im22k", "22k_384_ema", V2_22K, 384, 1000, 88.2),
    ("huge", "imagenet22k-ft-1k-384", "im22k", "22k_384_ema", V2_22K, 384, 1000, 88.7),
    ("huge", "imagenet22k-ft-1k-512", "im22k", "22k_512_ema", V2_22K, 512, 1000, 88.9),
]

# The isotropic V1 models (convnext_isotropic.py): size, top-1.
_ISOTROPIC = [("small", 78.7), ("base", 82.0), ("large", 82.6)]


def _isotropic(size, top1):
    return Pretrained(
        f"ConvNeXtIsotropic{size.capitalize()}", "imagenet",
        f"{V1_BASE_URL}convnext_iso_{size}_1k_224_ema.pth", IN1K, 224, 1000, top1, V1_LICENSE,
    )


# Every constructor that has registry weights, in the order of the tables.
MODEL_NAMES = (*VARIANTS, *ISOTROPIC_VARIANTS)

TAG_ORDER = (
    "imagenet", "imagenet-384", "imagenet22k", "imagenet22k-ft-1k",
    "imagenet22k-ft-1k-384", "imagenet22k-ft-1k-512", "fcmae",
)


def _order(entry):
    return (MODEL_NAMES.index(entry.variant), TAG_ORDER.index(entry.tag))


ENTRIES = sorted(
    [_v2(*row) for row in _V2] + [_v1(*row) for row in _V1] + [_isotropic(*row) for row in _ISOTROPIC],
    key=_order,
)
REGISTRY = {(entry.variant, entry.tag): entry for entry in ENTRIES}


class WeightsInfo(NamedTuple):
    """A release as `keras_convnext.list_weights()` describes it."""

    variant: str
    tag: str
    resolution: int
    classes: Optional[int]  # None: an encoder without a classifier
    top1: Optional[float]
    license: str
    url: str
    filename: str
    training_data: str


def list_weights(variant=None):
    """The pretrained weights available for `weights=`, as a list of `WeightsInfo`.

    Args:
        variant: a constructor name (`"ConvNeXtV2Tiny"`) to list only its
            weights; None lists every release.

    Each record has the `variant` and `tag` to pass (`ConvNeXtV2Tiny(weights="imagenet")`),
    the `resolution` in pixels it was trained at, its `classes` (None: encoder
    only), the official ImageNet-1k `top1` (%) where published, its
    `license` (SPDX: MIT for V1, CC-BY-NC-4.0 for V2), and the official `url`
    and `filename`.
    """
    if variant is not None and variant not in MODEL_NAMES:
        raise ValueError(f"variant {variant!r} is unknown; choose one of {', '.join(MODEL_NAMES)}.")
    return [
        WeightsInfo(e.variant, e.tag, e.resolution, e.classes, e.top1, e.license, e.url, e.filename,
                    e.training_data)
        for e in ENTRIES
        if variant is None or e.variant == variant
    ]


def tags_for(variant_name):
    return sorted(tag for (name, tag) in REGISTRY if name == variant_name)


def lookup(variant_name, tag):
    """The registry entry for `variant_name` and `tag`, or a ValueError listing the valid tags."""
    entry = REGISTRY.get((variant_name, tag))
    if entry is not None:
        return entry
    if variant_name is None:
        raise ValueError(
            f"weights={tag!r} is neither an existing file nor usable as a registry tag here: "
            "registry tags need a named constructor (for example keras_convnext.ConvNeXtV2Tiny). "
            "For a custom size, pass a checkpoint file path."
        )
    tags = tags_for(variant_name)
    others = sorted({name for (name, other) in REGISTRY if other == tag})
    hint = f" The tag {tag!r} exists for: {', '.join(others)}." if others else ""
    raise ValueError(
        f"weights={tag!r} is neither an existing file nor a known tag for {variant_name}. "
        f"Tags for {variant_name}: {', '.join(tags) or 'none'}.{hint}"
    )


def _classifier_units(model):
    kernel = model_weights(model).get(CLASSIFIER_PREFIX + "kernel")
    return None if kernel is None else int(kernel.shape[-1])


def load_pretrained(model, entry):
    """Loads a registry entry into `model` (downloading and converting it if needed).

    A model whose classifier has another number of classes than the entry
    gets a fresh head and everything else loaded (fine-tuning), and so does
    any classifier given an encoder-only FCMAE entry; a model built with
    `include_top=False` loads the backbone only. Any input size works:
    the network is fully convolutional.
    """
    model_classes = _classifier_units(model)
    arrays = cache.converted_weights(entry)
    # The FCMAE decoder of a pre-training release is for `keras_convnext.FCMAE` only.
    converted = {name: (name, array) for name, array in arrays.items() if not name.startswith(DECODER_PREFIX)}
    arrays.clear()
    # An FCMAE encoder has no head at all: a classifier keeps its fresh head and head norm
    # (the official fine-tuning start); otherwise only a classifier of another size is fresh.
    fresh_prefixes = HEAD_PREFIXES if entry.encoder_only else (CLASSIFIER_PREFIX,)
    fresh_head = model_classes is not None and (entry.encoder_only or model_classes != entry.classes)
    try:
        assignments = plan_assignments(model, converted, [], fresh_head, fresh_prefixes)
    except CheckpointError as error:
        raise CheckpointError(f"weights={entry.tag!r} ({entry.filename}): {error}") from error
    converted.clear()
    assign_all(assignments)
    return model


def resolve(model, weights, variant_name):
    """Loads registry tag `weights` into `model`; raises for unknown tags."""
    return load_pretrained(model, lookup(variant_name, weights))


DOWNLOAD_NOTE = (
    "`keras_convnext.ConvNeXtV2Tiny(weights=\"imagenet\")` downloads the official checkpoint once "
    "(into `~/.keras/models/keras_convnext`, or `$KERAS_CONVNEXT_CACHE_DIR`), converts it once "
    "to a checked `.safetensors` file and from then on loads only that file (no PyTorch needed). "
    "No hash of the official files is published: the first download that converts cleanly "
    "records its SHA-256, and later downloads and loads must match it. "
    "Without network access, download the file elsewhere and pass its "
    "path as `weights=`, or put it in a directory named by `KERAS_CONVNEXT_WEIGHTS_DIR`."
)


def markdown_table(entries=None):
    """The full weights table (docs/weights.md), one row per release."""
    lines = [
        DOWNLOAD_NOTE,
        "`python -m keras_convnext.convert FILE_OR_TAG [--variant NAME] --verify` writes "
        "`.weights.h5` and `.keras` files and checks them against the PyTorch reference; "
        "`--all` converts every release below.",
        "",
        "`keras_convnext.list_weights()` returns this table as records.",
        "",
        "| Constructor | `weights=` | Training data | Resolution | Classes | Top-1 (official) | License | File |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries or ENTRIES:
        classes = "encoder only" if entry.encoder_only else str(entry.classes)
        top1 = "-" if entry.top1 is None else f"{entry.top1:.1f}"
        lines.append(
            f"| {entry.variant} | `{entry.tag}` | {entry.training_data} | {entry.resolution} "
            f"| {classes} | {top1} | [{entry.license}]({LICENSE_URLS[entry.license]}) "
            f"| [{entry.filename}]({entry.url}) |"
        )
    lines += [
        "",
        "Top-1: the official ImageNet-1k validation accuracy (%) at that resolution, from the "
        "ConvNeXt (isotropic models included) and ConvNeXt V2 repositories. A model with another number of `classes` gets a "
        "fresh classifier and every other weight (fine-tuning); any input size works. `fcmae` "
        "weights are an encoder: use them with `include_top=False`, or continue the pre-training "
        "with `keras_convnext.FCMAE(\"ConvNeXtV2Atto\", weights=\"fcmae\")`, which also loads the "
        "official decoder. Licenses as the official "
        "repositories state them: ConvNeXt (V1) weights MIT, ConvNeXt V2 weights CC-BY-NC 4.0 "
        "(non-commercial).",
    ]
    return "\n".join(lines) + "\n"


def summary_table(entries=None):
    """The README's weights table: one row per constructor, its tags and license."""
    tags = {}
    for entry in entries or ENTRIES:
        tags.setdefault((entry.variant, entry.license), []).append(f"`{entry.tag}`")
    lines = [
        DOWNLOAD_NOTE,
        "",
        "| Constructor | `weights=` | License |",
        "|---|---|---|",
    ]
    for (variant, license_id), variant_tags in tags.items():
        lines.append(f"| {variant} | {', '.join(variant_tags)} | [{license_id}]({LICENSE_URLS[license_id]}) |")
    lines += [
        "",
        "Every release with its resolution, classes, official top-1 and file: "
        "[docs/weights.md](docs/weights.md), or `keras_convnext.list_weights()` in code. "
        "ConvNeXt (V1) weights are MIT; ConvNeXt V2 weights are CC-BY-NC 4.0 (non-commercial), "
        "as the official repositories state.",
    ]
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- weights-table:start -->"
TABLE_END = "<!-- weights-table:end -->"
# The documents that hold a generated table, relative to the repository root, and their table.
GENERATED_TABLES = {"README.md": summary_table, "docs/weights.md": markdown_table}


def with_table(text, table):
    """`text` with `table` between the weights-table markers."""
    pattern = re.compile(re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"The document has no {TABLE_START} ... {TABLE_END} markers.")
    block = f"{TABLE_START}\n{table}{TABLE_END}"
    return pattern.sub(lambda _: block, text, count=1)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_convnext.weights.registry",
        description="Print the pretrained weights table, or write the tables into the docs.",
    )
    parser.add_argument("--markdown", action="store_true", help="print the full Markdown table")
    parser.add_argument(
        "--update-docs", metavar="ROOT",
        help="rewrite the tables in ROOT/README.md and ROOT/docs/weights.md",
    )
    args = parser.parse_args(argv)
    if args.update_docs:
        for relative_path, table in GENERATED_TABLES.items():
            path = os.path.join(args.update_docs, relative_path)
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            with open(path + ".partial", "w", encoding="utf-8") as handle:
                handle.write(with_table(text, table()))
            os.replace(path + ".partial", path)
        return 0
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
