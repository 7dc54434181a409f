"""Training a classifier with `fit`, and fine-tuning one with the official ConvNeXt V2 recipe."""

import contextlib

from keras_convnext.workflows.common import build_classifier, default_image_size, fit_and_save, resolve_data
from keras_convnext.workflows.evaluation import evaluate_classifier


def distribution_scope(enabled):
    """Context for building and compiling the model: data-parallel over local devices if enabled.

    `keras.distribution.DataParallel` on JAX, `tf.distribute.MirroredStrategy`
    on TensorFlow; Keras' PyTorch trainer has neither. Returns `(scope, replicas)`.
    """
    import keras

    if not enabled:
        return contextlib.nullcontext(), 1
    backend = keras.backend.backend()
    if backend == "jax":
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return contextlib.nullcontext(), len(devices)
    if backend == "tensorflow":
        import tensorflow as tf

        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        strategy = tf.distribute.MirroredStrategy(devices)
        return strategy.scope(), strategy.num_replicas_in_sync
    raise ValueError(
        f"data-parallel training (distribute) runs on the jax and tensorflow backends; this one is {backend}. "
        "Run without it."
    )


def _prepare_run(seed, reuse_freed_memory):
    import keras

    if reuse_freed_memory:
        import keras_convnext

        keras_convnext.reuse_freed_memory()  # before any model is built
    keras.utils.set_random_seed(seed)


def train(data="auto", model="ConvNeXtV2Atto", depths=None, dims=None, weights=None, epochs=5, batch_size=32,
          image_size=None, limit=None, seed=0, output_dir="convnext_run", steps_per_epoch=None,
          learning_rate=1e-3, weight_decay=0.05, distribute=False, evaluation=True, verbose=True,
          reuse_freed_memory=False):
    """Trains a classifier with `fit` (AdamW, cross-entropy) and evaluates it on the held-out split.

    Args:
        data: "digits" (offline), "tf_flowers", "imagenette", "cifar10", an
            image folder (one sub-directory per class), or "auto"
            (tf_flowers when online, else digits).
        model: a keras_convnext constructor name; `depths`/`dims` (four
            ints each) replace its stage depths/widths.
        weights: optional checkpoint file or registry tag to start from (new classifier).
        image_size: square input side in pixels (default 32 for digits, else 224).
        limit: at most this many examples per split.
        output_dir: receives `model.keras`, `history.json` and, with
            `evaluation`, `confusion_matrix.csv` and `training_curves.png`.
        distribute: data-parallel over every local device (JAX, TensorFlow).
        reuse_freed_memory: `keras_convnext.reuse_freed_memory()` before the model is built.

    Returns:
        A dict with `model`, `history` (`{metric: [per epoch]}`), `evaluation`
        (see `evaluate_classifier`, or None) and `replicas`.
    """
    import keras

    from keras_convnext import data as datasets_module

    _prepare_run(seed, reuse_freed_memory)
    data = resolve_data(data, verbose)
    image_size = default_image_size(data, image_size)
    scope, replicas = distribution_scope(distribute)
    if batch_size % replicas:
        raise ValueError(f"batch size {batch_size} must be divisible by the {replicas} devices.")
    datasets = datasets_module.load_dataset(data, image_size, batch_size, seed, limit=limit)
    with scope:
        classifier = build_classifier(model, datasets.num_classes, image_size, depths, dims, weights)
        classifier.compile(
            optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay),
            loss=keras.losses.CategoricalCrossentropy(),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
    history = fit_and_save(classifier, datasets, output_dir, epochs, steps_per_epoch, verbose)
    report = None
    if evaluation:
        report = evaluate_classifier(classifier, datasets.validation, datasets.class_names, output_dir, history,
                                     verbose)
    return {"model": classifier, "history": history, "evaluation": report, "replicas": replicas}


def finetune(data="auto", model="ConvNeXtV2Atto", depths=None, dims=None, weights=None, epochs=5, batch_size=32,
             image_size=None, limit=None, seed=0, output_dir="convnext_run", steps_per_epoch=None,
             learning_rate=2e-4, min_learning_rate=1e-6, warmup_epochs=1.0, weight_decay=0.05, layer_decay=0.9,
             layer_decay_scheme="group", label_smoothing=0.1, drop_path_rate=0.1, mixup=0.8, cutmix=1.0,
             randaugment=True, random_erasing=0.25, ema=False, ema_momentum=0.9999, verbose=True,
             reuse_freed_memory=False):
    """Fine-tunes a classifier with the official ConvNeXt V2 recipe and evaluates it.

    The recipe (`keras_convnext.training`): AdamW (no weight decay on biases,
    norms, GRN and layer scale), linear warm-up then cosine decay, layer-wise
    learning-rate decay (official "group" levels), label smoothing,
    RandAugment + RandomErasing per image, MixUp/CutMix per batch, drop path,
    and optionally an EMA of the weights (copied into the model at the end).

    Args:
        weights: pretrained checkpoint file or registry tag (the classifier starts fresh).
        learning_rate: peak learning rate after `warmup_epochs`.
        mixup, cutmix: the mixing alphas (0 disables each).
        random_erasing: probability of RandomErasing per image.
        The other arguments are as for `train`.

    Returns:
        A dict with `model`, `optimizer`, `history` and `evaluation`.
    """
    import keras

    from keras_convnext import data as datasets_module
    from keras_convnext import training

    _prepare_run(seed, reuse_freed_memory)
    data = resolve_data(data, verbose)
    image_size = default_image_size(data, image_size)
    image_layers = training.augmentation_layers(rand_augment=randaugment, random_erasing=random_erasing, seed=seed)

    def augment(images):
        for layer in image_layers:
            images = layer(images, training=True)
        return images

    datasets = datasets_module.load_dataset(
        data, image_size, batch_size, seed, limit=limit, augment=augment if image_layers else None,
        batch_augment=training.batch_mixing(mixup, cutmix, seed=seed),
    )
    classifier = build_classifier(model, datasets.num_classes, image_size, depths, dims, weights, drop_path_rate)
    steps = steps_per_epoch or max(1, (datasets.train_size or batch_size) // batch_size)
    total_steps = max(1, steps * epochs)
    optimizer = training.finetune_optimizer(
        classifier,
        learning_rate=learning_rate,
        total_steps=total_steps,
        warmup_steps=min(total_steps, int(warmup_epochs * steps)),
        min_learning_rate=min_learning_rate,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        layer_decay_scheme=layer_decay_scheme,
        use_ema=ema,
        ema_momentum=ema_momentum,
    )
    classifier.compile(
        optimizer=optimizer,
        loss=training.classification_loss(label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    history = fit_and_save(classifier, datasets, output_dir, epochs, steps_per_epoch, verbose)
    report = evaluate_classifier(classifier, datasets.validation, datasets.class_names, output_dir, history, verbose)
    return {"model": classifier, "optimizer": optimizer, "history": history, "evaluation": report}
