"""Which formulation applies here: the backend, its device, the processor, the compiler context.

Every question a dispatcher in `keras_convnext.ops` asks is answered here,
and every size threshold is a named constant here with its reason. With
the fast paths off (`keras_convnext.config`), `fast_backend()` is None and
every rule that depends on it says no. Current measurements are in
docs/performance.md.
"""

import contextlib
import functools
import threading

import keras

from keras_convnext import config

# Keras has no public API for its autocast and stateless scopes, which
# `Layer.__call__` enters around `call`; the model's direct layer chain and
# the reading of a stored weight enter them as Keras does.
from keras.src import backend as _keras_backend

# --- Thresholds --------------------------------------------------------------

# PyTorch in training, on the CPU: a Linear over at least this many positions
# is a 1x1 convolution over the channels_last memory, which PyTorch hands to
# oneDNN. Below it the convolution loses, because oneDNN re-lays out the whole
# weight on every call, which costs more than a small product saves. On a GPU
# every Linear stays cuBLAS' `addmm`, as in the reference model: cuDNN's
# convolution converts layouts around itself.
TORCH_CONV_MIN_POSITIONS = 1024

# Eager PyTorch allocates every result afresh, and glibc hands out large
# blocks as new pages, each of which faults when first written. GRN's
# squares of a map larger than this are made a few samples at a time, at
# inference on the CPU, so that each temporary comes from memory the
# allocator keeps.
TORCH_CHUNK_BYTES = 8 << 20

# Up to this many positions (rows of the product), a bfloat16 Linear on JAX's
# CPU multiplies by its float32 kernel as stored. Rounding the kernel to
# bfloat16 is a pass over the weights on every call, which a small product
# does not pay back; the float32 product is the slower one per row, so the
# rule is a number of rows whatever the weights' size.
JAX_FLOAT32_KERNEL_MAX_POSITIONS = 256

# PyTorch in training, on the CPU: the depthwise kernel's gradient of a map
# of up to this many positions is taken through the products of all position
# pairs (`xla.pairwise_kernel_gradient`). PyTorch's own kernel gradient costs
# about as much on a 1x1 map as on an 8x8 one; the pairs grow as the square
# of the positions, and from about 8x8 on they no longer win.
TORCH_PAIRWISE_MAX_POSITIONS = 36

# Under XLA, the depthwise kernel's gradient of a map of up to this many
# positions is taken through the products of all position pairs, above it
# through the Fourier domain: the pairs grow as the square of the positions.
PAIRWISE_MAX_POSITIONS = 100

# Backends where the patch convolution (stride = kernel) runs faster as a
# Linear over the flattened patches. TensorFlow's graph-mode convolution is
# as fast as the patches there, so it keeps its convolution (and exported
# graphs keep a plain one).
PATCH_LINEAR_BACKENDS = ("torch", "jax")


# --- The switch and the backend ----------------------------------------------


def fast_backend():
    """The Keras backend's name ("jax", "tensorflow", "torch"), or None with the fast paths off."""
    return keras.backend.backend() if config.fast_paths_enabled() else None


def jax_on_cpu():
    """Whether JAX runs on the CPU (XLA:CPU), not a GPU or TPU."""
    import jax

    return jax.default_backend() == "cpu"


def distributed():
    """Whether a Keras distribution is set: inputs may be split across devices."""
    return keras.distribution.distribution() is not None


# --- Compiler context ---------------------------------------------------------


def tensorflow_in_xla():
    """Whether TensorFlow is tracing a function that XLA compiles (`jit_compile=True`)."""
    try:
        import tensorflow as tf
        # TensorFlow has no public API that tells whether the graph being
        # traced is compiled by XLA.
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return False
    if tf.executing_eagerly():
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


@functools.lru_cache(maxsize=None)
def tensorflow_fuses_layer_norm():
    """oneDNN's graph rewrites are on and no GPU is visible (the fused LayerNorm is a CPU kernel)."""
    import tensorflow as tf

    try:
        # TensorFlow has no public API that tells whether it was built with
        # oneDNN's graph rewrites on.
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False
    return onednn and not tf.config.list_logical_devices("GPU")


def torch_compiling():
    """Whether `torch.compile` is tracing: it picks its own kernels."""
    return bool(_torch_is_compiling()())


@functools.lru_cache(maxsize=None)
def _torch_is_compiling():
    """PyTorch's `is_compiling` function, looked up once: every Linear and the model's
    call ask, and an eager call's host time is the sum of such questions."""
    import torch

    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is None:
        # `torch.compiler.is_compiling` is public from PyTorch 2.3 on; before,
        # only the private one exists.
        import torch._dynamo

        is_compiling = torch._dynamo.is_compiling
    return is_compiling


def autocast_scope(dtype):
    """Keras' autocast scope: float variables read in `dtype` inside it (None: as stored)."""
    return _keras_backend.AutocastScope(dtype)


def current_autocast_scope():
    """The autocast scope Keras is in, or None."""
    return _keras_backend.get_autocast_scope()


_direct_reads = threading.local()


@contextlib.contextmanager
def weights_read_directly():
    """Inside the block, `reads_weights_directly()` is True (in this thread).

    Entered by the model's direct layer chain where a Keras variable's
    `value` is its stored tensor: eager PyTorch on concrete tensors, outside
    Keras' stateless and autocast scopes, every layer computing in its
    variables' dtype. The layers then read that tensor as it is
    (`torch_backend.stored_tensor`): `Variable.value` checks those scopes
    and the device on every read, host time paid per weight and call.
    """
    previous = getattr(_direct_reads, "active", False)
    _direct_reads.active = True
    try:
        yield
    finally:
        _direct_reads.active = previous


def reads_weights_directly():
    """Whether a layer may read its weights' stored tensors as they are (`weights_read_directly`)."""
    return getattr(_direct_reads, "active", False)


def in_stateless_scope():
    """Whether Keras is inside a `keras.StatelessScope` (variables read from its mapping)."""
    return _keras_backend.in_stateless_scope()


# --- The processor ------------------------------------------------------------


def cpuinfo_field(name):
    """The first `name` field of Linux's /proc/cpuinfo ("vendor_id", "flags"), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_vendor():
    """"GenuineIntel", "AuthenticAMD", ... (on Windows, the processor's description)."""
    vendor = cpuinfo_field("vendor_id")
    if vendor is not None:
        return vendor
    import platform

    return platform.processor()  # Windows: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel"


def addmm_wins_on(vendor, capability, mkl):
    """Whether PyTorch's float32 `addmm` beats oneDNN's product at inference, from the
    processor's vendor, PyTorch's vector capability ("AVX512", "AVX2", ...) and
    whether `addmm` is MKL's.

    oneDNN uses AVX-512 wherever the processor has it; MKL takes its AVX-512
    path only on Intel processors. So oneDNN's product (with GELU fused) wins
    on an AMD processor with AVX-512, and MKL's `addmm` with a separate GELU
    wins where both use the same instructions: Intel processors, and AMD ones
    with AVX2 only (where oneDNN also re-lays out the Keras (in, out) kernel).
    Without MKL, oneDNN's product.
    """
    if not mkl:
        return False
    return "GenuineIntel" in vendor or not capability.upper().startswith("AVX512")


@functools.lru_cache(maxsize=None)
def torch_addmm_wins():
    """`addmm_wins_on` for this processor and this PyTorch."""
    import torch

    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return addmm_wins_on(cpu_vendor(), capability, bool(torch.backends.mkl.is_available()))


# --- Which path applies ---------------------------------------------------------


def xla_depthwise_applies():
    """The shifted depthwise convolution of `ops.xla`: JAX on the CPU, TensorFlow inside XLA.

    XLA:CPU lowers a grouped convolution with one channel per group to a slow
    generic loop; on a GPU, XLA hands it to cuDNN, and TensorFlow outside XLA
    has its own kernel.
    """
    backend = fast_backend()
    return (backend == "jax" and jax_on_cpu()) or (backend == "tensorflow" and tensorflow_in_xla())


def torch_inference_product_applies(inputs):
    """Whether a Linear on the torch tensor `inputs` may take an inference-only product:
    no gradient wanted, not under `torch.compile`, on the CPU, float32 or bfloat16."""
    import torch

    return (
        not torch.is_grad_enabled()
        and inputs.device.type == "cpu"
        and inputs.dtype in (torch.float32, torch.bfloat16)
        and not torch_compiling()
    )


def torch_pairwise_kernel_gradient_applies(inputs, kernel):
    """Whether PyTorch's depthwise convolution of `inputs` takes its kernel gradient through
    position pairs (`torch_backend.depthwise_conv2d`): a gradient is wanted, on the CPU, in
    float32 or bfloat16, on a map of up to `TORCH_PAIRWISE_MAX_POSITIONS` positions, not
    under `torch.compile`."""
    import torch

    _, height, width, _ = inputs.shape
    return (
        torch.is_grad_enabled()
        and (inputs.requires_grad or kernel.requires_grad)
        and height * width <= TORCH_PAIRWISE_MAX_POSITIONS
        and inputs.device.type == "cpu"
        and inputs.dtype in (torch.float32, torch.bfloat16)
        and not torch_compiling()
    )


def torch_conv_product_applies(inputs):
    """Whether a Linear in training on the torch tensor `inputs` takes the 1x1 convolution:
    on the CPU, float32 or bfloat16, from `TORCH_CONV_MIN_POSITIONS` positions on."""
    import torch

    positions = inputs.numel() // max(inputs.shape[-1], 1)
    return (
        inputs.device.type == "cpu"
        and inputs.dtype in (torch.float32, torch.bfloat16)
        and positions >= TORCH_CONV_MIN_POSITIONS
    )


def jax_bfloat16_on_cpu(inputs, kernel):
    """bfloat16 inputs on JAX's CPU, with a bfloat16 kernel or the float32 one of `reads_stored_kernel`."""
    return (
        keras.backend.standardize_dtype(inputs.dtype) == "bfloat16"
        and keras.backend.standardize_dtype(kernel.dtype) in ("bfloat16", "float32")
        and jax_on_cpu()
    )


def reads_stored_kernel(compute_dtype, variable_dtype):
    """Whether a Linear layer hands its float32 kernel as stored to `ops.linear` and
    `ops.linear_gelu` instead of the kernel autocast to its bfloat16 compute dtype:
    on JAX's CPU, where the product multiplies by it (`float32_kernel_pays`) or
    rounds it itself once its input exists (`jax_backend.rounded_after`).
    """
    return (
        fast_backend() == "jax"
        and keras.backend.standardize_dtype(compute_dtype) == "bfloat16"
        and keras.backend.standardize_dtype(variable_dtype) == "float32"
        and jax_on_cpu()
    )


def float32_kernel_pays(positions, compute_dtype, variable_dtype):
    """Whether a Linear over `positions` rows (None: not known when traced) should
    multiply by its float32 kernel as stored instead of the kernel rounded to its
    bfloat16 compute dtype: on JAX's CPU, up to `JAX_FLOAT32_KERNEL_MAX_POSITIONS`.

    The result is float32 arithmetic on the bfloat16 inputs and the float32
    weights, rounded once to bfloat16: closer to the float32 model than the
    rounded kernel gives.
    """
    return (
        positions is not None
        and positions <= JAX_FLOAT32_KERNEL_MAX_POSITIONS
        and reads_stored_kernel(compute_dtype, variable_dtype)
    )


def more_positions_than_outputs(inputs, kernel):
    """Whether the map `(batch, height, width, channels)` has more positions per sample than
    `kernel` has outputs (both sizes known): where GRN folds into the narrowing Linear, the
    per-sample weights are then the smaller tensor."""
    _, height, width, _ = inputs.shape
    return height is not None and width is not None and height * width > kernel.shape[-1]


def grn_fold_applies(inputs, kernel):
    """Whether GRN folds into the Linear that follows it (`ops.grn_linear`'s fast path).

    Where the map has more positions than the Linear has outputs: on
    TensorFlow always (its graphs run each elementwise operation as a pass
    of its own), on PyTorch at inference, on JAX's CPU in bfloat16 (where
    XLA would otherwise widen the map to a float32 copy for GRN).
    """
    backend = fast_backend()
    if backend is None or not more_positions_than_outputs(inputs, kernel):
        return False
    if backend == "tensorflow":
        return True
    if backend == "torch":
        return torch_inference_product_applies(inputs)
    return jax_bfloat16_on_cpu(inputs, kernel)


def patch_linear_applies(inputs):
    """Whether the patch convolution runs as a Linear over flattened patches: on the
    backends of `PATCH_LINEAR_BACKENDS`, where the map's size is known."""
    static = inputs.shape[1] is not None and inputs.shape[2] is not None
    return static and fast_backend() in PATCH_LINEAR_BACKENDS


def tensorflow_layer_norm_fuses(inputs):
    """Whether TensorFlow's graph optimizer can turn LayerNorm into oneDNN's one-pass kernel:
    float32 or bfloat16, traced into a graph that XLA does not compile, with oneDNN's
    rewrites on and no GPU."""
    import tensorflow as tf

    return (
        inputs.dtype in (tf.float32, tf.bfloat16)
        and not tf.executing_eagerly()
        and not tensorflow_in_xla()
        and tensorflow_fuses_layer_norm()
    )
