"""float32 to bfloat16 rounding that XLA:CPU keeps vectorized.

XLA:CPU emits a float32 -> bfloat16 `convert` at the end of a fused loop in a
form that costs the whole loop its speed: V2 Tiny's depthwise convolution at
(8, 56, 56, 96), 49 multiply-adds in float32, took 4.84 ms with a bfloat16
result and 2.52 ms with a float32 one (AMD EPYC Zen 5; benchmarks/README.md,
item 40). The same rounding written with integer operations, round to nearest
even on the bit pattern, gives the same bits and left that loop at 2.72 ms.
"""

import functools

import keras
from keras import ops


def portable_round_to_bfloat16(inputs):
    """`ops.cast(inputs, "bfloat16")`: the reference for `round_to_bfloat16`."""
    return ops.cast(inputs, "bfloat16")


def cast_rounded(inputs, dtype):
    """`ops.cast(inputs, dtype)`; float32 to bfloat16 on JAX's CPU through `round_to_bfloat16`."""
    from keras_convnext.ops.depthwise import _jax_on_cpu  # that module imports this one

    if (
        keras.backend.standardize_dtype(dtype) == "bfloat16"
        and keras.backend.standardize_dtype(inputs.dtype) == "float32"
        and keras.backend.backend() == "jax"
        and _jax_on_cpu()
    ):
        return round_to_bfloat16(inputs)
    return ops.cast(inputs, dtype)


def round_to_bfloat16(inputs):
    """float32 -> bfloat16, rounded to nearest even, through integer operations (JAX).

    Adding `0x7FFF` plus the lowest kept bit to the float32 bit pattern and
    keeping its upper 16 bits is round-to-nearest-even of the mantissa; a
    carry into the exponent gives the next power of two, or infinity past
    bfloat16's largest value, as `convert` does. NaN is passed through as NaN
    (the sum could carry a NaN's payload into the sign bit). The gradient is
    that of a cast: the upstream gradient in float32.
    """
    return _jax_rounding()(inputs)


@functools.lru_cache(maxsize=None)
def _jax_rounding():
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def rounded(x):
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        upper = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        # NaN (any bits past infinity's) stays NaN: its upper half, made quiet.
        # Written on the bits too: a test on `x` made XLA write `x` out in float32.
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        upper = jnp.where(nan, (bits >> 16) | 0x40, upper)
        return jax.lax.bitcast_convert_type(upper.astype(jnp.uint16), jnp.bfloat16)

    def forward(x):
        return rounded(x), None

    def backward(_, upstream):
        return (upstream.astype(jnp.float32),)

    rounded.defvjp(forward, backward)
    return rounded
