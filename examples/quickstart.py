"""Build a ConvNeXt V2, load a checkpoint, classify images; runs offline.

Offline, the checkpoint is one this script trains in about a minute on
scikit-learn's handwritten digits (real 8x8 scans, upscaled to 32x32); with
network access, `--pretrained` also classifies a photo with the official
ImageNet weights.

    python examples/quickstart.py            # offline
    python examples/quickstart.py --pretrained
"""

import argparse
import os
import tempfile

import numpy as np
import keras

import keras_convnext


def digits(size=32):
    """scikit-learn's digits as RGB images in [0, 255], `(n, size, size, 3)`, and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images[..., None].astype("float32") * (255.0 / 16.0)
    images = keras.ops.convert_to_numpy(keras.ops.image.resize(images, (size, size)))
    return np.repeat(np.clip(images, 0, 255), 3, axis=-1), data.target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pretrained", action="store_true", help="also try weights='imagenet' (downloads)")
    args = parser.parse_args(argv)

    images, labels = digits()
    split = len(images) * 4 // 5
    model = keras_convnext.ConvNeXtV2Atto(input_shape=(32, 32, 3), classes=10)
    model.compile(
        optimizer=keras.optimizers.AdamW(2e-3, weight_decay=0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(images[:split], labels[:split], epochs=args.epochs, batch_size=64, verbose=2)

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "digits.weights.h5")
        model.save_weights(checkpoint)
        restored = keras_convnext.ConvNeXtV2Atto(input_shape=(32, 32, 3), classes=10, weights=checkpoint)
    probabilities = restored.predict(images[split:], verbose=0)
    accuracy = float(np.mean(probabilities.argmax(-1) == labels[split:]))
    print(f"first held-out digit: predicted {probabilities[0].argmax()}, true {labels[split]}")
    print(f"held-out accuracy of the reloaded checkpoint: {accuracy:.3f}")

    if args.pretrained:
        from skimage import data

        photo = keras.ops.image.resize(data.chelsea().astype("float32"), (224, 224))
        classifier = keras_convnext.ConvNeXtV2Tiny(weights="imagenet")
        for _, name, score in keras_convnext.decode_predictions(classifier.predict(photo[None], verbose=0))[0]:
            print(f"{score:.3f}  {name}")
    return accuracy


if __name__ == "__main__":
    main()
