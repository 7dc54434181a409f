"""The block's Linear layers (1x1 convolutions on channels_last maps)."""

import keras
from keras import ops

from keras_convnext.ops.pointwise import linear


@keras.saving.register_keras_serializable(package="keras_convnext")
class PointwiseDense(keras.layers.Dense):
    """`keras.layers.Dense` over the last axis, through `keras_convnext.ops.linear`.

    Same weights and arguments as Dense (`kernel` `(in, out)`, `bias` `(out,)`);
    plain float layers take the backend's fastest formulation, and quantized
    or LoRA-enabled layers fall back to Dense itself.
    """

    def call(self, inputs, training=None):
        if self.quantization_mode is not None or getattr(self, "lora_enabled", False):
            return super().call(inputs, training=training)
        kernel = ops.cast(self.kernel, self.compute_dtype)
        bias = ops.cast(self.bias, self.compute_dtype) if self.use_bias else None
        outputs = linear(inputs, kernel, bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs
