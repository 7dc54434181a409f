"""Feature collapse under FCMAE, V1 against V2, at small scale (ConvNeXt V2 paper, Figs. 3-4).

Pre-trains two encoders of the same size with FCMAE on the same offline data
(scikit-learn's handwritten digits, upscaled to RGB), with the same budget,
for each of several seeds:

- "V1 + FCMAE": a ConvNeXt V1 encoder (`ConvNeXt<size>`: layer scale, no GRN);
- "V2 + FCMAE": a ConvNeXt V2 encoder (`ConvNeXtV2<size>`: GRN, no layer scale).

Then `keras_convnext.analysis` measures, per block, the average pairwise
cosine distance between the channels of the expansion layer (after GELU) on
held-out images, as in the paper's Figure 4, and draws the top channels of
one block for one image, as in its Figure 3. Writes into `--output-dir`:

- `distance.png`: mean and spread (min to max over the seeds) of the
  per-block distances of both encoders after pre-training, and at
  initialization, against the normalized layer index;
- `channels_v1.png`, `channels_v2.png`: the top-64 channel maps of
  `--block` by mean activation, one image, first seed;
- `results.json`: the distances per seed, their mean and standard deviation
  per block, the losses per epoch and the settings. It is rewritten after
  every run, and a run already in it is not repeated (`--output-dir` of an
  interrupted study resumes it).

    python examples/feature_collapse.py --backend jax --epochs 4 --seeds 0 1 2 --output-dir feature_collapse
"""

import argparse
import os
import sys
import time

import numpy as np

ENCODERS = {"V1 + FCMAE": "ConvNeXt{size}", "V2 + FCMAE": "ConvNeXtV2{size}"}
SIZES = ("Atto", "Femto", "Pico", "Nano", "Tiny")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default=None,
                        help="Keras backend (default: KERAS_BACKEND or Keras' default)")
    parser.add_argument("--size", choices=SIZES, default="Atto", help="encoder size, the same for V1 and V2")
    parser.add_argument("--image-size", type=int, default=64, help="pixels, a multiple of 32")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--decoder-dim", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--train-images", type=int, default=None,
                        help="pre-training images (default: all 1,438 of the training split)")
    parser.add_argument("--analysis-images", type=int, default=256,
                        help="held-out images the distances are averaged over")
    parser.add_argument("--block", default="stage1_block1", help="block whose channels are drawn")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="feature_collapse")
    args = parser.parse_args(argv)
    if args.image_size % 32 or args.image_size < 64:
        parser.error(f"--image-size must be a multiple of 32 and at least 64 (FCMAE needs several "
                     f"32-pixel patches); got {args.image_size}.")
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be positive integers.")
    return args


def select_backend(backend):
    if backend is None:
        return
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND", backend) != backend:
        raise SystemExit(f"Keras is already imported with another backend; run this script in a new "
                         f"process to use --backend {backend}.")
    os.environ["KERAS_BACKEND"] = backend


def load_images(args):
    """Pre-training images (whole batches only) and held-out analysis images, RGB pixels in [0, 255]."""
    from keras_convnext.data import digits_arrays

    x_train, _, x_val, _ = digits_arrays(args.image_size)
    x_train = x_train[: args.train_images]
    # Whole batches: a last, smaller batch would compile the training step a second time.
    x_train = x_train[: len(x_train) // args.batch_size * args.batch_size]
    return x_train.astype("float32"), x_val[: args.analysis_images].astype("float32")


class Trainer:
    """One compiled FCMAE model per encoder, reused for every seed.

    Each seed's own initial weights (and mask generator) are loaded into it
    and its optimizer starts afresh, which trains exactly as a new model
    would, without compiling the same network again: on a CPU, compiling
    costs more than this short pre-training.
    """

    def __init__(self, args, model):
        import keras
        from keras_convnext import analysis

        self.args, self.model = args, model
        model.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.05))
        self.extractor = analysis.activation_model(model)  # shares the model's weights

    def restart(self, fresh):
        """Loads the weights and mask generator state of `fresh`, an FCMAE of the same encoder."""
        self.model.set_weights(fresh.get_weights())
        self.model.seed_generator.state.assign(fresh.seed_generator.state.value)
        for variable in self.model.optimizer.variables:  # step count and moments: a fresh AdamW
            if variable.name != "learning_rate":  # a constant rate is a variable too; keep it
                variable.assign(np.zeros(variable.shape, variable.dtype))

    def pretrain(self, images):
        """FCMAE pre-training; returns the loss per epoch."""
        history = self.model.fit(images, batch_size=self.args.batch_size, epochs=self.args.epochs,
                                 shuffle=True, verbose=2)
        return [float(value) for value in history.history["loss"]]

    def distances(self, images, batch_size=32):
        """`analysis.feature_collapse` of the current weights, through the one compiled extractor."""
        from keras_convnext import analysis

        parts = {}
        for start in range(0, len(images), batch_size):
            for name, values in self.extractor.predict_on_batch(images[start : start + batch_size]).items():
                parts.setdefault(name, []).append(analysis.pairwise_cosine_distance(np.asarray(values)))
        return {name: float(np.mean(np.concatenate(values))) for name, values in parts.items()}


def summarize(per_seed):
    """`{block: [distance per seed]}` -> `{block: {"mean", "std", "min", "max"}}`."""
    return {
        block: {"mean": float(np.mean(values)), "std": float(np.std(values)),
                "min": float(np.min(values)), "max": float(np.max(values))}
        for block, values in per_seed.items()
    }


def main(argv=None):
    """Runs the study; returns the contents of `results.json`."""
    args = parse_args(argv)
    select_backend(args.backend)
    import keras
    import keras_convnext as kc
    from keras_convnext.workflows.common import load_record, write_json
    from keras_convnext import analysis

    os.makedirs(args.output_dir, exist_ok=True)
    train, held_out = load_images(args)
    results_path = os.path.join(args.output_dir, "results.json")
    settings = {key: value for key, value in vars(args).items() if key not in ("seeds", "output_dir", "backend")}
    record = load_record(results_path, settings)
    record.update(backend=keras.backend.backend(), train_images=len(train), analysis_images=len(held_out))

    trainers = {}
    for seed in args.seeds:
        for label, template in ENCODERS.items():
            key = f"{label}, seed {seed}"
            if key in record["runs"]:
                continue
            keras.utils.set_random_seed(seed)  # initial weights, masks and shuffling
            encoder = kc.CONSTRUCTORS[template.format(size=args.size)](
                include_top=False, input_shape=(args.image_size, args.image_size, 3))
            fresh = kc.FCMAE(encoder, input_shape=encoder.input_shape[1:], mask_ratio=args.mask_ratio,
                             decoder_dim=args.decoder_dim, seed=seed)
            if label not in trainers:
                trainers[label] = Trainer(args, fresh)
            trainer = trainers[label]
            trainer.restart(fresh)
            initial = trainer.distances(held_out)
            start = time.perf_counter()
            losses = trainer.pretrain(train)
            seconds = round(time.perf_counter() - start, 1)
            record["runs"][key] = {"label": label, "seed": seed, "loss": losses, "seconds": seconds,
                                   "initialization": initial, "distance": trainer.distances(held_out)}
            if seed == args.seeds[0]:
                grid = analysis.channel_activation_grid(trainer.model, held_out[0], args.block, k=64, columns=8)
                analysis.save_grid(grid, os.path.join(args.output_dir, f"channels_{label[:2].lower()}.png"), scale=4)
            write_json(record, results_path)
            print(f"{key}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, mean distance "
                  f"{np.mean(list(record['runs'][key]['distance'].values())):.4f} ({seconds} s)", flush=True)

    runs = list(record["runs"].values())
    blocks = list(runs[0]["distance"])
    # At initialization the two encoders' expansion layers differ only by their random
    # draws, so one curve, over every run of both, stands for their starting point.
    curves = {"initialization": {block: [run["initialization"][block] for run in runs] for block in blocks}}
    for label in (label for label in ENCODERS if any(run["label"] == label for run in runs)):
        curves[label] = {block: [run["distance"][block] for run in runs if run["label"] == label] for block in blocks}
    record["summary"] = {name: summarize(per_seed) for name, per_seed in curves.items()}
    write_json(record, results_path)
    seeds = sorted({run["seed"] for run in record["runs"].values()})
    analysis.plot_feature_collapse(
        curves, os.path.join(args.output_dir, "distance.png"), normalized_depth=True,
        title=f"FCMAE, {args.size}, digits {args.image_size}px, {args.epochs} epochs, {len(seeds)} seeds")
    for name, summary in record["summary"].items():
        means = [value["mean"] for value in summary.values()]
        print(f"{name:>26}: mean over blocks {np.mean(means):.4f} (per block "
              f"{', '.join(f'{value:.3f}' for value in means)})")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
