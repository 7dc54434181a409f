"""Per-position operations: Linear, LayerNorm, GRN, and the patch (stride = kernel) convolution.

PyTorch's eager mode runs each operation as its own pass over memory, so on
that backend the fast paths fuse what they can: the Linear bias goes into
the matrix product, and GRN's scale-and-shift is one `addcmul`. oneDNN's
kernels use AVX-512 where MKL's `addmm` does not on every processor: at
inference the Linear is oneDNN's matrix product, with GELU applied as it
writes (float32 keeps `addmm` on Intel processors, where MKL takes its
AVX-512 path, and on processors without AVX-512: `_addmm_wins_on`); in
training, from 1024 positions up, it is a 1x1 convolution over the
channels_last memory, which PyTorch hands to oneDNN
(1.6x-2.2x faster forward+backward at ConvNeXt V2 Tiny's shapes on an AMD
EPYC, see benchmarks/README.md). TensorFlow's graphs without XLA also run each
operation as its own pass: there the Linear is written in the form its
graph optimizer hands to oneDNN as one product with bias and GELU,
GRN's scale and shift fold into the product that follows, and LayerNorm
takes the form that the optimizer turns into oneDNN's one-pass kernel
(not in exported artifacts, see `tracing_for_export`). XLA (JAX,
TensorFlow with `jit_compile`) fuses the portable formulations by itself;
on the CPU, JAX's bfloat16 products ask for a float32 result, which
XLA:CPU computes several times faster than a bfloat16 one, a small product
(up to 256 rows) multiplies by the float32 kernel as stored instead of
rounding the weights on every call (`float32_kernel_pays`), a larger one
rounds the kernel itself once its input exists (`_rounded_after`), GRN
folds into the narrowing Linear where the map has more positions than the
layer has outputs (`_jax_grn_linear`), and JAX's GELU keeps only its input
for the backward pass (`_jax_gelu`).
"""

import contextlib
import functools
import threading

import keras
from keras import ops

from keras_convnext.ops.depthwise import _jax_on_cpu, _tensorflow_in_xla


def portable_linear(inputs, kernel, bias=None):
    """`inputs @ kernel + bias` over the last axis; kernel `(in, out)`."""
    outputs = ops.matmul(inputs, kernel)
    return outputs if bias is None else outputs + bias


# Below this many positions the 1x1 convolution loses: oneDNN re-lays out the
# whole weight on every call (about 4 ns per weight element), which costs more
# than a small product saves. At ConvNeXt V2 Tiny's last stage, batch 1 (49
# positions, 768 -> 3072): `addmm` 1.7 ms, the convolution 11.8 ms; at 196
# positions, 384 -> 1536: 1.2 ms against 1.8 ms; from about 1000 positions on
# they are even or the convolution wins. Whole-model A/B (V2 Tiny, same
# process): from 1024 positions on, batch 1 took 80-84 ms against 88-94 ms
# from 128 on, and batch 8 637-659 ms against 664-704 ms.
# On a GPU the convolution is cuDNN's, which converts layouts around it: V2
# Tiny at batch 8 on an H100 ran 51 convolutions, 59 copies and 33 layout
# kernels a pass, 576 kernels against the reference's 301, and its host side
# took 14.7 ms a pass (the GPU busy 7.0 ms of it) against 6.7 ms for the
# whole reference pass.
# There every Linear is `addmm`, as in the reference model.
_TORCH_CONV_MIN_POSITIONS = 1024


def _torch_linear(inputs, kernel, bias=None, gelu=False):
    import torch
    import torch.nn.functional as F

    kernel, bias = (None if weight is None else _torch_tensor(weight) for weight in (kernel, bias))
    channels = inputs.shape[-1]
    positions = inputs.numel() // max(channels, 1)
    inference = _torch_inference_matmul_applies(inputs)
    if inference and _torch_onednn_product_wins(inputs.dtype):
        # oneDNN's matrix product reads the plain weight as it is (no re-layout,
        # unlike its convolution) and can apply GELU as it writes the output:
        # one pass less over the block's widest tensor. V2 Tiny, one block per
        # stage, both Linear layers and GELU, float32: batch 1 13.0 ms with
        # `addmm` -> 9.3 ms, batch 8 101 ms with the convolution -> 87 ms;
        # bfloat16 batch 8 50 -> 42 ms. It has no gradient: inference only.
        activation = ("gelu", [None], "none") if gelu else ("none", [], "")
        outputs = torch.ops.mkldnn._linear_pointwise(inputs.reshape(-1, channels), kernel.t(), bias, *activation)
        return outputs.reshape(*inputs.shape[:-1], kernel.shape[-1])
    if (
        not inference
        and inputs.device.type == "cpu"  # cuBLAS' `addmm` is the GPU's product, as in the reference model
        and inputs.dtype in (torch.float32, torch.bfloat16)
        and positions >= _TORCH_CONV_MIN_POSITIONS
    ):
        # Any other rank (the FCMAE fast path's gathered tokens) is viewed as
        # one (1, positions, 1, channels) map. permute() only relabels strides:
        # the 1x1 convolution reads the NHWC memory as a channels_last NCHW
        # tensor and writes channels_last.
        maps = inputs if inputs.ndim == 4 else inputs.reshape(1, positions, 1, channels)
        weight = kernel.t()[:, :, None, None]
        outputs = F.conv2d(maps.permute(0, 3, 1, 2), weight, bias).permute(0, 2, 3, 1)
        outputs = outputs if inputs.ndim == 4 else outputs.reshape(*inputs.shape[:-1], kernel.shape[-1])
    else:
        flat = inputs.reshape(-1, channels)
        outputs = torch.mm(flat, kernel) if bias is None else torch.addmm(bias, flat, kernel)
        outputs = outputs.reshape(*inputs.shape[:-1], kernel.shape[-1])
    if gelu and inference:
        # In place on the product just made: no second block as large as the
        # block's widest tensor (see `_TORCH_CHUNK_BYTES`).
        return torch._C._nn.gelu_(outputs)
    return F.gelu(outputs) if gelu else outputs


@functools.lru_cache(maxsize=None)
def _torch_addmm_wins():
    """Whether PyTorch's float32 `addmm` beats oneDNN's product at inference on this processor."""
    import torch

    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return _addmm_wins_on(_cpu_vendor(), capability, bool(torch.backends.mkl.is_available()))


def _addmm_wins_on(vendor, capability, mkl):
    """The rule behind `_torch_addmm_wins`, from the processor's vendor, PyTorch's
    vector capability ("AVX512", "AVX2", ...) and whether `addmm` is MKL's.

    oneDNN uses AVX-512 wherever the processor has it; MKL takes its AVX-512
    path only on Intel processors. So oneDNN's product (with GELU fused) wins
    on an AMD EPYC with AVX-512 (batch 1 13.0 -> 9.3 ms for one block per
    stage), and MKL's `addmm` with a separate GELU wins where both use the same
    instructions: an Intel Xeon with AMX (V2 Tiny, one process, alternating:
    batch 1 1.11x faster, batch 8 even) and an AMD EPYC with AVX2 only (batch 1
    1.37x, batch 8 1.46x; oneDNN re-lays out the Keras (in, out) kernel there).
    Without MKL, oneDNN's product.
    """
    if not mkl:
        return False
    return "GenuineIntel" in vendor or not capability.upper().startswith("AVX512")


def _cpu_vendor():
    vendor = _cpuinfo_field("vendor_id")
    if vendor is not None:
        return vendor
    import platform

    return platform.processor()  # Windows: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel"


def _cpuinfo_field(name):
    """The first `name` field of Linux's /proc/cpuinfo ("vendor_id", "flags"), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _torch_inference_matmul_applies(inputs):
    import torch

    return (
        not torch.is_grad_enabled()  # the fused kernel has no gradient
        and not _torch_compiling()  # torch.compile picks its own kernels
        and inputs.device.type == "cpu"
        and inputs.dtype in (torch.float32, torch.bfloat16)
    )


def _torch_onednn_product_wins(dtype):
    """Whether a Linear at inference, in `dtype`, takes oneDNN's product (else `addmm`)."""
    import torch

    if dtype == torch.float32 and _torch_addmm_wins():
        return False
    return _torch_inference_matmul_works(dtype)


def _torch_compiling():
    import torch

    is_compiling = getattr(torch.compiler, "is_compiling", None)  # PyTorch 2.3 and later
    if is_compiling is None:
        import torch._dynamo

        is_compiling = torch._dynamo.is_compiling
    return bool(is_compiling())


@functools.lru_cache(maxsize=None)
def _torch_inference_matmul_works(dtype):
    """Whether this PyTorch has oneDNN's matrix product with GELU in `dtype` (a torch
    dtype) on this processor, giving the expected result.

    The operator is internal to PyTorch (it serves `torch.compile`), so it is
    checked once per dtype against the separate operations before it is used.
    In bfloat16 oneDNN needs the processor's AVX-512 (an AMD EPYC with AVX2
    only has no bfloat16 product: "could not create a primitive descriptor").
    """
    import torch
    import torch.nn.functional as F

    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(6, 3, generator=generator).to(dtype)
        kernel = torch.randn(3, 5, generator=generator).to(dtype)
        bias = torch.randn(5, generator=generator).to(dtype)
        with torch.no_grad():
            plain = torch.ops.mkldnn._linear_pointwise(x, kernel.t(), bias, "none", [], "")
            fused = torch.ops.mkldnn._linear_pointwise(x, kernel.t(), bias, "gelu", [None], "none")
            expected = torch.addmm(bias.float(), x.float(), kernel.float())
            return bool(
                torch.allclose(plain.float(), expected, atol=tolerance, rtol=tolerance)
                and torch.allclose(fused.float(), F.gelu(expected), atol=tolerance, rtol=tolerance)
            )
    except (AttributeError, RuntimeError, TypeError):
        return False


def _tensorflow_linear(inputs, kernel, bias=None, gelu=False):
    import tensorflow as tf

    # TensorFlow's graph optimizer hands a 2-D MatMul -> BiasAdd -> GELU chain
    # to oneDNN as one fused product that applies the bias and GELU as it
    # writes. `keras.ops.matmul` on a 4-D map and a separate `+ bias` do not
    # match that pattern, and GELU then is a pass of its own, very slow in
    # bfloat16. Widening Linear with GELU at (8, 56, 56, 96) -> 384 channels,
    # in a tf.function: float32 32.6 -> 20.6 ms, bfloat16 45.5 -> 10.9 ms.
    channels = inputs.shape[-1]
    outputs = tf.matmul(tf.reshape(inputs, (-1, channels)), kernel)
    if bias is not None:
        outputs = tf.nn.bias_add(outputs, bias)
    if gelu:
        outputs = tf.nn.gelu(outputs, approximate=False)
    # Static sizes stay static; unknown ones (the batch) are read at run time.
    leading = [size if size is not None else tf.shape(inputs)[axis] for axis, size in enumerate(inputs.shape[:-1])]
    return tf.reshape(outputs, leading + [kernel.shape[-1]])


def _jax_linear(inputs, kernel, bias=None, gelu=False):
    import jax
    import jax.numpy as jnp

    # XLA:CPU's bfloat16 product with a bfloat16 result is no faster than its
    # float32 product (slower at some shapes); asked for a float32 result, it
    # takes a 2x-4x faster path. The bias and GELU then run on the float32
    # result inside the same fused loop, which rounds once to bfloat16.
    # Batch 8: (8, 56, 56, 384) x (384, 96) 27.3 -> 6.5 ms, with GELU
    # (8, 56, 56, 96) x (96, 384) 35.4 -> 23.6 ms.
    # A float32 kernel, as the layers hand it over (`reads_stored_kernel`),
    # takes the float32 product on the inputs widened to float32 where
    # `float32_kernel_pays`; elsewhere it is rounded to bfloat16 here, once
    # the inputs exist (`_rounded_after`).
    inputs, kernel = ops.convert_to_tensor(inputs), ops.convert_to_tensor(kernel)  # Keras variables too
    dimensions = (((inputs.ndim - 1,), (0,)), ((), ()))
    operand = inputs
    if inputs.dtype != kernel.dtype:
        if float32_kernel_pays(_static_positions(inputs.shape), inputs.dtype, kernel.dtype):
            operand = inputs.astype(kernel.dtype)
        else:
            kernel = _rounded_after(kernel, inputs)
    outputs = jax.lax.dot_general(operand, kernel, dimensions, preferred_element_type=jnp.float32)
    if bias is not None:
        outputs = outputs + ops.cast(bias, "float32")
    if gelu:
        outputs = _jax_gelu()(outputs)
    return outputs.astype(inputs.dtype)


def _static_positions(shape):
    """The rows of a Linear over the last axis of `shape`, or None where a size is unknown."""
    positions = 1
    for size in shape[:-1]:
        if size is None:
            return None
        positions *= size
    return positions


def _rounded_after(kernel, inputs):
    """`kernel` rounded to the dtype of `inputs`, in a computation XLA can start only once `inputs` exist.

    XLA:CPU's scheduler rounds every weight at the start of the program, as
    soon as it may: a weight depends on nothing else. All the rounded copies
    then live until their products, in XLA's temporary buffer, which is
    mapped afresh on every call, so that every 4 KB page of it faults when
    first written. Tied to the product's input, each weight is rounded just
    before its product, into memory that the next rounded weight reuses. V2
    Tiny in `mixed_bfloat16` at batch 8: the temporary buffer 119 -> 69 MB,
    29.1k -> 16.9k page faults a call, `predict_on_batch` 216.8-224.1 ->
    204.4-209.7 ms (benchmarks/README.md, item 44).

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

    if any(size == 0 for size in inputs.shape) or keras.distribution.distribution() is not None:
        return kernel.astype(inputs.dtype)
    first = jax.lax.stop_gradient(inputs[(0,) * inputs.ndim]).astype(jnp.float32)
    zero = jax.lax.clamp(0, jax.lax.bitcast_convert_type(first, jnp.int32), 0)
    return (kernel - zero.astype(kernel.dtype)).astype(inputs.dtype)


@functools.lru_cache(maxsize=None)
def _jax_gelu():
    """The exact GELU whose gradient keeps only its input for the backward pass.

    Differentiated as written, `x * Phi(x)` keeps several maps of the
    block's widest size from the forward pass (the erf terms of its
    derivative). XLA:CPU lays out a training step's temporaries in one block
    mapped afresh on every step, whose every page then faults: V2 Tiny at
    batch 16 kept 3796 MB there, 2749 MB with this GELU (same compiler
    settings, one process).

    The forward pass is `x * (1 + erf(x / sqrt 2)) / 2`, PyTorch's own
    formula; `jax.nn.gelu` writes it with `erfc`, which XLA:CPU computes
    more slowly. The product (3136, 96) x (96, 384) took 1.05 ms alone,
    2.28 ms with `erfc`'s GELU and 1.44 ms with `erf`'s; V2 Tiny jitted,
    alternating in one process: batch 1 56.7 -> 53.7 ms (1.05x), batch 8
    567 -> 533 ms (1.10x). Like PyTorch's, it is exactly 0 from about -5.4 down
    (the `erfc` form is below 1e-7 in size there, and 0 below about -13),
    which GRN's norm must take: see `_norm_from_sum_of_squares`.
    """
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def gelu(x):
        return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))

    def forward(x):
        return gelu(x), x

    def backward(x, upstream):
        # The barrier keeps XLA from sharing `erf(x / sqrt 2)` with the forward
        # pass, which would keep that map alive until here (+524 MB of V2
        # Tiny's training temporary at batch 16).
        x = jax.lax.optimization_barrier(x)
        cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
        pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return (upstream * (cdf + x * pdf),)

    gelu.defvjp(forward, backward)
    return gelu


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _jax_bfloat16_on_cpu(inputs, kernel):
    """bfloat16 inputs on JAX's CPU, with a bfloat16 kernel or the float32 one of `reads_stored_kernel`."""
    return (
        keras.backend.standardize_dtype(inputs.dtype) == "bfloat16"
        and keras.backend.standardize_dtype(kernel.dtype) in ("bfloat16", "float32")
        and _jax_on_cpu()
    )


# Up to this many positions (rows of the product), a bfloat16 Linear on JAX's
# CPU reads its float32 kernel as stored. Rounding the kernel to bfloat16 is a
# pass over the weights on every call, which a small product does not pay
# back: in a V2 Tiny batch-1 pass that conversion was 22 of 46 ms (XLA's
# profile), for 28M weights read from memory as float32, written as bfloat16
# and read again by the product. The float32 product is the slower one per
# row, so the rule is a number of rows whatever the weights' size: V2 Tiny's
# products chained alone, XLA:CPU's float32 ones took 1.15-1.31x the time of
# the bfloat16 ones (conversion included) at 98 rows and 1.22-1.69x at 392.
# V2 Tiny `predict_on_batch`, each setting in its own process,
# alternating, medians (AMD EPYC Zen 5 with AVX-512 BF16; benchmarks/README.md,
# items 37 and 43): batch 1 33.7-35.3 ms up to 256 positions (stages 3-4)
# against 36.0-46.5 up to 1024 (stages 2-4) and 45.7-54.1 with every kernel
# rounded; batch 8 218.8-243.9 against 212.8-254.4 ms (stage 4's 392 rows
# rounded or not), and with glibc's memory kept for reuse (item 41) 185.1-195.0
# against 197.6-218.9 ms; batch 4 110.5 and 115.0 against 126.8 and 124.3 ms.
_JAX_FLOAT32_KERNEL_MAX_POSITIONS = 256


def reads_stored_kernel(compute_dtype, variable_dtype):
    """Whether a Linear layer hands its float32 kernel as stored to `linear` and
    `linear_gelu` instead of the kernel autocast to its bfloat16 compute dtype:
    on JAX's CPU, where the product multiplies by it (`float32_kernel_pays`) or
    rounds it itself, once its input exists (`_rounded_after`).
    """
    return (
        keras.backend.standardize_dtype(compute_dtype) == "bfloat16"
        and keras.backend.standardize_dtype(variable_dtype) == "float32"
        and keras.backend.backend() == "jax"
        and _jax_on_cpu()
    )


def float32_kernel_pays(positions, compute_dtype, variable_dtype):
    """Whether a Linear over `positions` rows (None: not known when traced) should
    multiply by its float32 kernel as stored instead of the kernel rounded to its
    bfloat16 compute dtype: on JAX's CPU, for small products.

    The result is float32 arithmetic on the bfloat16 inputs and the float32
    weights, rounded once to bfloat16: closer to the float32 model than the
    rounded kernel gives.
    """
    return (
        positions is not None
        and positions <= _JAX_FLOAT32_KERNEL_MAX_POSITIONS
        and reads_stored_kernel(compute_dtype, variable_dtype)
    )


def linear(inputs, kernel, bias=None):
    """`portable_linear` through the fastest formulation for the backend."""
    if keras.backend.backend() == "torch":
        return _torch_linear(inputs, kernel, bias)
    if keras.backend.backend() == "tensorflow":
        return _tensorflow_linear(inputs, kernel, bias)
    if keras.backend.backend() == "jax" and _jax_bfloat16_on_cpu(inputs, kernel):
        return _jax_linear(inputs, kernel, bias)
    return portable_linear(inputs, kernel, bias)


def portable_linear_gelu(inputs, kernel, bias=None):
    """`gelu(inputs @ kernel + bias)`, the exact (erf) GELU: the block's widening Linear."""
    return keras.activations.gelu(portable_linear(inputs, kernel, bias), approximate=False)


def linear_gelu(inputs, kernel, bias=None):
    """`portable_linear_gelu` through the fastest formulation for the backend."""
    if keras.backend.backend() == "torch":
        return _torch_linear(inputs, kernel, bias, gelu=True)
    if keras.backend.backend() == "tensorflow":
        return _tensorflow_linear(inputs, kernel, bias, gelu=True)
    if keras.backend.backend() == "jax":
        if _jax_bfloat16_on_cpu(inputs, kernel):
            return _jax_linear(inputs, kernel, bias, gelu=True)
        return _jax_gelu()(portable_linear(inputs, kernel, bias))
    return portable_linear_gelu(inputs, kernel, bias)


def portable_patch_conv2d(inputs, kernel, bias=None):
    """A convolution whose stride is its kernel size: one output per patch.

    Args:
        inputs: `(batch, height, width, in_channels)`; rows and columns past
            the last whole patch are dropped ("valid" padding).
        kernel: `(p, p, in_channels, out_channels)`.
        bias: `(out_channels,)` or None.

    Returns:
        `(batch, height // p, width // p, out_channels)`.
    """
    size = kernel.shape[0]
    outputs = ops.conv(inputs, kernel, strides=size, padding="valid", data_format="channels_last")
    return outputs if bias is None else outputs + bias


def _reshape(x, shape):
    """`ops.reshape`; on PyTorch, the tensor's own reshape.

    Keras' `ops.reshape` searches its shape argument for symbolic tensors,
    tens of microseconds per call in PyTorch's eager mode.
    """
    return x.reshape(shape) if keras.backend.backend() == "torch" else ops.reshape(x, shape)


def _patch_linear(inputs, kernel, bias=None):
    size = kernel.shape[0]
    _, height, width, channels = inputs.shape
    rows, cols = height // size, width // size
    x = inputs[:, : rows * size, : cols * size] if (height % size or width % size) else inputs
    x = _reshape(x, (-1, rows, size, cols, size, channels))
    # (row, column, channel) within the patch: the order of the kernel's first three axes.
    x = _reshape(ops.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, rows, cols, size * size * channels))
    return linear(x, ops.reshape(kernel, (size * size * channels, kernel.shape[-1])), bias)


# Where the patches as a Linear layer paid (ConvNeXt V2 Tiny's stem and three
# downsampling convs, channels_last): PyTorch 4.7 -> 3.1 ms at batch 1 and
# 27 -> 20 ms at batch 8; JAX even at batch 1, 30 -> 21 ms at batch 8.
# TensorFlow's graph-mode conv was as fast as the patches, so it keeps its
# conv (and exported graphs keep a plain convolution).
_PATCH_LINEAR_BACKENDS = ("torch", "jax")


def patch_conv2d(inputs, kernel, bias=None):
    """`portable_patch_conv2d` through the fastest formulation for the backend.

    An output position sees its own patch alone, so the convolution is a
    Linear layer over the flattened patches: a reshape, a transpose and
    `linear`, on backends where that is faster and the map size is static.
    """
    static = inputs.shape[1] is not None and inputs.shape[2] is not None
    if static and keras.backend.backend() in _PATCH_LINEAR_BACKENDS:
        return _patch_linear(inputs, kernel, bias)
    return portable_patch_conv2d(inputs, kernel, bias)


def portable_layer_norm(inputs, gamma, beta, epsilon):
    """LayerNorm over the last axis, `keras.ops.layer_normalization`, in the input's dtype.

    Keras computes in float32 whatever the input dtype and casts back.
    """
    outputs = ops.layer_normalization(inputs, gamma, beta, axis=-1, epsilon=epsilon)
    return ops.cast(outputs, inputs.dtype)


def _torch_layer_norm(inputs, gamma, beta, epsilon):
    import torch
    import torch.nn.functional as F

    if inputs.dtype not in (torch.float32, torch.bfloat16):
        return portable_layer_norm(inputs, gamma, beta, epsilon)
    gamma, beta = (_torch_tensor(weight, torch.float32) for weight in (gamma, beta))
    if inputs.dtype == torch.float32 or _layer_norm_takes_mixed_dtypes(inputs.device):
        # PyTorch's CPU kernel takes bfloat16 inputs with float32 weights and
        # accumulates in float32 itself: no float32 copy of the input and no
        # cast back (8 ms -> 1.1 ms at (8, 56, 56, 96) in bfloat16).
        return F.layer_norm(inputs, (inputs.shape[-1],), gamma, beta, epsilon)
    # The CUDA kernel wants one dtype for inputs and weights: float32, as Keras
    # and torch.autocast normalize.
    return F.layer_norm(inputs.float(), (inputs.shape[-1],), gamma, beta, epsilon).to(inputs.dtype)


def _layer_norm_takes_mixed_dtypes(device):
    return device.type == "cpu"


def _tensorflow_layer_norm(inputs, gamma, beta, epsilon):
    import tensorflow as tf

    # TensorFlow's graph optimizer, with oneDNN, turns one pattern into a
    # single-pass `_MklLayerNorm`: the rows reshaped to (1, rows, channels, 1),
    # a training-mode FusedBatchNormV3 over them in NCHW with unit scale and
    # zero offset made by `Fill`, reshaped back, times gamma, plus beta. Keras'
    # own formulation is five passes over the map (mean, squared difference,
    # mean, scale, shift). V2 Tiny in a tf.function, alternating in one
    # process (paired medians): float32 batch 1 81.6 -> 74.4 ms (1.10x), batch
    # 8 565 -> 482 ms (1.11x); bfloat16 1.13x and 1.16x; a training step at
    # batch 16 even. In bfloat16 the kernel keeps its statistics in float32
    # and scales by gamma and beta rounded to bfloat16. In eager mode, under
    # XLA, on a GPU, or without oneDNN, Keras' formulation stays.
    if (
        inputs.dtype not in (tf.float32, tf.bfloat16)
        or tf.executing_eagerly()
        or getattr(_TRACING_FOR_EXPORT, "active", False)
        or _tensorflow_in_xla()
        or not _tensorflow_fuses_layer_norm()
    ):
        return portable_layer_norm(inputs, gamma, beta, epsilon)
    dtype = inputs.dtype
    channels = inputs.shape[-1]
    rows = tf.reshape(inputs, (-1, channels))
    # Grappler folds a `Fill` of static size into a constant before it looks
    # for the pattern, so the size also adds a zero read from the data
    # (`x > x` is false, NaN too), which no folding can know; a sum, so that
    # an empty batch works too.
    first = rows[:1, :1]
    size = tf.shape(rows)[:1] + tf.reduce_sum(tf.cast(first > first, tf.int32))
    empty = tf.constant([], tf.float32)
    normalized = tf.raw_ops.FusedBatchNormV3(
        x=tf.reshape(rows, (1, -1, channels, 1)),
        scale=tf.fill(size, 1.0),
        offset=tf.fill(size, 0.0),
        mean=empty,
        variance=empty,
        epsilon=epsilon,
        data_format="NCHW",
        is_training=True,
    )[0]
    outputs = tf.reshape(normalized, tf.shape(rows)) * tf.cast(gamma, dtype) + tf.cast(beta, dtype)
    outputs = tf.reshape(outputs, tf.shape(inputs))
    outputs.set_shape(inputs.shape)
    return outputs


_TRACING_FOR_EXPORT = threading.local()


@contextlib.contextmanager
def tracing_for_export():
    """TensorFlow graphs traced inside keep Keras' LayerNorm, for artifacts that run elsewhere.

    `_tensorflow_layer_norm` pays only where TensorFlow's oneDNN rewrite
    turns it into one kernel. SavedModel, TFLite and ONNX artifacts run
    where it does not (TensorFlow on a GPU or without oneDNN, TFLite, ONNX
    Runtime), so `keras_convnext.export` traces them with the standard
    formulation that every converter maps.
    """
    previous = getattr(_TRACING_FOR_EXPORT, "active", False)
    _TRACING_FOR_EXPORT.active = True
    try:
        yield
    finally:
        _TRACING_FOR_EXPORT.active = previous


@functools.lru_cache(maxsize=None)
def _tensorflow_fuses_layer_norm():
    """oneDNN's graph rewrites are on and no GPU is visible (the fused LayerNorm is a CPU kernel)."""
    import tensorflow as tf

    try:
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False
    return onednn and not tf.config.list_logical_devices("GPU")


def layer_norm(inputs, gamma, beta, epsilon):
    """`portable_layer_norm` through the fastest formulation for the backend."""
    if keras.backend.backend() == "torch":
        return _torch_layer_norm(inputs, gamma, beta, epsilon)
    if keras.backend.backend() == "tensorflow":
        return _tensorflow_layer_norm(inputs, gamma, beta, epsilon)
    return portable_layer_norm(inputs, gamma, beta, epsilon)


def _grn_scale(inputs, gamma, epsilon, sum_of_squares=None):
    """The per-sample, per-channel factor `1 + gamma * Nx`, `(batch, 1, 1, channels)`.

    `Gx` is the L2 norm over the spatial axes per sample and channel and
    `Nx = Gx / mean_c(Gx)`. The statistics are computed in float32 whatever
    the input dtype (a float16 sum of squares over a 56x56 map overflows); the
    small factor is cast back, so the full-size tensor stays in its dtype.
    `sum_of_squares` (float32, `(batch, 1, 1, channels)`) may be given by a
    backend's own formulation.
    """
    return ops.cast(_grn_scale_float32(inputs, gamma, epsilon, sum_of_squares), inputs.dtype)


def _grn_scale_float32(inputs, gamma, epsilon, sum_of_squares=None):
    """`_grn_scale` before its cast to the input dtype: float32."""
    if sum_of_squares is None:
        sum_of_squares = ops.sum(ops.square(ops.cast(inputs, "float32")), axis=(1, 2), keepdims=True)
    spatial_norm = _norm_from_sum_of_squares(sum_of_squares)
    relative = spatial_norm / (ops.mean(spatial_norm, axis=-1, keepdims=True) + epsilon)
    return 1.0 + ops.cast(gamma, "float32") * relative


def _norm_from_sum_of_squares(sum_of_squares):
    """`sqrt(sum_of_squares)`, with a gradient of 0 rather than NaN where the sum is 0.

    A channel that is zero at every position of a sample has norm 0, and the
    norm's gradient `x / ||x||` is then 0 / 0. The reference model's
    `torch.linalg.vector_norm` defines it as 0 there. It happens in training:
    PyTorch's GELU returns exactly 0 below about -5.9, and at 32x32 inputs
    stage 4 has one position per channel, so one such activation zeroes a
    channel's norm and, without this, turned every gradient into NaN.
    """
    positive = sum_of_squares > 0
    return ops.where(positive, ops.sqrt(ops.where(positive, sum_of_squares, 1.0)), 0.0)


def portable_grn(inputs, gamma, beta, epsilon=1e-6):
    """GRN on channels_last `(batch, height, width, channels)`.

    `x + gamma * (x * Nx) + beta`, computed as `x * (1 + gamma * Nx) + beta`:
    the per-channel scale is formed on a `(batch, 1, 1, channels)` tensor, so
    the full-size tensor is read once instead of three times.
    """
    return inputs * _grn_scale(inputs, gamma, epsilon) + ops.cast(beta, inputs.dtype)


# bfloat16 has float32's exponent range, so its squares cannot overflow, and
# PyTorch and TensorFlow accumulate a bfloat16 sum in float32, rounding only
# the result (about 3e-3 relative, 1.5e-3 on the norm: below bfloat16's
# resolution of 4e-3). So GRN's statistics need no full-size float32 copy of
# their input. At (8, 56, 56, 384): PyTorch 2.5 ms instead of 28 ms (a float32
# result, `dtype=`, copies the input to float32 first: 17 ms); TensorFlow
# 3.7 ms instead of 6.3 ms.


def _torch_grn(inputs, gamma, beta, epsilon=1e-6):
    import torch

    # `portable_grn` in torch's own operations: Keras' dispatch costs a few
    # microseconds of Python per operation, and GRN's small (batch, 1, 1,
    # channels) statistics take about as long in torch as that dispatch.
    return torch.addcmul(_torch_tensor(beta, inputs.dtype), inputs, _torch_grn_factor(inputs, gamma, epsilon))


def _torch_grn_factor(inputs, gamma, epsilon):
    """`_grn_scale` in torch's own operations: `(batch, 1, 1, channels)`, in the input's dtype."""
    import torch

    sum_of_squares = _torch_sum_of_squares(inputs)
    # Without a gradient to guard, the plain square root: three operations fewer.
    spatial_norm = _norm_from_sum_of_squares(sum_of_squares) if sum_of_squares.requires_grad else sum_of_squares.sqrt()
    relative = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + epsilon)
    return (1.0 + _torch_tensor(gamma, torch.float32) * relative).to(inputs.dtype)


# Eager PyTorch allocates every result afresh, and glibc hands out blocks over
# 32 MB as new pages, each of which costs a page fault when first written
# (1-2.6 us per 4 KB page on the Intel machine of the benchmarks). V2 Tiny's
# stage-1 hidden map at batch 8 is 38.5 MB in float32: its squares, computed
# whole, faulted on every pass. Below this size a temporary comes from memory
# the allocator keeps.
_TORCH_CHUNK_BYTES = 8 << 20


def _torch_sum_of_squares(inputs):
    """`sum(inputs ** 2)` over axes 1 and 2: `(batch, 1, 1, channels)`, float32.

    At inference on the CPU the squares of a large map are made a few
    samples at a time (see `_TORCH_CHUNK_BYTES`); a GPU's allocator keeps its
    memory, and there each chunk would only add kernel launches.
    """
    import torch

    def sums(x):
        squares = x.square() if x.dtype == torch.bfloat16 else x.float().square()
        return squares.sum(dim=(1, 2), keepdim=True).float()

    float32_bytes = 4 * inputs.numel()
    if torch.is_grad_enabled() or inputs.device.type != "cpu" or float32_bytes <= _TORCH_CHUNK_BYTES:
        return sums(inputs)
    samples = max(1, _TORCH_CHUNK_BYTES * inputs.shape[0] // float32_bytes)
    return torch.cat([sums(chunk) for chunk in inputs.split(samples)])


def _torch_tensor(value, dtype=None):
    """A tensor, Keras variable or array as a torch tensor, of `dtype` (a torch dtype) if given."""
    import torch

    tensor = value if isinstance(value, torch.Tensor) else ops.convert_to_tensor(value)
    return tensor if dtype is None else tensor.to(dtype)


def _tensorflow_grn_factor(inputs, gamma, epsilon):
    import tensorflow as tf

    sum_of_squares = None
    if inputs.dtype == tf.bfloat16:
        sum_of_squares = tf.cast(tf.reduce_sum(tf.square(inputs), axis=(1, 2), keepdims=True), tf.float32)
    return _grn_scale(inputs, gamma, epsilon, sum_of_squares)


def _tensorflow_grn(inputs, gamma, beta, epsilon=1e-6):
    return inputs * _tensorflow_grn_factor(inputs, gamma, epsilon) + ops.cast(beta, inputs.dtype)


def grn(inputs, gamma, beta, epsilon=1e-6):
    """`portable_grn` through the fastest formulation for the backend."""
    if keras.backend.backend() == "torch":
        return _torch_grn(inputs, gamma, beta, epsilon)
    if keras.backend.backend() == "tensorflow":
        return _tensorflow_grn(inputs, gamma, beta, epsilon)
    return portable_grn(inputs, gamma, beta, epsilon)


def portable_grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    """GRN, then a Linear layer: `portable_linear(portable_grn(inputs, ...), kernel, bias)`.

    The V2 block's GRN and narrowing Linear. `inputs` `(batch, height, width,
    channels)`, `kernel` `(channels, out)`; returns `(batch, height, width, out)`.
    """
    return portable_linear(portable_grn(inputs, gamma, beta, epsilon), kernel, bias)


def _tensorflow_grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    import tensorflow as tf

    # GRN's output `x * s + beta` (`s` per sample and channel) feeds the Linear
    # layer alone, and `(x * s + beta) @ W + b = x @ (s * W) + (beta @ W + b)`.
    # TensorFlow runs each elementwise operation as its own pass over the map.
    # Where the map has more positions than the layer has outputs, the weight
    # is the smaller tensor: `s` scales a per-sample copy of it in a batched
    # product and `beta` joins the bias, instead of two passes over the map.
    # V2 Tiny's first two stages, batch 8: bfloat16 13.7 -> 9.8 ms and 11.4 ->
    # 7.8 ms per block, float32 19.1 -> 12.1 and 14.5 -> 12.7 ms. Elsewhere
    # `beta @ W` would read the larger weight once more (8 ms of operator time
    # per V2 Tiny pass at batch 1, though the whole model timed the same).
    _, height, width, channels = inputs.shape
    if not _more_positions_than_outputs(inputs, kernel):
        return _tensorflow_linear(_tensorflow_grn(inputs, gamma, beta, epsilon), kernel, bias)
    factor = _tensorflow_grn_factor(inputs, gamma, epsilon)
    folded_bias = tf.linalg.matvec(kernel, ops.cast(beta, kernel.dtype), transpose_a=True)
    folded_bias = folded_bias if bias is None else folded_bias + bias
    weights = tf.reshape(factor, (-1, channels, 1)) * kernel
    outputs = tf.matmul(tf.reshape(inputs, (-1, height * width, channels)), weights) + folded_bias
    return tf.reshape(outputs, (-1, height, width, kernel.shape[-1]))


def _torch_grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    import torch

    # The fold of `_tensorflow_grn_linear`, at inference: on the Intel Xeon
    # with AMX of the benchmarks, GRN and the narrowing Linear of V2 Tiny's
    # stage 1 at batch 8 took 27.9 -> 18.7 ms in float32 and 4.3 -> 2.7 ms in
    # bfloat16 (`baddbmm` with per-sample weights against GRN's pass and
    # oneDNN's product); stage 2 was even, stage 3, with fewer positions than
    # outputs, slower. The gradient keeps the separate operations.
    batch, height, width, channels = inputs.shape
    if not (_torch_inference_matmul_applies(inputs) and _more_positions_than_outputs(inputs, kernel)):
        return linear(_torch_grn(inputs, gamma, beta, epsilon), kernel, bias)
    kernel = _torch_tensor(kernel)
    factor = _torch_grn_factor(inputs, gamma, epsilon).reshape(batch, channels, 1)
    folded_bias = torch.mv(kernel.t(), _torch_tensor(beta, kernel.dtype))
    folded_bias = folded_bias if bias is None else folded_bias + _torch_tensor(bias, kernel.dtype)
    outputs = torch.baddbmm(folded_bias, inputs.reshape(batch, height * width, channels), factor * kernel)
    return outputs.reshape(batch, height, width, kernel.shape[-1])


def _jax_grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    import jax
    import jax.numpy as jnp

    # The fold of `_tensorflow_grn_linear`, for bfloat16 on JAX's CPU. Unfolded,
    # XLA widens the bfloat16 map to a float32 copy for GRN's statistics and
    # for its scale and shift (one copy serves both), and XNNPACK's reduction
    # reads that copy: at V2 Tiny's stage 1, batch 8, 38.5 MB written and read
    # again per block. Folded, the map is read only by the statistics (which
    # widen it as they read) and by the product. The per-sample weights
    # `s * W` are made from the float32 kernel and rounded once, which also
    # rounds the kernel only once the map exists (see `_rounded_after`).
    # V2 Tiny, batch 8, with `_rounded_after` in place: 194.0, 203.0 -> 190.8,
    # 197.5 ms; the training step at batch 16 3.07-3.18 -> 2.67-2.71 s with both
    # (benchmarks/README.md, item 44).
    _, height, width, channels = inputs.shape
    inputs, kernel = ops.convert_to_tensor(inputs), ops.convert_to_tensor(kernel)
    factor = _grn_scale_float32(inputs, gamma, epsilon)
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


def _jax_grn_folds(inputs, kernel):
    """Whether `_jax_grn_linear` applies: bfloat16 on JAX's CPU, where the map has more positions
    than the layer has outputs (V2 Tiny's first two stages)."""
    return (
        keras.backend.backend() == "jax"
        and _jax_bfloat16_on_cpu(inputs, kernel)
        and _more_positions_than_outputs(inputs, kernel)
    )


def _more_positions_than_outputs(inputs, kernel):
    """Whether the map `(batch, height, width, channels)` has more positions per sample than
    `kernel` has outputs (both sizes known): where GRN folds into the narrowing Linear, the
    per-sample weights are then the smaller tensor."""
    _, height, width, _ = inputs.shape
    return height is not None and width is not None and height * width > kernel.shape[-1]


def grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    """`portable_grn_linear` through the fastest formulation for the backend."""
    if keras.backend.backend() == "tensorflow":
        return _tensorflow_grn_linear(inputs, gamma, beta, kernel, bias, epsilon)
    if keras.backend.backend() == "torch":
        return _torch_grn_linear(inputs, gamma, beta, kernel, bias, epsilon)
    if _jax_grn_folds(inputs, kernel):
        return _jax_grn_linear(inputs, gamma, beta, kernel, bias, epsilon)
    return linear(grn(inputs, gamma, beta, epsilon), kernel, bias)
