"""keras-hub, an optional dependency: imported only when a keras-hub model is asked for."""


def import_keras_hub():
    """The `keras_hub` module, or an ImportError that says how to install it."""
    try:
        import keras_hub
    except ImportError:
        raise ImportError(
            'keras-hub is needed for ConvNeXt keras-hub models (backbone, classifier, detection, '
            'segmentation); install it with: pip install "keras-convnext[hub]"'
        ) from None
    return keras_hub
