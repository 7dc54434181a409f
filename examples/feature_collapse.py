"""Feature collapse under FCMAE, with and without GRN, at small scale (ConvNeXt V2, Figs. 3-4).

Pre-trains two encoders of the same size with FCMAE on the same offline data
(scikit-learn's handwritten digits, upscaled to RGB) with the same budget and
seed:

- "V1-style": a ConvNeXt V2 encoder whose GRN is held at the identity
  (gamma = beta = 0, not trained), so every block is a V1 block without its
  layer scale;
- "V2": the same encoder with GRN trained.

Then `keras_convnext.analysis` measures, per block, the average pairwise
cosine distance between the channels of the expansion layer (after GELU) on
held-out images, as in the paper's Figure 4, and draws the top channels of
one block for one image, as in its Figure 3. Writes into `--output-dir`:

- `distance.png`: the per-block distances of both encoders, and of the
  encoder at initialization (both start from the same weights);
- `channels_v1_style.png`, `channels_v2.png`: the top-64 channel maps of
  `--block` by mean activation, one image;
- `results.json`: the distances, the losses per epoch and the settings.

    python examples/feature_collapse.py --backend jax --epochs 4 --output-dir feature_collapse
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default=None,
                        help="Keras backend (default: KERAS_BACKEND or Keras' default)")
    parser.add_argument("--model", default="ConvNeXtV2Atto", help="ConvNeXt V2 constructor name")
    parser.add_argument("--image-size", type=int, default=64, help="pixels, a multiple of 32")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--decoder-dim", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--analysis-images", type=int, default=256,
                        help="held-out images the distances are averaged over")
    parser.add_argument("--block", default="stage1_block1", help="block whose channels are drawn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="feature_collapse")
    args = parser.parse_args(argv)
    if args.image_size % 32 or args.image_size < 64:
        parser.error(f"--image-size must be a multiple of 32 and at least 64 (FCMAE needs several "
                     f"32-pixel patches); got {args.image_size}.")
    return args


def select_backend(backend):
    if backend is None:
        return
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND", backend) != backend:
        raise SystemExit(f"Keras is already imported with another backend; run this script in a new "
                         f"process to use --backend {backend}.")
    os.environ["KERAS_BACKEND"] = backend


def digits(size):
    """All 1,797 handwritten digits, bilinearly upscaled to RGB `size` x `size` pixels in [0, 255]."""
    from keras import ops
    from sklearn.datasets import load_digits

    images = load_digits().images[..., None] * (255.0 / 16.0)
    images = ops.image.resize(images.astype("float32"), (size, size), interpolation="bilinear")
    images = np.clip(ops.convert_to_numpy(images), 0.0, 255.0)
    return np.repeat(images, 3, axis=-1).astype("float32")


def build_encoder(args, use_grn):
    """The encoder; without GRN, its GRN layers stay the identity they start as."""
    import keras_convnext as kc

    if not (args.model in kc.CONSTRUCTORS and args.model.startswith("ConvNeXtV2")):
        names = ", ".join(name for name in kc.CONSTRUCTORS if name.startswith("ConvNeXtV2"))
        print(f"--model must be a ConvNeXt V2 constructor ({names}); got {args.model!r}.", file=sys.stderr)
        raise SystemExit(2)
    encoder = kc.CONSTRUCTORS[args.model](include_top=False, input_shape=(args.image_size, args.image_size, 3))
    if not use_grn:
        for block in kc.analysis.blocks_of(encoder).values():
            # gamma = beta = 0 at initialization: y = x + gamma * (x * Nx) + beta = x.
            block.grn.trainable = False
    return encoder


def pretrain(args, encoder, images):
    """FCMAE pre-training; returns the trained FCMAE model and its loss per epoch."""
    import keras
    import keras_convnext as kc

    model = kc.FCMAE(encoder, input_shape=encoder.input_shape[1:], mask_ratio=args.mask_ratio,
                     decoder_dim=args.decoder_dim, seed=args.seed)
    model.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.05))
    history = model.fit(images, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=2)
    return model, [float(value) for value in history.history["loss"]]


def main(argv=None):
    """Runs the experiment; returns the contents of `results.json`."""
    args = parse_args(argv)
    select_backend(args.backend)
    import keras
    from keras_convnext import analysis

    os.makedirs(args.output_dir, exist_ok=True)
    images = digits(args.image_size)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(images))
    held_out, train = images[order[: args.analysis_images]], images[order[args.analysis_images :]]

    results = {"settings": vars(args), "backend": keras.backend.backend(), "train_images": len(train),
               "analysis_images": len(held_out), "distance": {}, "loss": {}, "seconds": {}}
    encoders = {}
    for label, use_grn in (("V1-style (no GRN)", False), ("V2 (GRN)", True)):
        keras.utils.set_random_seed(args.seed)  # the same initial weights and masks for both
        encoder = build_encoder(args, use_grn)
        if not results["distance"]:
            results["distance"]["initialization"] = analysis.feature_collapse(encoder, held_out)
        start = time.perf_counter()
        model, results["loss"][label] = pretrain(args, encoder, train)
        results["seconds"][label] = round(time.perf_counter() - start, 1)
        results["distance"][label] = analysis.feature_collapse(model, held_out)
        encoders[label] = model
    results["distance"]["V2 (GRN), after GRN"] = analysis.feature_collapse(
        encoders["V2 (GRN)"], held_out, activation="grn")

    paths = {"distance": os.path.join(args.output_dir, "distance.png")}
    analysis.plot_feature_collapse(
        results["distance"], paths["distance"],
        title=f"FCMAE {args.model}, digits {args.image_size}px, {args.epochs} epochs")
    for label, name in (("V1-style (no GRN)", "channels_v1_style.png"), ("V2 (GRN)", "channels_v2.png")):
        grid = analysis.channel_activation_grid(encoders[label], held_out[0], args.block, k=64, columns=8)
        paths[label] = analysis.save_grid(grid, os.path.join(args.output_dir, name), scale=4)

    results_path = os.path.join(args.output_dir, "results.json")
    with open(results_path + ".partial", "w") as file:
        json.dump(results, file, indent=1)
    os.replace(results_path + ".partial", results_path)
    for label, distances in results["distance"].items():
        print(f"{label:>22}: mean distance {np.mean(list(distances.values())):.4f} "
              f"(per block {', '.join(f'{value:.3f}' for value in distances.values())})")
    print(f"wrote {', '.join(paths.values())}, {results_path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
