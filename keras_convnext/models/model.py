"""The model class of every ConvNeXt: Keras' functional model with a direct eager inference path."""

import contextlib

import keras

from keras_convnext import config
from keras_convnext.layers.block import ConvNeXtBlock
from keras_convnext.layers.layer_norm import LayerNorm
from keras_convnext.layers.pointwise import PatchConv2D
from keras_convnext.layers.preprocessing import ImageNormalization
from keras_convnext.models.inputs import (
    build_training_state,
    check_batch,
    check_images,
    checked_images,
    checked_validation_data,
    kept_on_failure,
)
from keras_convnext.models.pyramid import build_pyramid_outputs
from keras_convnext.ops import platform

# Layers whose `call` at inference is all that `Layer.__call__` would run for
# them once built: no masks, no training-only behaviour, no quantized call
# (checked per call), float inputs cast to their compute dtype beforehand and
# the autocast scope entered as `Layer.__call__` would.
DIRECT_LAYER_TYPES = (
    ImageNormalization,
    PatchConv2D,
    LayerNorm,
    ConvNeXtBlock,
    keras.layers.Permute,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Dense,
    keras.layers.Activation,
)


def runs_layers_directly():
    """Whether an eager inference call takes the layer chain (`ConvNeXtModel.call`).

    Only PyTorch runs eagerly there: TensorFlow and JAX trace the model once
    into a graph, where Keras' per-layer Python costs nothing per call (for
    an eager call too: `tensorflow_compiled_inference`,
    `jax_compiled_inference`), and so does `torch.compile`
    (`jit_compile=True`), which keeps the graph. A fast path: not with the
    fast paths off (`keras_convnext.config`).
    """
    return platform.fast_backend() == "torch" and not platform.torch_compiling()


@keras.saving.register_keras_serializable(package="keras_convnext")
class ConvNeXtModel(keras.Model):
    """A functional Keras model (`ConvNeXtModel(inputs, outputs, name=...)`).

    Built, saved and loaded like `keras.Model(inputs, outputs)`. Two
    differences, both fast paths that `keras_convnext.config.set_fast_paths(False)`
    turns off (every call then runs the functional graph, as `keras.Model`
    does). On TensorFlow and JAX, an eager inference call (`model(x)`
    on concrete tensors) runs the model traced, as `predict` does
    (`tensorflow_compiled_inference`, `jax_compiled_inference`). On
    PyTorch, an inference call on concrete tensors (`predict`, `model(x)`)
    runs each layer's `call` in turn, skipping the per-layer
    `Layer.__call__` work (argument conversion, training and mask
    resolution, name scopes); it keeps the input casts and autocast scopes
    of mixed precision. That work is Python run per layer and call in eager
    mode, a large part of a small batch's time. The result is the same as the
    functional graph's, which every other call takes: training, masks,
    symbolic tensors, traced calls, and on PyTorch quantized layers, graphs
    that are not one chain of the layer types above, and layers with
    PyTorch forward hooks.
    """

    @property
    def pyramid_outputs(self):
        """`{"P2": ..., "P5": ...}`: the stage outputs at strides 4 to 32 (`build_pyramid_outputs`).

        keras-hub's `FeaturePyramidBackbone` contract, so the model can be
        the `image_encoder` of `keras_hub.models.RetinaNetBackbone` and
        `DeepLabV3Backbone`. Derived from the graph, so a model rebuilt by
        `from_config` or loaded from `.keras` has it too.
        """
        cache = self.__dict__.get("_pyramid_outputs_cache")
        if cache is None:
            cache = build_pyramid_outputs(self)
            # Past Keras' and PyTorch's attribute tracking, as the caches below.
            object.__setattr__(self, "_pyramid_outputs_cache", cache)
        return cache

    def call(self, inputs, training=None, mask=None):
        symbolic = isinstance(inputs, keras.KerasTensor)
        if not symbolic and platform.in_stateless_scope():
            # JAX's `fit`, `evaluate` and `predict` call the model through
            # `stateless_call`, past `__call__`'s check; each traced batch's shape is known.
            check_batch(self, inputs)
        # Under `keras.RematScope`, `training` can be a traced value, which
        # has no Python truth value: only a plain None or False is inference.
        inference = training is None or training is False
        if not inference or mask is not None or symbolic:
            return super().call(inputs, training=training, mask=mask)
        compiled = _compiled_eager_call(self, inputs)
        if compiled == "jax":
            # The stored values: under a mixed policy this call runs inside the
            # model's autocast scope, which would round float32 weights first.
            with platform.autocast_scope(None):
                trainable = [variable.value for variable in self.trainable_variables]
                non_trainable = [variable.value for variable in self.non_trainable_variables]
            return self.jax_compiled_inference()(trainable, non_trainable, inputs)
        if compiled == "tensorflow":
            return self.tensorflow_compiled_inference()(inputs)
        if not runs_layers_directly():
            return super().call(inputs, training=training, mask=mask)
        chain = self.layer_chain()
        if chain is None or not _direct_calls_apply(chain):
            return super().call(inputs, training=training, mask=mask)
        return self.call_layer_chain(inputs, chain)

    def jax_compiled_inference(self):
        """`f(trainable_values, non_trainable_values, inputs)`: the inference output, jitted.

        What an eager JAX call (`model(x)` on concrete arrays) runs: the
        model's `stateless_call` compiled once per input shape, as `predict`
        compiles it, instead of JAX running each operation as a program of
        its own, which is slower per call and much slower for a new input
        shape. The variables' current values are arguments, so assigned weights are
        always the ones used.
        """
        cache = self.__dict__.get("_jax_inference_cache")
        if cache is None:
            import jax

            def inference(trainable_values, non_trainable_values, inputs):
                # Traced as `predict` traces it, outside the autocast scope of
                # the eager call (which `Layer.__call__` of the model opens again).
                with platform.autocast_scope(None):
                    outputs, _ = self.stateless_call(trainable_values, non_trainable_values, inputs, training=False)
                return outputs

            cache = jax.jit(inference)
            # Past Keras' attribute tracking, as the layer chain's cache.
            object.__setattr__(self, "_jax_inference_cache", cache)
        return cache

    def tensorflow_compiled_inference(self):
        """`f(inputs)`: the inference output as a `tf.function`, what an eager TensorFlow call runs.

        Traced once per input shape (more general shapes after a retrace),
        as `predict` traces the model, instead of TensorFlow running each
        operation eagerly, several times slower. The function reads the variables themselves, so assigned weights are the
        ones used.
        """
        cache = self.__dict__.get("_tensorflow_inference_cache")
        if cache is None:
            import tensorflow as tf

            def inference(inputs):
                with platform.autocast_scope(None):  # as for JAX above
                    return self(inputs, training=False)

            cache = tf.function(inference, reduce_retracing=True)
            object.__setattr__(self, "_tensorflow_inference_cache", cache)
        return cache

    def call_layer_chain(self, inputs, chain=None):
        """The inference output computed by calling each layer's `call` in turn.

        `chain` defaults to `layer_chain()`; every backend can run this, the
        model's `call` takes it on PyTorch only.
        """
        chain = self.layer_chain() if chain is None else chain
        if chain is None:
            raise ValueError(f"{self.name} is not a single chain of known layers; call the model instead.")
        # Keras has no public form of what `Functional.call` does to its inputs first
        # (structure, dtype conversion); its own private step, so the result is the same.
        (x,) = self._standardize_inputs(inputs)
        if _one_dtype_throughout(chain):
            # Each layer's input is then already in its compute dtype, and no
            # layer reads its variables in another dtype: `Layer.__call__`
            # would cast nothing and enter no scope after the first input.
            first = chain[0]
            x = first.dtype_policy.convert_input(x, first.autocast, first.input_dtype)
            with _direct_weight_reads():
                for layer in chain:
                    x = layer.call(x)
            return x
        for layer in chain:
            x = layer.dtype_policy.convert_input(x, layer.autocast, layer.input_dtype)
            scope = _autocast_scope(layer)
            if scope is None:
                x = layer.call(x)
            else:
                with scope:
                    x = layer.call(x)
        return x

    def layer_chain(self):
        """The model's layers from input to output, or None unless it is one chain.

        A chain: one input, one output, and each layer called once in the
        model's graph on the previous layer's output alone, with no keyword
        arguments, and of a type in `DIRECT_LAYER_TYPES`.
        """
        cache = self.__dict__.get("_layer_chain_cache")
        if cache is None:
            # Past Keras' and PyTorch's attribute tracking: the chain holds
            # the model's own layers, which must not be tracked twice.
            cache = (_find_chain(self),)
            object.__setattr__(self, "_layer_chain_cache", cache)
        return cache[0]

    # Image inputs are checked before Keras traces anything, so that a wrong
    # shape gets an error in the user's terms and never costs the model its
    # weights (keras_convnext.models.inputs).

    def __call__(self, *args, **kwargs):
        images = args[0] if args else kwargs.get("inputs")
        check_images(self, images)
        return super().__call__(*args, **kwargs)

    def predict(self, x, *args, **kwargs):
        x = checked_images(self, x)
        with kept_on_failure(self):
            return super().predict(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        x = checked_images(self, x)
        with kept_on_failure(self):
            return super().evaluate(x, *args, **kwargs)

    def fit(self, x=None, *args, **kwargs):
        x = checked_images(self, x)
        if kwargs.get("validation_data") is not None:
            kwargs["validation_data"] = checked_validation_data(self, kwargs["validation_data"])
        build_training_state(self, x, *args, **kwargs)
        with kept_on_failure(self):
            return super().fit(x, *args, **kwargs)


def _compiled_eager_call(model, inputs):
    """The backend whose compiled inference runs this call ("jax", "tensorflow"), or None.

    Only eager calls on concrete tensors qualify. Traced calls (`predict`,
    `fit`, a user's `jax.jit` or `tf.function`), calls inside a stateless
    scope, and calls inside an autocast scope of another dtype than the
    model's own (which `Layer.__call__` opens under a mixed policy) keep the
    functional graph: the compiled program would not see those scopes. With
    the fast paths or compiled calls off (`keras_convnext.config`), every call keeps it.
    """
    backend = platform.fast_backend()
    if backend not in ("jax", "tensorflow") or not config.compiled_calls_enabled() or platform.in_stateless_scope():
        return None
    if backend == "jax":
        import jax

        if any(isinstance(leaf, jax.core.Tracer) for leaf in keras.tree.flatten(inputs)):
            return None
    else:
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
    scope = platform.current_autocast_scope()
    return backend if scope is None or scope.dtype == model.compute_dtype else None


def _find_chain(model):
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return None
    chain = []
    tensor = model.outputs[0]
    while tensor is not model.inputs[0]:
        # Keras has no public API that walks a functional model's graph node by
        # node with each call's arguments; its tensors' history and the layers'
        # nodes are the private form of it.
        layer, node_index, _ = tensor._keras_history
        if not isinstance(layer, DIRECT_LAYER_TYPES):
            return None
        node = layer._inbound_nodes[node_index]
        arguments = node.arguments
        if len(node.input_tensors) != 1 or len(arguments.args) != 1 or arguments.kwargs:
            return None
        if len(node.output_tensors) != 1:
            return None
        chain.append(layer)
        tensor = node.input_tensors[0]
    return tuple(reversed(chain))


def _autocast_scope(layer):
    """The autocast scope `Layer.__call__` enters around `layer.call`, or None.

    Under a mixed policy, Keras' own layers (the head's Dense) read their
    float32 variables in the compute dtype only inside such a scope.
    """
    current = platform.current_autocast_scope()
    if current is None:
        mixed = layer.compute_dtype != layer.variable_dtype
        return platform.autocast_scope(layer.compute_dtype) if mixed else None
    if not layer.autocast or not keras.backend.is_float_dtype(layer.compute_dtype):
        return platform.autocast_scope(None)
    if current.dtype == layer.compute_dtype:
        return None
    return platform.autocast_scope(layer.compute_dtype)


def _one_dtype_throughout(chain):
    """Whether every layer of `chain` computes in the dtype it stores its variables in, the
    same dtype for all, outside any autocast scope (a float32 or a plain bfloat16 model)."""
    if platform.current_autocast_scope() is not None:
        return False
    dtype = chain[0].dtype_policy.compute_dtype
    for layer in chain:
        policy = layer.dtype_policy
        if policy.compute_dtype != dtype or policy.variable_dtype != dtype:
            return False
    return True


def _direct_weight_reads():
    """`platform.weights_read_directly()` on PyTorch with the fast paths on, outside a
    stateless scope (the chain's caller has checked the autocast scope and the dtypes);
    elsewhere a block that changes nothing."""
    if platform.fast_backend() == "torch" and not platform.in_stateless_scope():
        return platform.weights_read_directly()
    return contextlib.nullcontext()


def _direct_calls_apply(chain):
    """No layer is quantized or has PyTorch hooks."""
    for layer in chain:
        if layer.dtype_policy.quantization_mode is not None:
            return False
        # On PyTorch, Layer.__call__ runs the torch.nn.Module hooks; `call` does not.
        # torch.nn.Module has no public API that tells whether hooks are registered.
        if getattr(layer, "_forward_hooks", None) or getattr(layer, "_forward_pre_hooks", None):
            return False
    return True
