"""Model-parallel layouts of ConvNeXt's weights for `keras.distribution` (JAX).

A block's two Linear layers hold most of its weights: `pwconv1` widens the
channels C to 4C, `pwconv2` narrows them back. Sharding `pwconv1` by its
output features and `pwconv2` by its input features (Megatron's column then
row split) keeps the 4C-wide hidden map split across the model axis between
them, so the only exchange a block needs is one sum after `pwconv2`, plus
GRN's mean over channels on V2. The head's kernel is split by its input
features, which every variant's width divides (any class count works).
Everything else (stem, depthwise convolutions, LayerNorms: a few percent of
the weights) is replicated.

    mesh = keras.distribution.DeviceMesh((2, 4), ["data", "model"], keras.distribution.list_devices())
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=keras_convnext.model_parallel_layout_map(mesh), batch_dim_name="data"))
    model = keras_convnext.ConvNeXtV2Huge(...)  # built after set_distribution: created sharded
"""

import keras

# (variable path, a regular expression of the whole path; axes of the
# variable: the model axis where it is split, None where not). The optional
# prefix covers a ConvNeXt built inside another model.
MODEL_PARALLEL_RULES = (
    (r"(.*/)?pwconv1/kernel", (None, "model")),  # (C, 4C): output features
    (r"(.*/)?pwconv1/bias", ("model",)),  # (4C,)
    (r"(.*/)?grn/(gamma|beta)", ("model",)),  # (4C,), on the hidden map
    (r"(.*/)?pwconv2/kernel", ("model", None)),  # (4C, C): input features
    (r"(.*/)?predictions/kernel", ("model", None)),  # (C, classes): input features
)


def model_parallel_layout_map(device_mesh, model_axis="model"):
    """A `keras.distribution.LayoutMap` that splits ConvNeXt's wide Linear layers over `model_axis`.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with an axis named
            `model_axis` (and usually a batch axis, such as `"data"`, for
            `ModelParallel(batch_dim_name=...)`).
        model_axis: the mesh axis the weights are split over. Its size must
            divide 4 x every stage's width and the last stage's width, which
            holds for every named variant and any size up to 8.

    Returns:
        The layout map for `keras.distribution.ModelParallel(layout_map=...)`:
        `pwconv1` kernels `(C, 4C)` and biases split by output features,
        GRN's gamma and beta `(4C,)` with them, `pwconv2` kernels `(4C, C)`
        by input features, the head's kernel `(C, classes)` by input
        features; every other variable replicated.
    """
    if model_axis not in device_mesh.axis_names:
        raise ValueError(
            f"The device mesh has axes {list(device_mesh.axis_names)}, none named {model_axis!r}; "
            "build it with a model axis, e.g. DeviceMesh((2, 4), ['data', 'model'], devices), "
            "or pass model_axis= with the name of the axis to split the weights over."
        )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in MODEL_PARALLEL_RULES:
        layout_map[pattern] = tuple(model_axis if axis == "model" else None for axis in axes)
    return layout_map
