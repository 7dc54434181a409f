"""LayerNorm over the channels, through the backend's fastest formulation."""

import keras

from keras_convnext.layers.compute_dtype import in_dtype, weight_value
from keras_convnext.ops import layer_norm


@keras.saving.register_keras_serializable(package="keras_convnext")
class LayerNorm(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` over the last axis, through `keras_convnext.ops.layer_norm`.

    Same weights and arguments as LayerNormalization (`gamma` and `beta` of
    shape `(channels,)`). Keras computes it in float32 whatever the compute
    dtype; on PyTorch the kernel reads bfloat16 inputs as they are and
    accumulates in float32 itself. Other axes, RMS scaling, or a layer
    without centering or scaling fall back to LayerNormalization itself.
    """

    def call(self, inputs):
        axis = tuple(self.axis) if isinstance(self.axis, (list, tuple)) else (self.axis,)
        last_axis_only = axis in ((-1,), (len(inputs.shape) - 1,))
        if not last_axis_only or self.rms_scaling or not (self.center and self.scale):
            return super().call(inputs)
        gamma, beta = weight_value(self.gamma), weight_value(self.beta)
        return layer_norm(in_dtype(inputs, self.compute_dtype), gamma, beta, self.epsilon)
