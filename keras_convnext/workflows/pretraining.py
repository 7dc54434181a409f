"""FCMAE masked-autoencoder pre-training of a ConvNeXt V2 encoder, with pictures of what it learned."""

import json
import os

import numpy as np

from keras_convnext._deps import require


def digits_images(count, size):
    """Handwritten digits (8x8, 16 grey levels) upscaled to RGB `(count, size, size, 3)` pixels in [0, 255]."""
    datasets = require("sklearn.datasets", "the digits images")
    images = datasets.load_digits().images[:count] * (255.0 / 16.0)
    scale = max(1, size // 8)
    images = np.kron(images, np.ones((1, scale, scale)))[:, :size, :size]
    images = np.pad(images, ((0, 0), (0, size - images.shape[1]), (0, size - images.shape[2])))
    return np.repeat(images[..., None], 3, axis=-1).astype("float32")


def photo_crops(count, size, seed):
    """Random crops of scikit-image's sample photographs, RGB `(count, size, size, 3)` pixels in [0, 255]."""
    samples = require("skimage.data", "the sample photographs")
    transform = require("skimage.transform", "the sample photographs")
    sources = [samples.astronaut(), samples.coffee(), samples.chelsea(), samples.rocket(),
               samples.immunohistochemistry()]
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
    tf = require("tensorflow", "reading tensorflow-datasets")
    tfds = require("tensorflow_datasets", "reading tensorflow-datasets")
    dataset = tfds.load(name, split="train", shuffle_files=False)

    def prepare(example):
        image = tf.cast(example["image"], tf.float32)
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return tf.image.resize(image, (size, size))

    return np.stack(list(tfds.as_numpy(dataset.map(prepare).take(count))))


def pretraining_images(data, count, size, seed=0):
    """`count` images of `data` ("digits", "photos" or "tfds:<name>") as float32 pixels in [0, 255]."""
    if data == "digits":
        return digits_images(count, size)
    if data == "photos":
        return photo_crops(count, size, seed)
    if data.startswith("tfds:"):
        return tfds_images(data[len("tfds:"):], count, size)
    raise ValueError(f"data must be digits, photos or tfds:<name>; got {data!r}.")


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


def _save_figure(pyplot, figure, path):
    temporary = path + ".partial.png"
    figure.savefig(temporary, dpi=100)
    pyplot.close(figure)
    os.replace(temporary, path)


def plot_reconstructions(pyplot, rows, path):
    titles = ["original", "masked input", "reconstruction", "visible pasted back"]
    figure, axes = pyplot.subplots(len(rows), 4, figsize=(8, 2 * len(rows)), squeeze=False)
    for row, panels in zip(axes, rows):
        for axis, panel, title in zip(row, panels, titles):
            axis.imshow(panel)
            axis.set_axis_off()
            axis.set_title(title, fontsize=8)
    figure.tight_layout()
    _save_figure(pyplot, figure, path)


def plot_loss(pyplot, losses, title, path):
    figure, axis = pyplot.subplots(figsize=(5, 3))
    axis.plot(range(1, len(losses) + 1), losses, marker="o")
    axis.set_xlabel("epoch")
    axis.set_ylabel("masked reconstruction loss (MSE)")
    axis.set_title(title)
    figure.tight_layout()
    _save_figure(pyplot, figure, path)


def pretrain_fcmae(data="digits", model="ConvNeXtV2Atto", depths=None, dims=None, epochs=10, batch_size=32, steps_per_epoch=None,
                   image_size=64, num_images=512, mask_ratio=0.6, decoder_dim=128, learning_rate=2e-3,
                   norm_pix_loss=False, samples=4, seed=0, output_dir="fcmae_output", verbose=True,
                   reuse_freed_memory=False):
    """Pre-trains a ConvNeXt V2 encoder with FCMAE and draws its reconstructions.

    Args:
        data: "digits" (scikit-learn, offline), "photos" (scikit-image's
            sample photographs) or "tfds:<name>".
        model: a ConvNeXt V2 constructor name; `depths`/`dims` (four ints
            each) replace its stage depths/widths.
        image_size: input side in pixels, a multiple of 32.
        num_images: images to train on.
        samples: rows of the reconstruction grid.
        output_dir: receives `reconstructions.png` (original | masked input |
            reconstruction | visible pasted back), `loss_curve.png`,
            `history.json` and `encoder.weights.h5` (the encoder, for
            `keras_convnext.transfer_encoder` or fine-tuning).

    Returns:
        `{"history": [loss per epoch], "files": {name: path}}`.
    """
    import keras

    import keras_convnext

    matplotlib = require("matplotlib", "drawing the reconstructions")
    matplotlib.use("Agg")
    from matplotlib import pyplot

    if reuse_freed_memory:
        keras_convnext.reuse_freed_memory()  # before any model is built
    keras.utils.set_random_seed(seed)
    images = pretraining_images(data, num_images, image_size, seed)
    encoder = model
    if depths or dims:
        if model not in keras_convnext.VARIANTS:
            raise ValueError(f"model {model!r} is not a keras_convnext model; choose a ConvNeXt V2 one.")
        variant = keras_convnext.VARIANTS[model]
        encoder = keras_convnext.ConvNeXt(
            tuple(depths or variant.stage_depths), tuple(dims or variant.stage_dims), version="v2",
            include_top=False, input_shape=(image_size, image_size, 3), name="custom_v2",
        )
    autoencoder = keras_convnext.FCMAE(
        encoder, input_shape=(image_size, image_size, 3), mask_ratio=mask_ratio, decoder_dim=decoder_dim,
        norm_pix_loss=norm_pix_loss, seed=seed,
    )
    autoencoder.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.05))
    losses = autoencoder.fit(
        images, batch_size=batch_size, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=2 if verbose else 0,
    ).history["loss"]

    os.makedirs(output_dir, exist_ok=True)
    files = {name: os.path.join(output_dir, name) for name in (
        "reconstructions.png", "loss_curve.png", "history.json", "encoder.weights.h5")}
    plot_reconstructions(pyplot, reconstruction_rows(autoencoder, images[:samples], seed), files["reconstructions.png"])
    plot_loss(pyplot, losses, f"FCMAE {model}, {data}, mask ratio {mask_ratio}", files["loss_curve.png"])
    settings = dict(data=data, model=model, depths=depths, dims=dims, epochs=epochs, batch_size=batch_size, image_size=image_size,
                    num_images=num_images, mask_ratio=mask_ratio, decoder_dim=decoder_dim,
                    learning_rate=learning_rate, norm_pix_loss=norm_pix_loss, seed=seed)
    with open(files["history.json"] + ".partial", "w") as file:
        json.dump({"args": settings, "loss": losses}, file, indent=2)
    os.replace(files["history.json"] + ".partial", files["history.json"])
    temporary = files["encoder.weights.h5"] + ".partial.weights.h5"
    autoencoder.encoder.save_weights(temporary)
    os.replace(temporary, files["encoder.weights.h5"])
    if verbose:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; wrote {', '.join(files.values())}")
    return {"history": losses, "files": files}
