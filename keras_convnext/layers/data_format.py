"""Image data format helpers shared by the layers."""

import keras

DATA_FORMATS = ("channels_last", "channels_first")


def standardize_data_format(data_format):
    """`data_format`, or the global `keras.config.image_data_format()` for None."""
    if data_format is None:
        return keras.config.image_data_format()
    data_format = str(data_format).lower()
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}; got {data_format!r}.")
    return data_format


def channel_axis_for(data_format):
    """Channel axis of a 4D image tensor for a data format (None: the global one)."""
    return -1 if standardize_data_format(data_format) == "channels_last" else 1
