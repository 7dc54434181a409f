"""Convert ConvNeXt checkpoints to Keras `.weights.h5` and `.keras`, and verify them.

    python -m keras_convnext.convert convnextv2_tiny_1k_224_ema.pt --verify
    python -m keras_convnext.convert imagenet --variant ConvNeXtV2Tiny --output-dir out
    python -m keras_convnext.convert --all --output-dir out [--verify]

A file in the official, timm or HF transformers naming gives its variant and
number of classes by its shapes; a registry tag needs `--variant`. Both
outputs are built with the constructor's defaults (pixels in [0, 255] with
ImageNet normalization inside, softmax head), so
`keras_convnext.ConvNeXtV2Tiny(weights="out/x.weights.h5")` and
`keras.saving.load_model("out/x.keras")` both give the converted model.

`--verify` reloads the written `.keras` file (safe_mode=True) and compares
its logits with the PyTorch reference (HF transformers) on the scikit-image
sample photos and random pixels; it fails (exit status 1) when the largest
logit difference exceeds `--tolerance` (1e-4). Exit status 1 also when the
conversion failed (and, with `--all`, when no entry could be converted);
2: the command line was wrong; 3: converted, but no reference could run
(for example the sparse FCMAE encoder, which HF transformers does not
implement).
"""

import argparse
import os
import sys

import keras

from keras_convnext.models.convnext import CONSTRUCTORS
from keras_convnext.models.isotropic import ISOTROPIC_CONSTRUCTORS
from keras_convnext.models.variants import find_variant
from keras_convnext.weights import cache, download, registry
from keras_convnext.weights.files import CheckpointError, read_checkpoint
from keras_convnext.weights.loader import convert_state_dict, describe, load_state_dict
from keras_convnext.weights.naming import CLASSIFIER_PREFIX

DEFAULT_TOLERANCE = 1e-4


def inspect_checkpoint(state_dict):
    """`(constructor name, classes or None)` of a checkpoint, from its tensor shapes."""
    converted, _ = convert_state_dict(state_dict)
    text, (version, depths, dims) = describe({path: array.shape for path, (_, array) in converted.items()})
    variant = find_variant(version, depths, dims) if version else None
    if variant is None:
        raise CheckpointError(
            f"The checkpoint is a {text}, which matches no named constructor; pass --variant, "
            "or load it into keras_convnext.ConvNeXt(...) with the same shapes."
        )
    head = converted.get(CLASSIFIER_PREFIX + "kernel")
    return variant, (None if head is None else int(head[1].shape[-1]))


def _build(variant, classes, **kwargs):
    constructor = {**CONSTRUCTORS, **ISOTROPIC_CONSTRUCTORS}[variant]
    if classes is None:
        return constructor(include_top=False, **kwargs)
    return constructor(classes=classes, **kwargs)


def convert_file(path, output_dir, variant=None, stem=None):
    """Converts a checkpoint file; returns `(weights path, .keras path, variant, classes)`."""
    state_dict = read_checkpoint(path)  # an FCMAE decoder is skipped by the loader
    found_variant, classes = inspect_checkpoint(state_dict)
    variant = variant or found_variant
    model = _build(variant, classes)
    load_state_dict(model, state_dict, source=path)
    stem = stem or os.path.basename(path).split(".")[0]
    weights_path = os.path.join(output_dir, stem + ".weights.h5")
    keras_path = os.path.join(output_dir, stem + ".keras")
    with download.atomic_path(weights_path) as temporary:
        model.save_weights(temporary)
    with download.atomic_path(keras_path) as temporary:
        model.save(temporary)
    return weights_path, keras_path, variant, classes


def _logits_model(keras_path):
    """The saved model with its softmax removed (same weights, logits out)."""
    model = keras.saving.load_model(keras_path, safe_mode=True, compile=False)
    head = [layer for layer in model.layers if layer.name == "activation"]
    if not head:
        return model
    return keras.Model(model.inputs[0], head[0].input, name=model.name + "_logits")


def verify(keras_path, reference_path, variant, classes, image_size, tolerance):
    """Compares the saved model with the PyTorch reference; returns (passed, worst difference)."""
    from keras_convnext import verify as reference_check

    reference = reference_check.hf_reference(variant, read_checkpoint(reference_path), classes)
    model = _logits_model(keras_path)
    results = reference_check.compare(model, reference, image_size)
    worst = max(result["max_diff"] for result in results.values())
    what = "logit" if classes is not None else "feature"
    for label, result in results.items():
        agreement = ""
        if "top1_agree" in result:
            agreement = f", top-1 agreement {result['top1_agree']}/{result['count']}"
        print(f"  {label} ({result['count']} images, {image_size}x{image_size}): "
              f"max |{what} difference| {result['max_diff']:.3g}{agreement}")
    passed = worst <= tolerance
    print(f"  verification {'passed' if passed else 'FAILED'}: max difference {worst:.3g} "
          f"(tolerance {tolerance:g}) against HF transformers on {reference_path}")
    return passed, worst


def _convert_and_report(source, output_dir, variant, stem, args, image_size):
    weights_path, keras_path, variant, classes = convert_file(source, output_dir, variant, stem)
    print(f"Wrote {weights_path} and {keras_path} ({variant}, "
          f"{'backbone' if classes is None else f'{classes} classes'})")
    if not args.verify:
        return True, None
    from keras_convnext.verify import ReferenceUnavailable

    reference_path = args.reference_checkpoint or source
    try:
        return verify(keras_path, reference_path, variant, classes, image_size, args.tolerance)
    except ReferenceUnavailable as error:
        print(f"  not verified: {error}")
        return None, None


def convert_all(args):
    """Converts every registry entry; unreachable ones are skipped. Returns the exit status.

    1 when an entry failed, or when none could be converted (all unreachable).
    """
    rows, failed, converted = [], False, 0
    for entry in registry.ENTRIES:
        print(f"== {entry.variant} weights={entry.tag!r}")
        try:
            with cache.original_checkpoint(entry) as checkpoint:
                passed, worst = _convert_and_report(
                    checkpoint, args.output_dir, entry.variant, f"{entry.variant}-{entry.tag}",
                    args, args.image_size or entry.resolution,
                )
            status = {True: "verified", False: "FAILED", None: "converted, not verified"}[passed]
            status = "converted" if not args.verify else status
            failed = failed or passed is False
            converted += 1
        except download.WeightsUnavailableError as error:
            status, worst = "unreachable (skipped)", None
            print(f"  {error}")
        except Exception as error:  # report and go on with the next entry
            status, worst, failed = f"FAILED: {type(error).__name__}", None, True
            print(f"  {error}")
        rows.append((entry.variant, entry.tag, status, "-" if worst is None else f"{worst:.3g}"))
    print("\n| Constructor | weights= | Status | Max difference |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if not converted:
        print(f"error: none of the {len(rows)} registry entries could be converted (see above).", file=sys.stderr)
    return 1 if failed or not converted else 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_convnext.convert",
        description="Convert ConvNeXt checkpoints to Keras .weights.h5 and .keras files.",
    )
    parser.add_argument("source", nargs="?", help="a checkpoint file, or a registry tag (with --variant)")
    parser.add_argument("--variant", help="constructor name, e.g. ConvNeXtV2Tiny (needed for tags)")
    parser.add_argument("--output-dir", default=".", help="where to write the files (default: .)")
    parser.add_argument("--name", help="output file name without suffix (default: from the source)")
    parser.add_argument("--all", action="store_true", help="convert every registry entry")
    parser.add_argument("--verify", action="store_true", help="compare with the PyTorch reference")
    parser.add_argument("--reference-checkpoint", metavar="FILE",
                        help="with --verify: run the reference on this file instead of SOURCE")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest allowed logit difference (default: 1e-4)")
    parser.add_argument("--image-size", type=int,
                        help="verification image side (default: the entry's resolution, or 224)")
    return parser


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.all:
        return convert_all(args)
    if not args.source:
        parser.error("give a checkpoint file or a registry tag, or --all")
    try:
        if os.path.exists(args.source):
            passed, _ = _convert_and_report(
                args.source, args.output_dir, args.variant, args.name, args, args.image_size or 224
            )
        else:
            if not args.variant:
                parser.error(f"{args.source!r} is not a file; a registry tag needs --variant")
            entry = registry.lookup(args.variant, args.source)
            with cache.original_checkpoint(entry) as checkpoint:
                passed, _ = _convert_and_report(
                    checkpoint, args.output_dir, entry.variant, args.name or f"{entry.variant}-{entry.tag}",
                    args, args.image_size or entry.resolution,
                )
    except (CheckpointError, ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if passed is None:
        return 3  # converted, but --verify could not run
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
