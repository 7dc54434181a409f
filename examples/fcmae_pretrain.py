"""Pre-train a ConvNeXt V2 encoder with FCMAE and look at its reconstructions.

Offline by default (scikit-learn's handwritten digits, bundled with the
package); `--data photos` uses scikit-image's sample photographs and
`--data tfds:<name>` any image dataset of tensorflow-datasets. Writes into
`--output`:

- `reconstructions.png`: one row per sample, original | masked input |
  reconstruction | reconstruction with the visible patches pasted back;
- `loss_curve.png` and `history.json`: the training loss per epoch;
- `encoder.weights.h5`: the pre-trained encoder, ready for
  `keras_convnext.transfer_encoder` or fine-tuning.

    python examples/fcmae_pretrain.py --backend jax --epochs 20 --data photos
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default=None,
                        help="Keras backend (default: KERAS_BACKEND or Keras' default)")
    parser.add_argument("--model", default="ConvNeXtV2Atto", help="ConvNeXt V2 constructor name")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--data", default="digits",
                        help="digits | photos | tfds:<dataset name> (for example tfds:tf_flowers)")
    parser.add_argument("--image-size", type=int, default=64, help="pixels, a multiple of 32")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--decoder-dim", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--norm-pix-loss", action="store_true")
    parser.add_argument("--samples", type=int, default=4, help="rows of the reconstruction grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="fcmae_output")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="keep freed memory in the process (glibc): faster training steps on JAX and "
                             "PyTorch, at the cost of holding the peak memory (docs/workflows.md).")
    return parser.parse_args(argv)


def _select_backend(backend):
    if backend is None:
        return
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND", backend) != backend:
        raise RuntimeError(
            f"Keras is already imported with backend {os.environ.get('KERAS_BACKEND')!r}; "
            f"run the script in a fresh process to use --backend {backend}."
        )
    os.environ["KERAS_BACKEND"] = backend


def digits(count, size):
    """Handwritten digits (8x8, 16 grey levels) upscaled to RGB `size` x `size` pixels in [0, 255]."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:count] * (255.0 / 16.0)
    scale = size // 8
    images = np.kron(images, np.ones((1, scale, scale)))[:, :size, :size]
    images = np.pad(images, ((0, 0), (0, size - images.shape[1]), (0, size - images.shape[2])))
    return np.repeat(images[..., None], 3, axis=-1).astype("float32")


def photos(count, size, seed):
    """Random crops of scikit-image's sample photographs, RGB pixels in [0, 255]."""
    from skimage import data, transform

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        photo = sources[index % len(sources)]
        side = int(rng.integers(size, min(photo.shape[:2]) + 1))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = transform.resize(photo[top : top + side, left : left + side], (size, size), anti_aliasing=True)
        crops.append(crop * 255.0)
    return np.stack(crops).astype("float32")


def tfds_images(name, count, size):
    """The first `count` training images of a tensorflow-datasets set, resized to `size`."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    dataset = tfds.load(name, split="train", shuffle_files=False)

    def prepare(example):
        image = tf.cast(example["image"], tf.float32)
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return tf.image.resize(image, (size, size))

    return np.stack(list(tfds.as_numpy(dataset.map(prepare).take(count))))


def load_images(args):
    if args.data == "digits":
        return digits(args.num_images, args.image_size)
    if args.data == "photos":
        return photos(args.num_images, args.image_size, args.seed)
    if args.data.startswith("tfds:"):
        return tfds_images(args.data[len("tfds:"):], args.num_images, args.image_size)
    raise ValueError(f"--data must be digits, photos or tfds:<name>; got {args.data!r}.")


def _save_figure(figure, path):
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(handle)
    figure.savefig(temporary, dpi=100)
    os.replace(temporary, path)


def _write_text(text, path):
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def reconstruction_rows(model, images, seed):
    """`(samples, 4, H, W, 3)` in [0, 1]: original, masked input, reconstruction, visible pasted back."""
    rng = np.random.default_rng(seed)
    grid_h, grid_w = model.grid_shape
    masks = np.ones((len(images), grid_h * grid_w), "float32")
    for row in masks:
        row[rng.permutation(grid_h * grid_w)[: model.num_visible]] = 0.0
    result = model.reconstruct(images, patch_mask=masks.reshape(-1, grid_h, grid_w))
    original, reconstruction = result["images"], result["reconstruction"]
    hidden = np.repeat(np.repeat(result["mask"], model.patch_size, 1), model.patch_size, 2)[..., None]
    rows = np.stack(
        [original, original * (1 - hidden), reconstruction, original * (1 - hidden) + reconstruction * hidden],
        axis=1,
    )
    low, high = original.min(), original.max()
    return np.clip((rows - low) / max(high - low, 1e-6), 0.0, 1.0)


def main(argv=None):
    """Runs the example; returns `{"history": [...], "files": {...}}`."""
    args = parse_args(argv)
    _select_backend(args.backend)
    import keras

    if args.reuse_freed_memory:
        import keras_convnext

        keras_convnext.reuse_freed_memory()  # before any model is built
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    import keras_convnext as kc

    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    images = load_images(args)
    model = kc.FCMAE(
        args.model,
        input_shape=(args.image_size, args.image_size, 3),
        mask_ratio=args.mask_ratio,
        decoder_dim=args.decoder_dim,
        norm_pix_loss=args.norm_pix_loss,
        seed=args.seed,
    )
    model.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.05))
    history = model.fit(
        images, batch_size=args.batch_size, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, verbose=2,
    ).history["loss"]

    files = {name: os.path.join(args.output, name) for name in (
        "reconstructions.png", "loss_curve.png", "history.json", "encoder.weights.h5")}
    rows = reconstruction_rows(model, images[: args.samples], seed=args.seed)
    titles = ["original", "masked input", "reconstruction", "visible pasted back"]
    figure, axes = pyplot.subplots(len(rows), 4, figsize=(8, 2 * len(rows)), squeeze=False)
    for row, panels in zip(axes, rows):
        for axis, panel, title in zip(row, panels, titles):
            axis.imshow(panel)
            axis.set_axis_off()
            axis.set_title(title, fontsize=8)
    figure.tight_layout()
    _save_figure(figure, files["reconstructions.png"])
    pyplot.close(figure)

    figure, axis = pyplot.subplots(figsize=(5, 3))
    axis.plot(range(1, len(history) + 1), history, marker="o")
    axis.set_xlabel("epoch")
    axis.set_ylabel("masked reconstruction loss (MSE)")
    axis.set_title(f"FCMAE {args.model}, {args.data}, mask ratio {args.mask_ratio}")
    figure.tight_layout()
    _save_figure(figure, files["loss_curve.png"])
    pyplot.close(figure)

    _write_text(json.dumps({"args": vars(args), "loss": history}, indent=2), files["history.json"])
    temporary = files["encoder.weights.h5"] + ".partial.weights.h5"
    model.encoder.save_weights(temporary)
    os.replace(temporary, files["encoder.weights.h5"])
    print(f"loss {history[0]:.4f} -> {history[-1]:.4f}; wrote {', '.join(files.values())}")
    return {"history": history, "files": files}


if __name__ == "__main__":
    main(sys.argv[1:])
