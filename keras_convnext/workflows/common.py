"""Pieces the workflows share: the data choice, the classifier, fitting and saving."""

import json
import os
import socket


def network_available(host="storage.googleapis.com", port=443, timeout=2.0):
    """True when the tensorflow-datasets download host answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_data(name, verbose=True):
    """`"auto"` means tf_flowers with a network (or a local copy), else the offline digits."""
    if name != "auto":
        return name
    tfds_home = os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    if os.path.isdir(os.path.join(tfds_home, "tf_flowers")) or network_available():
        return "tf_flowers"
    if verbose:
        print("No network and no local tf_flowers: using the offline scikit-learn digits.")
    return "digits"


def default_image_size(data, image_size):
    """`image_size`, or 32 for the 8x8 digits and 224 for photographs."""
    if image_size:
        return image_size
    return 32 if data == "digits" else 224


def build_classifier(model_name, num_classes, image_size, depths=None, dims=None, weights=None,
                     drop_path_rate=0.0):
    """A `model_name` classifier (or custom `depths`/`dims` of its version) for `num_classes`.

    Args:
        model_name: a keras_convnext constructor name, e.g. "ConvNeXtV2Atto".
        num_classes: outputs of the new classifier.
        image_size: square input side in pixels.
        depths, dims: optional four stage depths / widths replacing the variant's.
        weights: optional checkpoint file or registry tag; everything but the
            classifier is loaded, the classifier starts fresh.
    """
    import keras_convnext

    if model_name not in keras_convnext.CONSTRUCTORS:
        raise ValueError(
            f"model {model_name!r} is not a keras_convnext model; choose one of "
            f"{', '.join(keras_convnext.CONSTRUCTORS)}."
        )
    variant = keras_convnext.VARIANTS[model_name]
    common = dict(input_shape=(image_size, image_size, 3), classes=num_classes, drop_path_rate=drop_path_rate)
    if depths or dims:
        if weights and not os.path.exists(weights):
            raise ValueError("with custom depths/dims, weights must be a checkpoint file.")
        model = keras_convnext.ConvNeXt(
            tuple(depths or variant.stage_depths), tuple(dims or variant.stage_dims),
            version=variant.version, name="custom_" + variant.version, **common,
        )
    else:
        model = keras_convnext.CONSTRUCTORS[model_name](**common)
    if weights:
        load_pretrained_body(model, weights, model_name)
    return model


def load_pretrained_body(model, weights, model_name):
    """Loads every pretrained weight except the classifier, which stays freshly initialized.

    `weights` is a checkpoint file (official, timm or HF naming) or a
    registry tag of keras_convnext (e.g. "imagenet").
    """
    import keras_convnext

    if os.path.exists(weights):
        keras_convnext.load_weights(model, weights, fresh_head=True)
        return
    pretrained = keras_convnext.CONSTRUCTORS[model_name](input_shape=model.input_shape[1:], weights=weights)
    source = {v.path: v for v in pretrained.weights}
    for variable in model.weights:
        if not variable.path.startswith("predictions/"):
            variable.assign(source[variable.path])


def write_json(value, path):
    """Writes `value` as JSON to a temporary file next to `path`, then renames it."""
    with open(path + ".partial", "w") as file:
        json.dump(value, file, indent=1)
    os.replace(path + ".partial", path)


def load_record(path, settings):
    """The JSON record at `path` of an earlier, possibly interrupted, study run with the same
    `settings`, else a fresh one: `{"settings": settings, "runs": {}}`."""
    if os.path.exists(path):
        with open(path) as file:
            record = json.load(file)
        if record.get("settings") == settings:
            return record
    return {"settings": settings, "runs": {}}


def fit_and_save(model, datasets, output_dir, epochs, steps_per_epoch=None, verbose=True):
    """Fits on `datasets` and writes `model.keras` and `history.json` into `output_dir`.

    Each file is written under a temporary name and then renamed, so an
    interrupted run never leaves a half-written one. Returns the history as
    `{metric: [float per epoch]}`.
    """
    history = model.fit(
        datasets.train, validation_data=datasets.validation, epochs=epochs,
        steps_per_epoch=steps_per_epoch, verbose="auto" if verbose else 0,
    ).history
    history = {key: [float(v) for v in values] for key, values in history.items()}
    os.makedirs(output_dir, exist_ok=True)
    model_path = os.path.join(output_dir, "model.keras")
    model.save(model_path + ".partial.keras")
    os.replace(model_path + ".partial.keras", model_path)
    write_json(history, os.path.join(output_dir, "history.json"))
    return history

