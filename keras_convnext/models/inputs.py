"""Checks on the images a built model is given, before Keras traces or compiles anything.

A wrong image shape otherwise fails deep inside a backend (a reshape, a
convolution over an empty map), or not at all: TensorFlow's `predict`
broadcasts a 1-channel image against the 3 RGB statistics and returns
predictions. And on JAX a failure inside `predict`, `evaluate` or `fit`
leaves the model without its weights (see `kept_on_failure`).
"""

import contextlib
import itertools
import os
import types

import keras

from keras_convnext.layers.pointwise import PatchConv2D

# The shape of a batch of images, in words, per data format.
BATCH_LAYOUTS = {
    "channels_last": "(batch, height, width, channels)",
    "channels_first": "(batch, channels, height, width)",
}


def model_image_shape(model):
    """`(data_format, height, width, channels, min_size)` of what `model` takes, or None.

    None when the model does not take one batch of images (several inputs,
    another rank): nothing is checked then. `height`/`width` are None where
    any size goes; `min_size` is the product of the patch sizes of the
    model's patch convolutions (32 for every ConvNeXt), in pixels.
    """
    cache = model.__dict__.get("_image_shape_cache")
    if cache is None:
        # Past Keras' and PyTorch's attribute tracking, as the model's other caches.
        cache = (_image_shape(model),)
        object.__setattr__(model, "_image_shape_cache", cache)
    return cache[0]


def _image_shape(model):
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        return None
    names = {layer.name for layer in model.layers}
    # The builder turns channels_first inputs into channels_last by this layer.
    data_format = "channels_first" if "to_channels_last" in names else "channels_last"
    _, *image = model.inputs[0].shape
    if data_format == "channels_last":
        height, width, channels = image
    else:
        channels, height, width = image
    min_size = 1
    for layer in model.layers:
        if isinstance(layer, PatchConv2D):
            min_size *= layer.kernel_size[0]
    return data_format, height, width, channels, min_size


def static_shape(data):
    """The shape of an array, tensor or `tf.data.Dataset` of images, or None if unknown.

    For a dataset, the shape of its elements' images (the first item of an
    `(images, labels)` tuple). Generators, `PyDataset`s, dicts and lists are
    not looked into: None.
    """
    spec = getattr(data, "element_spec", None)
    if spec is not None:
        data = spec[0] if isinstance(spec, tuple) else spec
    shape = getattr(data, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(None if size is None else int(size) for size in shape)
    except (TypeError, ValueError):  # A TensorShape of unknown rank.
        return None


def check_images(model, images, expected=None):
    """Raises a ValueError naming the problem if `images` cannot go through `model`.

    `images`: an array or tensor `(batch, height, width, channels)`
    (channels_last) or `(batch, channels, height, width)` (channels_first),
    as the model was built, or a `tf.data.Dataset` of them. Unknown sizes
    pass; `checked_images` checks them batch by batch. `expected` is what
    `model_image_shape` gives, for a model that it cannot tell (FCMAE).
    """
    expected = expected or model_image_shape(model)
    if expected is not None:
        _check_kind(model, images, BATCH_LAYOUTS[expected[0]])
    check_image_shape(model, static_shape(images), expected)


# dtypes of images a model can take: real numbers (bool and integers are cast).
_IMAGE_DTYPE_PREFIXES = ("float", "bfloat", "int", "uint", "bool")


def _check_kind(model, images, layout):
    """Raises a ValueError for what is not one batch of real-valued images (a path, a list, text)."""
    if images is None or isinstance(images, (str, bytes, os.PathLike)):
        got = "None" if images is None else f"the path {images!r}"
        raise ValueError(
            f"{model.name} takes a batch of images as one array or tensor, {layout}; got {got}. "
            "Load image files first (keras.utils.load_img and keras.utils.img_to_array) and stack "
            "them into one array."
        )
    if isinstance(images, list) and len(images) > 1 and all(hasattr(item, "shape") for item in images):
        raise ValueError(
            f"{model.name} takes a batch of images as one array or tensor, {layout}; got a list of "
            f"{len(images)} arrays. Stack them into one batch first: np.stack(images)."
        )
    dtype = getattr(images, "dtype", None)
    if dtype is None or _is_dataset(images):
        return
    try:
        name = keras.backend.standardize_dtype(dtype)
    except (TypeError, ValueError):  # numpy text and object arrays
        name = str(dtype)
    if not name.startswith(_IMAGE_DTYPE_PREFIXES):
        raise ValueError(
            f"{model.name} takes images of real numbers (pixel values); got an array of dtype {name}. "
            "Decode text or objects into numbers first; of complex values, pass the part you mean."
        )


def check_image_shape(model, shape, expected=None):
    """`check_images` for a batch of images of `shape` (None or None sizes: unknown)."""
    any_size_possible = expected is None  # a ConvNeXt can be rebuilt for any size; FCMAE cannot
    expected = expected or model_image_shape(model)
    if expected is None or shape is None:
        return
    data_format, height, width, channels, min_size = expected
    layout = BATCH_LAYOUTS[data_format]
    if shape and shape[0] == 0:
        raise ValueError(f"{model.name} got an empty batch (images of shape {shape}); give it at least one image.")
    if len(shape) != 4:
        hint = " For a single image, add a batch axis: images[None]." if len(shape) == 3 else ""
        raise ValueError(
            f"{model.name} takes a batch of images, {layout} ({data_format}); "
            f"got an array of shape {shape}.{hint}"
        )
    if data_format == "channels_last":
        _, got_height, got_width, got_channels = shape
        other_channels = shape[1]
    else:
        _, got_channels, got_height, got_width = shape
        other_channels = shape[3]
    if None not in (channels, got_channels) and got_channels != channels:
        raise ValueError(
            f"{model.name} takes images with {_channels(channels)}{' (RGB)' if channels == 3 else ''}, "
            f"{layout} ({data_format}); got images of shape {shape}, with {_channels(got_channels)}."
            f"{_channel_hint(data_format, channels, got_channels, other_channels)}"
        )
    rebuild = ", or build the model with None for height and width to take any size" if any_size_possible else ""
    for size, got in ((height, got_height), (width, got_width)):
        if None not in (size, got) and size != got:
            raise ValueError(
                f"{model.name} was built for {height}x{width} images (its input_shape); got "
                f"{got_height}x{got_width} (images of shape {shape}). Resize the images{rebuild}."
            )
    for got in (got_height, got_width):
        if got is not None and got < min_size:
            raise ValueError(
                f"{model.name} downsamples by {min_size}, so images must be at least "
                f"{min_size}x{min_size} pixels; got {got_height}x{got_width} (images of shape "
                f"{shape}, {data_format}). Resize or pad the images."
            )


def checked_images(model, data):
    """`data` for `predict`, `evaluate` or `fit`, checked now and, where sizes are unknown, per batch.

    What the static shape tells is checked at once (`check_images`). A
    `tf.data.Dataset` whose images have unknown sizes (for example
    `(None, None, None, 3)`) gets a step that checks each batch's shape
    before the model sees it, and a Python generator each batch it yields;
    the first bad batch then fails with the same ValueError as an array of
    that shape would, once `kept_on_failure` sees the call fail (a dataset's
    check runs inside TensorFlow, which reports its own error type). Other
    inputs are returned as they are.
    """
    check_images(model, data)
    if model_image_shape(model) is None:
        return data
    if isinstance(data, types.GeneratorType):
        return _checked_batches(model, data)
    if _is_dataset(data) and _sizes_unknown(data):
        return _checked_dataset(model, data)
    if isinstance(data, keras.utils.PyDataset) and not data.use_multiprocessing:
        return _CheckedPyDataset(model, data)
    if keras.backend.backend() == "tensorflow" and _is_torch_loader(data):
        # On JAX and PyTorch, every batch reaches the model's own check with its
        # shape known; TensorFlow traces the step for the sizes of the loader's
        # first batches, which may leave them unknown.
        return _checked_loader(model, data)
    return data


def checked_validation_data(model, validation_data):
    """`fit`'s `validation_data`, checked as `checked_images` checks `x`, before any training."""
    if isinstance(validation_data, (tuple, list)) and validation_data:
        return (checked_images(model, validation_data[0]), *validation_data[1:])
    if isinstance(validation_data, types.GeneratorType):
        # Its first batch now rather than after the first epoch's training.
        first = next(validation_data, None)
        if first is None:
            return validation_data
        check_image_shape(model, static_shape(_first_item(first)))
        return _checked_batches(model, itertools.chain([first], validation_data))
    return checked_images(model, validation_data)


# Failures of per-batch checks, by model id, until `kept_on_failure` raises them.
# A dataset's check runs in a TensorFlow thread, so this is shared, not thread-local.
_FAILED_BATCH_CHECKS = {}


def check_batch(model, images):
    """`check_image_shape` for one batch inside `predict`, `evaluate` or `fit`, where
    `kept_on_failure` reports a failure with this check's own error."""
    _check_batch(model, static_shape(images))


def _check_batch(model, shape):
    try:
        check_image_shape(model, shape)
    except ValueError as error:
        _FAILED_BATCH_CHECKS[id(model)] = error
        raise


def _first_item(element):
    return element[0] if isinstance(element, (tuple, list)) and element else element


def _checked_batches(model, batches):
    for batch in batches:
        _check_batch(model, static_shape(_first_item(batch)))
        yield batch


class _CheckedPyDataset(keras.utils.PyDataset):
    """A view of a `PyDataset` that checks each batch's images before the model sees them."""

    def __init__(self, model, dataset):
        super().__init__(workers=dataset.workers, use_multiprocessing=False, max_queue_size=dataset.max_queue_size)
        self._model = model
        self._dataset = dataset

    def __len__(self):
        return len(self._dataset)

    @property
    def num_batches(self):
        return self._dataset.num_batches

    def __getitem__(self, index):
        batch = self._dataset[index]
        _check_batch(self._model, static_shape(_first_item(batch)))
        return batch

    def on_epoch_begin(self):
        self._dataset.on_epoch_begin()

    def on_epoch_end(self):
        self._dataset.on_epoch_end()


def _is_torch_loader(data):
    """Whether `data` is a PyTorch `DataLoader` (without importing PyTorch for other data)."""
    if not type(data).__module__.startswith("torch"):
        return False
    import torch

    return isinstance(data, torch.utils.data.DataLoader)


def _checked_loader(model, loader):
    """A view of a PyTorch `DataLoader` that checks each batch's images as it yields them."""
    import torch

    class CheckedLoader(torch.utils.data.DataLoader):
        # Keras reads a loader's `dataset`, `batch_size` and length, and iterates
        # it; `DataLoader.__init__` would start a second loader over the data.
        def __init__(self):
            self.dataset = loader.dataset
            self.batch_size = loader.batch_size

        def __len__(self):
            return len(loader)

        def __iter__(self):
            return _checked_batches(model, iter(loader))

    return CheckedLoader()


def _is_dataset(data):
    """Whether `data` is a `tf.data.Dataset` (without importing TensorFlow for other data)."""
    if not type(data).__module__.startswith("tensorflow"):
        return False
    import tensorflow as tf

    return isinstance(data, tf.data.Dataset)


def _sizes_unknown(dataset):
    spec = _first_item(dataset.element_spec)
    shape = getattr(spec, "shape", None)
    if shape is None:
        return False  # a dict or nested structure of inputs: not a batch of images
    return shape.rank is None or None in shape.as_list()[1:]


def _checked_dataset(model, dataset):
    import tensorflow as tf

    is_tuple = isinstance(dataset.element_spec, tuple)

    def check(shape):
        _check_batch(model, tuple(int(size) for size in shape))
        return shape

    def checked(*element):
        images = element[0]
        shape = tf.numpy_function(check, [tf.shape(images)], Tout=tf.int32, name="check_image_shape")
        with tf.control_dependencies([shape]):
            images = tf.identity(images)
        return (images, *element[1:]) if is_tuple else images

    return dataset.map(checked)


def _channels(count):
    return f"{count} channel" if count == 1 else f"{count} channels"


def _channel_hint(data_format, channels, got_channels, other_channels):
    if other_channels == channels:
        other = "channels_first" if data_format == "channels_last" else "channels_last"
        return (
            f" The images look {other}: transpose them, or build the model under "
            f'keras.config.set_image_data_format("{other}").'
        )
    if channels == 3 and got_channels == 1:
        axis = -1 if data_format == "channels_last" else 1
        return (
            f" Repeat a grayscale channel three times (np.repeat(images, 3, axis={axis})), "
            "or build a 1-channel model (input_shape with 1 channel)."
        )
    return ""


@contextlib.contextmanager
def kept_on_failure(model):
    """Leaves the model usable when `fit`, `evaluate` or `predict` raises in the body.

    Two framework behaviours make one failed call poison every later one.
    Keras' JAX trainer detaches every variable's value (sets it to None)
    while the loop runs and reattaches the values when it ends; an exception
    skips the reattachment, and every later use of the model raises
    `TypeError: 'NoneType' object is not callable`. Here the values the loop
    reached are reattached where Keras kept them, and otherwise the values
    from before the call. And a step function whose first trace failed
    (TensorFlow's `tf.function`) refuses to create variables when traced
    again; the step functions are dropped, so the next call builds new ones.

    A batch whose check failed (`checked_images`) is reported with the
    check's ValueError, whatever error type the data pipeline raised.

    `fit` calls `build_training_state` first, so that on JAX the optimizer's
    variables have values to give back too.
    """
    jax = keras.backend.backend() == "jax"
    saved = {id(variable): variable.value for variable in _trainer_variables(model)} if jax else {}
    _FAILED_BATCH_CHECKS.pop(id(model), None)
    try:
        yield
    except BaseException:
        if jax:
            _reattach_jax_values(model, saved)
        model.train_function = model.test_function = model.predict_function = None
        failed_check = _FAILED_BATCH_CHECKS.pop(id(model), None)
        if failed_check is not None:
            # The batch check's own error, not the framework's report of it.
            raise ValueError(str(failed_check)) from None
        raise


def build_training_state(model, x=None, *fit_args, **fit_kwargs):
    """Creates a compiled model's optimizer variables, and on TensorFlow its metrics' and
    loss's, now, eagerly, where they do not exist yet. Takes `fit`'s arguments.

    Keras' JAX and PyTorch trainers do this before `fit` traces anything; its
    TensorFlow trainer (without a distribution strategy) makes them inside the
    traced training step, where each variable is slow to make and the step is
    traced a second time once they exist (docs/design-notes.md has the
    figures). The metrics need the data's shapes: arrays and `tf.data`
    datasets give them; for other data only the optimizer is made first.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return
    if keras.backend.backend() != "tensorflow":
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        return
    y = fit_args[0] if fit_args else fit_kwargs.get("y")
    batch = _batch_spec(x, y, fit_kwargs.get("sample_weight"))
    with model.distribute_strategy.scope():
        if batch is not None:
            # Keras has no public API that builds the compiled metrics and loss;
            # this is the step its trainers run before `fit` where they build them.
            model._symbolic_build(data_batch=batch)
        elif not optimizer.built:
            optimizer.build(model.trainable_variables)


def _batch_spec(x, y, sample_weight):
    """`(x, y, sample_weight)` as objects with a shape and a dtype, or None when unknown."""
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        return x.element_spec if y is None and sample_weight is None else None
    parts = (x, y, sample_weight)
    if any(part is not None and not _is_array(part) for part in parts):
        return None
    return parts if x is not None else None


def _is_array(value):
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, keras.KerasTensor)


def _reattach_jax_values(model, saved):
    model.jax_state_sync()
    for variable in _trainer_variables(model):
        if _detached(variable):
            value = saved.get(id(variable))
            if value is None:
                # Created inside the failed call: metric totals and counts,
                # which Keras resets to zeros before each use.
                value = keras.ops.zeros(variable.shape, variable.dtype)
            variable.assign(value)
    # Keras' name for the loop's state: synced once, it must not be synced
    # again over the user's later assignments.
    model._jax_state = None


def _trainer_variables(model):
    optimizer = getattr(model, "optimizer", None)
    groups = [model.trainable_variables, model.non_trainable_variables, model.metrics_variables]
    if optimizer is not None:
        groups.append(optimizer.variables)
    unique = {}
    for group in groups:
        for variable in group:
            unique.setdefault(id(variable), variable)
    return list(unique.values())


def _detached(variable):
    # Keras has no public way to ask whether a JAX variable holds a value:
    # reading `value` of a detached variable tries to initialize it again.
    return variable._value is None
