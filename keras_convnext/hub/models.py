"""ConvNeXt as a keras-hub model: `ConvNeXtBackbone` and `ConvNeXtImageClassifier`.

    from keras_convnext.hub import ConvNeXtBackbone, ConvNeXtImageClassifier
    classifier = ConvNeXtImageClassifier.from_preset("convnext_v2_tiny_imagenet")
    backbone = ConvNeXtBackbone.from_preset("convnext_tiny_imagenet22k", image_shape=(512, 512, 3))

`from_preset` takes a preset name of keras_convnext's registry
(`keras_convnext.hub.presets()`), which downloads the official checkpoint
once into the verified cache (`keras_convnext.weights.cache`), as
`weights="imagenet"` does, or anything keras-hub's own `from_preset` takes
(a folder written by `save_to_preset`, a Kaggle or Hugging Face handle).

Importing this module imports keras-hub (`pip install "keras-convnext[hub]"`);
`import keras_convnext` does not.
"""

import contextlib

import keras

from keras_convnext.hub import registry_presets as preset_table
from keras_convnext.hub.dependency import import_keras_hub
from keras_convnext.layers.block import LAYER_NORM_EPSILON, kernel_init
from keras_convnext.layers.layer_norm import LayerNorm
from keras_convnext.models.convnext import ConvNeXt
from keras_convnext.models.pyramid import build_pyramid_outputs
from keras_convnext.models.variants import VARIANTS
from keras_convnext.weights import registry

keras_hub = import_keras_hub()


class _ClassProperty:
    """A read-only property of the class (keras-hub's `presets` is one)."""

    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)


def _our_presets(cls):
    return {name: preset_table.describe(entry) for name, entry in preset_table.presets().items()}


@contextlib.contextmanager
def _building_under(data_format, dtype):
    """Keras' global image data format and dtype policy set for one build, then restored.

    The ConvNeXt builder reads both from Keras' configuration, as
    keras.applications models do.
    """
    previous_format = keras.config.image_data_format()
    previous_policy = keras.config.dtype_policy()
    try:
        keras.config.set_image_data_format(data_format)
        if dtype is not None:
            keras.config.set_dtype_policy(dtype)
        yield
    finally:
        keras.config.set_image_data_format(previous_format)
        keras.config.set_dtype_policy(previous_policy)


def _default_image_shape(data_format):
    return (None, None, 3) if data_format == "channels_last" else (3, None, None)


def _pyramid_variant(entry):
    if entry.variant not in VARIANTS:
        raise ValueError(f"{entry.variant} has no feature pyramid, so it is not a ConvNeXtBackbone preset.")
    return VARIANTS[entry.variant]


@keras.saving.register_keras_serializable(package="keras_convnext")
class ConvNeXtBackbone(keras_hub.models.FeaturePyramidBackbone):
    """The ConvNeXt V1/V2 encoder as a keras-hub `FeaturePyramidBackbone`.

    The same layers, names and weights as `keras_convnext.ConvNeXt(...,
    include_top=False)`: images in, the stride-32 feature map out, and
    `pyramid_outputs` `{"P2": stride 4, ..., "P5": stride 32}` for keras-hub's
    RetinaNet, DeepLabV3 and other pyramid tasks.

    Args:
        stage_depths: blocks per stage, four integers (`(3, 3, 9, 3)` for Tiny).
        stage_dims: channels per stage, four integers (`(96, 192, 384, 768)`).
        version: `"v1"` (blocks with layer scale) or `"v2"` (blocks with GRN).
        layer_scale_init_value: V1 layer scale start (default 1e-6); None for V2.
        drop_path_rate: stochastic depth rate of the last block, in [0, 1).
        kernel_size: depthwise kernel size (7 in every official model).
        include_preprocessing: inputs are RGB pixels in [0, 255] and the
            model applies the ImageNet mean/std itself; so the classifier
            needs no keras-hub image converter.
        image_shape: one image's shape in `data_format`, `(height, width, 3)`
            or `(3, height, width)`; height and width may be None.
        data_format: `"channels_last"` or `"channels_first"`; default Keras'
            `image_data_format()`.
        dtype: the dtype policy every layer is built with (`"mixed_float16"`, ...).

    Output: `(batch, height / 32, width / 32, stage_dims[-1])` (channels_first:
    `(batch, stage_dims[-1], height / 32, width / 32)`).
    """

    def __init__(
        self,
        stage_depths,
        stage_dims,
        version="v2",
        layer_scale_init_value=None,
        drop_path_rate=0.0,
        kernel_size=7,
        include_preprocessing=True,
        image_shape=None,
        data_format=None,
        dtype=None,
        **kwargs,
    ):
        data_format = data_format or keras.config.image_data_format()
        image_shape = tuple(image_shape) if image_shape is not None else _default_image_shape(data_format)
        with _building_under(data_format, dtype):
            encoder = ConvNeXt(
                tuple(stage_depths), tuple(stage_dims), version=version, include_top=False,
                input_shape=image_shape, include_preprocessing=include_preprocessing,
                drop_path_rate=drop_path_rate, layer_scale_init_value=layer_scale_init_value,
                kernel_size=kernel_size,
            )
        super().__init__(inputs=encoder.inputs[0], outputs=encoder.outputs[0], dtype=dtype, **kwargs)
        self.pyramid_outputs = build_pyramid_outputs(self)
        self.stage_depths = tuple(stage_depths)
        self.stage_dims = tuple(stage_dims)
        self.version = version
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.kernel_size = kernel_size
        self.include_preprocessing = include_preprocessing
        self.image_shape = image_shape
        self.data_format = data_format

    def get_config(self):
        config = super().get_config()
        config.update(
            stage_depths=list(self.stage_depths),
            stage_dims=list(self.stage_dims),
            version=self.version,
            layer_scale_init_value=self.layer_scale_init_value,
            drop_path_rate=self.drop_path_rate,
            kernel_size=self.kernel_size,
            include_preprocessing=self.include_preprocessing,
            image_shape=list(self.image_shape),
            data_format=self.data_format,
        )
        return config

    presets = _ClassProperty(_our_presets)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """A backbone of a registry release (`"convnext_v2_tiny_imagenet"`) or any keras-hub preset.

        Registry presets take the constructor's `image_shape`, `data_format`,
        `dtype`, `drop_path_rate` as keyword arguments; the release's
        weights load at any image size (the network is fully convolutional).
        """
        entry = preset_table.lookup(preset)
        if entry is None:
            return super().from_preset(preset, load_weights=load_weights, **kwargs)
        variant = _pyramid_variant(entry)
        backbone = cls(variant.stage_depths, variant.stage_dims, version=variant.version, **kwargs)
        if load_weights:
            registry.load_pretrained(backbone, entry)
        return backbone


@keras.saving.register_keras_serializable(package="keras_convnext")
class ConvNeXtImageClassifier(keras_hub.models.ImageClassifier):
    """ConvNeXt's classifier as a keras-hub `ImageClassifier`.

    The official head: global average pooling, LayerNorm, (dropout,) Dense.
    keras-hub's `ImageClassifier` head has no LayerNorm, so this class builds
    its own, with the layer names (`head_norm`, `predictions`) that the
    official checkpoints map to.

    Args:
        backbone: a `ConvNeXtBackbone`.
        num_classes: number of classes.
        preprocessor: None (the backbone normalizes pixels in [0, 255]
            itself) or a keras-hub `ImageClassifierPreprocessor` (resizing,
            augmentation) whose output stays in [0, 255].
        pooling: `"avg"` (ConvNeXt's) or `"max"`.
        activation: of the last Dense; None gives logits (keras-hub's default).
        dropout: rate before the last Dense.
        head_dtype: dtype policy of the head; default the backbone's.

    Input: images of the backbone's `image_shape`, pixels in [0, 255].
    Output: `(batch, num_classes)`.
    """

    backbone_cls = ConvNeXtBackbone
    preprocessor_cls = None

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        pooling="avg",
        activation=None,
        dropout=0.0,
        head_dtype=None,
        **kwargs,
    ):
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max'; got {pooling!r}.")
        head_dtype = head_dtype or backbone.dtype_policy
        data_format = getattr(backbone, "data_format", None)
        self.backbone = backbone
        self.preprocessor = preprocessor
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        self.pooler = pool(data_format, dtype=head_dtype, name="avg_pool" if pooling == "avg" else "max_pool")
        self.head_norm = LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=head_dtype, name="head_norm")
        self.output_dropout = keras.layers.Dropout(dropout, dtype=head_dtype, name="output_dropout")
        self.output_dense = keras.layers.Dense(
            int(num_classes), activation=activation, kernel_initializer=kernel_init(), dtype=head_dtype,
            name="predictions",
        )

        inputs = self.backbone.input
        x = self.backbone(inputs)
        x = self.pooler(x)
        x = self.head_norm(x)
        x = self.output_dropout(x)
        outputs = self.output_dense(x)
        # keras-hub's Task, skipping ImageClassifier's own head (no LayerNorm).
        keras_hub.models.Task.__init__(self, inputs=inputs, outputs=outputs, **kwargs)

        self.num_classes = num_classes
        self.activation = activation
        self.pooling = pooling
        self.dropout = dropout

    presets = _ClassProperty(_our_presets)

    @classmethod
    def from_preset(cls, preset, load_weights=True, num_classes=None, **kwargs):
        """A classifier of a registry release (`"convnext_v2_tiny_imagenet"`) or any keras-hub preset.

        With a registry preset, `num_classes` defaults to the release's
        (1000, or 21841 for `imagenet22k`); another number gets a fresh
        classifier on the pretrained backbone and head LayerNorm (for
        fine-tuning), and an encoder-only `fcmae` release needs one and
        gets a fresh head. `image_shape`, `data_format`, `dtype` and
        `drop_path_rate` go to the backbone, the rest to the constructor.
        """
        entry = preset_table.lookup(preset)
        if entry is None:
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            return super().from_preset(preset, load_weights=load_weights, **kwargs)
        num_classes = num_classes or entry.classes
        if num_classes is None:
            raise ValueError(
                f"The preset {preset!r} is an encoder without a classifier (FCMAE pre-training); "
                "pass num_classes= to get a fresh classifier on it."
            )
        backbone_arguments = ("image_shape", "data_format", "dtype", "drop_path_rate")
        backbone_kwargs = {name: kwargs.pop(name) for name in backbone_arguments if name in kwargs}
        backbone = cls.backbone_cls.from_preset(preset, load_weights=False, **backbone_kwargs)
        classifier = cls(backbone=backbone, num_classes=num_classes, **kwargs)
        if load_weights:
            registry.load_pretrained(classifier, entry)
        return classifier
