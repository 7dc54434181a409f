"""Counting a model's FLOPs, as the ConvNeXt paper counts them, and parameters.

The paper's "FLOPs" are multiply-accumulates, as fvcore counts them: a
convolution or dense layer counts one per multiply-add (biases are not
counted), and a few elementwise layers a fixed amount per element.
`layer_flops` follows those rules for Keras layers:

| layer | FLOPs per image |
|---|---|
| `Conv2D` (full or grouped) | output elements x kernel height x kernel width x input channels / groups |
| `DepthwiseConv2D` | output elements x kernel height x kernel width |
| `Dense` | output elements x input features |
| `BatchNormalization` | 2 per element (inference: one scale, one shift) |
| `LayerNormalization` | 5 per element (fvcore's estimate) |
| `GlobalAveragePooling2D` | 1 per input element |
| anything else | 0 (activations, residual sums, max pooling, padding, layer scale) |

With `elementwise=False` only the convolutions and dense layers count, as
in torchvision's model tables (ResNet-50: 4.09 GFLOPs).
"""

import math

import keras


def _conv(layer, input_shape, output_shape):
    kernel_height, kernel_width = layer.kernel_size
    return math.prod(output_shape) * kernel_height * kernel_width * input_shape[-1] // layer.groups


def _depthwise_conv(layer, input_shape, output_shape):
    # Keras counts a depth multiplier in the output channels.
    kernel_height, kernel_width = layer.kernel_size
    return math.prod(output_shape) * kernel_height * kernel_width


def _dense(layer, input_shape, output_shape):
    return math.prod(output_shape) * input_shape[-1]


def _batch_norm(layer, input_shape, output_shape):
    return (2 if layer.scale or layer.center else 1) * math.prod(input_shape)


def _layer_norm(layer, input_shape, output_shape):
    return (5 if layer.scale or layer.center else 4) * math.prod(input_shape)


def _average_pool(layer, input_shape, output_shape):
    return math.prod(input_shape)


_MULTIPLY_ACCUMULATES = (
    (keras.layers.DepthwiseConv2D, _depthwise_conv),
    (keras.layers.Conv2D, _conv),
    (keras.layers.Dense, _dense),
)
_ELEMENTWISE = (
    (keras.layers.BatchNormalization, _batch_norm),
    (keras.layers.LayerNormalization, _layer_norm),
    (keras.layers.GlobalAveragePooling2D, _average_pool),
)


def _counter(layer, elementwise):
    rules = _MULTIPLY_ACCUMULATES + (_ELEMENTWISE if elementwise else ())
    return next((count for kind, count in rules if isinstance(layer, kind)), None)


def layer_flops(model, elementwise=True):
    """`{layer name: FLOPs}` for one image, over the counted layers of `model`.

    `model` is a functional `keras.Model` built for one input size, channels
    last, whose convolutions, dense layers and norms are its own top-level
    layers (as the roadmap networks are); a ValueError says what is wrong
    otherwise. See the module docstring for the rules.
    """
    counts = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"layer_flops counts a model's own layers, and {layer.name!r} is a nested model: "
                "count it on its own."
            )
        counter = _counter(layer, elementwise)
        if counter is None:
            continue
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise ValueError(f"layer_flops counts channels-last layers; {layer.name!r} is channels first.")
        input_shape, output_shape = tuple(layer.input.shape)[1:], tuple(layer.output.shape)[1:]
        if None in input_shape or None in output_shape:
            raise ValueError(
                f"layer_flops needs a model built for one input size, but layer {layer.name!r} takes "
                f"inputs of shape {(None,) + input_shape}. Build it with a full input_shape, "
                "for example (224, 224, 3)."
            )
        counts[layer.name] = counter(layer, input_shape, output_shape)
    return counts


def count_flops(model, elementwise=True):
    """FLOPs (multiply-accumulates) of one forward pass of one image, an integer.

    Divide by 1e9 for the GFLOPs of the ConvNeXt paper. See `layer_flops`.
    """
    return sum(layer_flops(model, elementwise).values())


def count_parameters(model):
    """Learned parameters: trainable weights only, as PyTorch counts them.

    A BatchNorm's moving mean and variance are state, not parameters (PyTorch
    keeps them as buffers), so this is `model.count_params()` less those.
    """
    return sum(math.prod(weight.shape) for weight in model.trainable_weights)
