"""JAX's fast paths: formulations that XLA compiles to faster programs, mostly on the CPU.

On the CPU, JAX's bfloat16 products ask XLA for a float32 result, which
XLA:CPU computes several times faster than a bfloat16 one; a small product
multiplies by the float32 kernel as stored instead of rounding the weights
on every call (`platform.float32_kernel_pays`); a larger one rounds the
kernel itself once its input exists (`rounded_after`); GRN folds into the
narrowing Linear where the map has more positions than the layer has
outputs (`grn_linear`); GELU keeps only its input for the backward pass
(`gelu`); the depthwise convolution is `ops.xla`'s shifted form, rounded
once to bfloat16 through integer operations (`round_to_bfloat16`).
Each function here computes what its namesake in `ops.portable` defines.
"""

import functools

import keras
from keras import ops

from keras_convnext.ops import platform, portable, xla

# --- Depthwise convolution ----------------------------------------------------


def depthwise_conv2d(inputs, kernel, bias=None):
    """`ops.xla`'s shifted multiply-adds, materialized once, with `xla.shifted_backward` as gradient.

    16-bit inputs are computed in float32 and the result rounded once:
    XLA:CPU runs the k*k multiply-adds several times faster in float32 than
    in bfloat16, and the sum no longer rounds to bfloat16 after every term.
    """
    if bias is None:
        bias = ops.zeros((inputs.shape[-1],), dtype=inputs.dtype)
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if dtype in ("bfloat16", "float16"):
        outputs = depthwise_conv2d(*(ops.cast(tensor, "float32") for tensor in (inputs, kernel, bias)))
        return round_to_bfloat16(outputs) if dtype == "bfloat16" else ops.cast(outputs, dtype)
    return _shifted_with_fast_gradient()(inputs, kernel, bias)


@functools.lru_cache(maxsize=None)
def _shifted_with_fast_gradient():
    import jax

    @jax.custom_vjp
    def convolve(inputs, kernel, bias):
        return xla.shifted_forward(inputs, kernel, bias)

    def forward(inputs, kernel, bias):
        return xla.shifted_forward(inputs, kernel, bias), (inputs, kernel, bias)

    def backward(saved, upstream):
        return xla.shifted_backward(*saved, upstream, fft_kernel_gradient)

    convolve.defvjp(forward, backward)
    # Jitted, so an eager call runs one compiled program per input shape,
    # not each of the k*k slices and multiply-adds as its own small program.
    # Inside a traced function the nested program is inlined.
    return jax.jit(convolve)


def fft_kernel_gradient(inputs, upstream, size):
    """`xla.depthwise_kernel_gradient` of a large map, through the Fourier domain (jnp.fft)."""
    import jax.numpy as jnp

    pad = size // 2
    _, height, width, _ = upstream.shape  # static under XLA, where this runs
    rows, cols = xla.fft_length(height + 2 * pad), xla.fft_length(width + 2 * pad)
    padded = jnp.pad(inputs, [[0, 0], [pad, rows - height - pad], [pad, cols - width - pad], [0, 0]])
    spectrum = jnp.fft.rfft2(padded, axes=(1, 2)) * jnp.conj(jnp.fft.rfft2(upstream, s=(rows, cols), axes=(1, 2)))
    correlation = jnp.fft.irfft2(jnp.sum(spectrum, axis=0), s=(rows, cols), axes=(0, 1))
    return correlation[:size, :size, :, None]


# --- Rounding to bfloat16 -----------------------------------------------------


def round_to_bfloat16(inputs):
    """float32 -> bfloat16, rounded to nearest even, through integer operations.

    XLA:CPU emits a float32 -> bfloat16 `convert` at the end of a fused loop
    in a form that costs the whole loop its vectorized speed; the same
    rounding written on the bit pattern gives the same bits and keeps the
    loop fast. Adding `0x7FFF` plus the lowest kept bit to the float32 bit
    pattern and keeping its upper 16 bits is round-to-nearest-even of the
    mantissa; a carry into the exponent gives the next power of two, or
    infinity past bfloat16's largest value, as `convert` does. NaN is passed
    through as NaN (the sum could carry a NaN's payload into the sign bit).
    The gradient is that of a cast: the upstream gradient in float32.
    """
    return _integer_rounding()(inputs)


@functools.lru_cache(maxsize=None)
def _integer_rounding():
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


# --- Linear layers --------------------------------------------------------------


def linear(inputs, kernel, bias=None, gelu=False):
    """`portable.linear` (with `gelu`, `portable.linear_gelu`) for bfloat16 inputs on the CPU.

    XLA:CPU's bfloat16 product with a bfloat16 result is no faster than its
    float32 product (slower at some shapes); asked for a float32 result, it
    takes a much faster path. The bias and GELU then run on the float32
    result inside the same fused loop, which rounds once to bfloat16. A
    float32 kernel, as the layers hand it over (`platform.reads_stored_kernel`),
    takes the float32 product on the inputs widened to float32 where
    `platform.float32_kernel_pays`; elsewhere it is rounded to bfloat16 here,
    once the inputs exist (`rounded_after`).
    """
    import jax
    import jax.numpy as jnp

    inputs, kernel = ops.convert_to_tensor(inputs), ops.convert_to_tensor(kernel)  # Keras variables too
    dimensions = (((inputs.ndim - 1,), (0,)), ((), ()))
    operand = inputs
    if inputs.dtype != kernel.dtype:
        if platform.float32_kernel_pays(_static_positions(inputs.shape), inputs.dtype, kernel.dtype):
            operand = inputs.astype(kernel.dtype)
        else:
            kernel = rounded_after(kernel, inputs)
    outputs = jax.lax.dot_general(operand, kernel, dimensions, preferred_element_type=jnp.float32)
    if bias is not None:
        outputs = outputs + ops.cast(bias, "float32")
    if gelu:
        outputs = _gelu()(outputs)
    return outputs.astype(inputs.dtype)


def linear_gelu(inputs, kernel, bias=None):
    """`portable.linear_gelu`: `linear` with GELU in bfloat16 on the CPU, else the product and `gelu`."""
    if platform.jax_bfloat16_on_cpu(inputs, kernel):
        return linear(inputs, kernel, bias, gelu=True)
    return gelu(portable.linear(inputs, kernel, bias))


def _static_positions(shape):
    """The rows of a Linear over the last axis of `shape`, or None where a size is unknown."""
    positions = 1
    for size in shape[:-1]:
        if size is None:
            return None
        positions *= size
    return positions


def rounded_after(kernel, inputs):
    """`kernel` rounded to the dtype of `inputs`, in a computation XLA can start only once `inputs` exist.

    XLA:CPU's scheduler rounds every weight at the start of the program, as
    soon as it may: a weight depends on nothing else. All the rounded copies
    then live until their products, in XLA's temporary buffer, which is
    mapped afresh on every call, so that every page of it faults when first
    written. Tied to the product's input, each weight is rounded just before
    its product, into memory that the next rounded weight reuses.

    The tie is an exact zero subtracted from the kernel (`-0.0 - 0.0` stays
    `-0.0`), made from the bits of one input value by an integer clamp to
    [0, 0]: whatever that value is (NaN and infinities included), the zero
    is exact, and no gradient flows through it. XLA folds `bits & 0` and
    `bits ^ bits` away; it keeps the clamp. Under a Keras distribution the
    inputs are split across devices, and the replicated kernel tied to one
    value of them would wait for that value to reach every device before
    each product: there the kernel is simply cast.
    """
    import jax
    import jax.numpy as jnp

    if any(size == 0 for size in inputs.shape) or platform.distributed():
        return kernel.astype(inputs.dtype)
    first = jax.lax.stop_gradient(inputs[(0,) * inputs.ndim]).astype(jnp.float32)
    zero = jax.lax.clamp(0, jax.lax.bitcast_convert_type(first, jnp.int32), 0)
    return (kernel - zero.astype(kernel.dtype)).astype(inputs.dtype)


def gelu(x):
    """The exact GELU, `keras.activations.gelu(x, approximate=False)`, whose gradient keeps
    only its input for the backward pass.

    Differentiated as written, `x * Phi(x)` keeps several maps of the
    block's widest size from the forward pass (the erf terms of its
    derivative), which XLA:CPU keeps in a training step's temporary buffer,
    mapped afresh (and page-faulted) on every step.

    The forward pass is `x * (1 + erf(x / sqrt 2)) / 2`, PyTorch's own
    formula; `jax.nn.gelu` writes it with `erfc`, which XLA:CPU computes
    more slowly. Like PyTorch's, it is exactly 0 far enough below zero,
    which GRN's norm must take: see `portable.norm_from_sum_of_squares`.
    """
    return _gelu()(x)


@functools.lru_cache(maxsize=None)
def _gelu():
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def gelu(x):
        return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))

    def forward(x):
        return gelu(x), x

    def backward(x, upstream):
        # The barrier keeps XLA from sharing `erf(x / sqrt 2)` with the forward
        # pass, which would keep that map alive until here.
        x = jax.lax.optimization_barrier(x)
        cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
        pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return (upstream * (cdf + x * pdf),)

    gelu.defvjp(forward, backward)
    return gelu


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# --- GRN and the narrowing Linear -------------------------------------------------


def grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    """`portable.grn_linear` with GRN folded into the product, for bfloat16 on the CPU.

    GRN's output `x * s + beta` (`s` per sample and channel, `portable.grn_scale`)
    feeds the Linear layer alone, and `(x * s + beta) @ W + b = x @ (s * W) + (beta @ W + b)`.
    Unfolded, XLA widens the bfloat16 map to a float32 copy for GRN's
    statistics and for its scale and shift, and the reduction reads that copy
    again. Folded, the map is read only by the statistics (which widen it as
    they read) and by the product. The per-sample weights `s * W` are made
    from the float32 kernel and rounded once, which also rounds the kernel
    only once the map exists (see `rounded_after`). Applies where
    `platform.grn_fold_applies`.
    """
    import jax
    import jax.numpy as jnp

    _, height, width, channels = inputs.shape
    inputs, kernel = ops.convert_to_tensor(inputs), ops.convert_to_tensor(kernel)
    factor = portable.grn_scale_float32(inputs, gamma, epsilon)
    kernel32 = kernel.astype(jnp.float32)
    weights = (jnp.reshape(factor, (-1, channels, 1)) * kernel32).astype(inputs.dtype)
    folded_bias = ops.cast(beta, "float32") @ kernel32
    if bias is not None:
        folded_bias = folded_bias + ops.cast(bias, "float32")
    outputs = jax.lax.dot_general(
        jnp.reshape(inputs, (-1, height * width, channels)),
        weights,
        (((2,), (1,)), ((0,), (0,))),
        preferred_element_type=jnp.float32,
    )
    outputs = (outputs + folded_bias).astype(inputs.dtype)
    return jnp.reshape(outputs, (-1, height, width, kernel.shape[-1]))
