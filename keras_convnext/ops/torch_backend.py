"""PyTorch's fast paths: fewer passes over memory in eager mode, and oneDNN's kernels on the CPU.

PyTorch's eager mode runs each operation as its own pass over memory, and
Keras' dispatch adds Python time per operation, so these formulations fuse
what they can in torch's own operations: the Linear bias goes into the
matrix product, GRN's scale-and-shift is one `addcmul`, the depthwise
convolution reads the NHWC memory as PyTorch's channels_last kernel.
oneDNN's kernels use AVX-512 where MKL's `addmm` does not on every
processor: at inference the Linear is oneDNN's matrix product with GELU
applied as it writes (where `platform.torch_addmm_wins` says `addmm` loses);
in training, on large maps, a 1x1 convolution that PyTorch hands to oneDNN.
Each function here computes what its namesake in `ops.portable` defines.
"""

import functools

from keras import ops

from keras_convnext.ops import platform, portable


def as_tensor(value, dtype=None):
    """A tensor, Keras variable or array as a torch tensor, of `dtype` (a torch dtype) if given."""
    import torch

    tensor = value if isinstance(value, torch.Tensor) else ops.convert_to_tensor(value)
    # `Tensor.to` returns the tensor itself when nothing changes, but only
    # after a pass through PyTorch's dispatcher: host time on every weight.
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def stored_tensor(variable):
    """The torch tensor a Keras variable stores, read past `Variable.value`'s checks.

    Only where `platform.reads_weights_directly()`: there `Variable.value`
    returns this same tensor.
    """
    # Keras has no public accessor for the stored tensor without the scope checks.
    return variable._value


# --- Depthwise convolution ----------------------------------------------------


def depthwise_conv2d(inputs, kernel, bias=None):
    """`portable.depthwise_conv2d` through PyTorch's channels_last kernel.

    Keras' PyTorch backend copies NHWC tensors to NCHW around each
    convolution; `permute()` only relabels strides, so the convolution sees
    NCHW shapes over NHWC memory and runs without copies. Where
    `platform.torch_pairwise_kernel_gradient_applies` (training on the CPU,
    small maps), the same convolution with the kernel's gradient taken
    through position pairs (`_PairwiseGradientDepthwise`).
    """
    if platform.torch_pairwise_kernel_gradient_applies(inputs, kernel):
        return _pairwise_gradient_depthwise().apply(inputs, kernel, bias)
    return _channels_last_depthwise(inputs, kernel, bias)


def _channels_last_depthwise(inputs, kernel, bias=None):
    import torch.nn.functional as F

    channels = inputs.shape[-1]
    size = kernel.shape[0]
    outputs = F.conv2d(
        inputs.permute(0, 3, 1, 2), kernel.permute(2, 3, 0, 1), bias, padding=size // 2, groups=channels
    )
    return outputs.permute(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _pairwise_gradient_depthwise():
    """The depthwise convolution as a `torch.autograd.Function` whose backward pass is
    made of products: PyTorch's own kernel gradient of a depthwise convolution on the
    CPU has a large cost per channel, whatever the map's size.

    The input's gradient is the convolution of the upstream gradient with
    the flipped kernel (the forward kernel, fast); the kernel's is
    `xla.pairwise_kernel_gradient`, in float32; the bias's the upstream
    gradient summed over batch and positions.
    """
    import torch

    from keras_convnext.ops import xla

    class PairwiseGradientDepthwise(torch.autograd.Function):
        @staticmethod
        def forward(inputs, kernel, bias):
            return _channels_last_depthwise(inputs, kernel, bias)

        @staticmethod
        def setup_context(ctx, arguments, outputs):
            inputs, kernel, bias = arguments
            ctx.save_for_backward(inputs, kernel)
            ctx.has_bias = bias is not None

        @staticmethod
        def backward(ctx, upstream):
            inputs, kernel = ctx.saved_tensors
            upstream = upstream.contiguous()
            inputs_gradient = _channels_last_depthwise(upstream, kernel.flip(0, 1))
            kernel_gradient = xla.pairwise_kernel_gradient(inputs.float(), upstream.float(), kernel.shape[0])
            bias_gradient = upstream.sum(dim=(0, 1, 2)) if ctx.has_bias else None
            return inputs_gradient, kernel_gradient.to(kernel.dtype), bias_gradient

    return PairwiseGradientDepthwise


# --- Linear layers --------------------------------------------------------------


def linear(inputs, kernel, bias=None, gelu=False):
    """`portable.linear` (with `gelu`, `portable.linear_gelu`) through the fastest product here.

    At inference on the CPU, oneDNN's matrix product where it wins
    (`onednn_product_wins`): it reads the plain weight as it is and applies
    GELU as it writes, one pass less over the block's widest tensor. In
    training on the CPU, from `platform.TORCH_CONV_MIN_POSITIONS` positions
    on, a 1x1 convolution over the channels_last memory, which PyTorch hands
    to oneDNN. Elsewhere `addmm`, the reference model's product.
    """
    import torch
    import torch.nn.functional as F

    kernel, bias = (None if weight is None else as_tensor(weight) for weight in (kernel, bias))
    channels = inputs.shape[-1]
    inference = platform.torch_inference_product_applies(inputs)
    if inference and onednn_product_wins(inputs.dtype):
        outputs = _onednn_linear(inputs.reshape(-1, channels), kernel, bias, gelu)
        return outputs.reshape(*inputs.shape[:-1], kernel.shape[-1])
    if not inference and platform.torch_conv_product_applies(inputs):
        # Any other rank (the FCMAE fast path's gathered tokens) is viewed as
        # one (1, positions, 1, channels) map. permute() only relabels strides:
        # the 1x1 convolution reads the NHWC memory as a channels_last NCHW
        # tensor and writes channels_last.
        maps = inputs if inputs.ndim == 4 else inputs.reshape(1, -1, 1, channels)
        weight = kernel.t()[:, :, None, None]
        outputs = F.conv2d(maps.permute(0, 3, 1, 2), weight, bias).permute(0, 2, 3, 1)
        outputs = outputs if inputs.ndim == 4 else outputs.reshape(*inputs.shape[:-1], kernel.shape[-1])
    else:
        flat = inputs.reshape(-1, channels)
        outputs = torch.mm(flat, kernel) if bias is None else torch.addmm(bias, flat, kernel)
        outputs = outputs.reshape(*inputs.shape[:-1], kernel.shape[-1])
    if gelu and inference:
        # In place on the product just made: no second tensor as large as the
        # block's widest one.
        return _gelu_in_place(outputs)
    return F.gelu(outputs) if gelu else outputs


def linear_gelu(inputs, kernel, bias=None):
    """`portable.linear_gelu` through `linear`."""
    return linear(inputs, kernel, bias, gelu=True)


def _onednn_linear(rows, kernel, bias, gelu):
    """oneDNN's matrix product `rows @ kernel + bias`, with the exact GELU applied as it writes.

    Inference only: the operator has no gradient.
    """
    import torch

    activation = ("gelu", [None], "none") if gelu else ("none", [], "")
    # PyTorch has no public API for oneDNN's product with a fused activation;
    # this operator serves `torch.compile`'s CPU backend.
    return torch.ops.mkldnn._linear_pointwise(rows, kernel.t(), bias, *activation)


def _gelu_in_place(outputs):
    """The exact GELU of `outputs`, written over them."""
    import torch

    # `torch.nn.functional.gelu` has no in-place form.
    return torch._C._nn.gelu_(outputs)


def onednn_product_wins(dtype):
    """Whether a Linear at inference, in `dtype` (a torch dtype), takes oneDNN's product (else `addmm`)."""
    import torch

    if dtype == torch.float32 and platform.torch_addmm_wins():
        return False
    return onednn_linear_works(dtype)


@functools.lru_cache(maxsize=None)
def onednn_linear_works(dtype):
    """Whether this PyTorch has oneDNN's matrix product with GELU in `dtype` (a torch
    dtype) on this processor, giving the expected result.

    The operator is internal to PyTorch, so it is checked once per dtype
    against the separate operations before it is used. In bfloat16 oneDNN
    needs the processor's AVX-512 ("could not create a primitive descriptor"
    without it).
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
            plain = _onednn_linear(x, kernel, bias, gelu=False)
            fused = _onednn_linear(x, kernel, bias, gelu=True)
            expected = torch.addmm(bias.float(), x.float(), kernel.float())
            return bool(
                torch.allclose(plain.float(), expected, atol=tolerance, rtol=tolerance)
                and torch.allclose(fused.float(), F.gelu(expected), atol=tolerance, rtol=tolerance)
            )
    except (AttributeError, RuntimeError, TypeError):
        return False


# --- LayerNorm ------------------------------------------------------------------


def layer_norm(inputs, gamma, beta, epsilon):
    """`portable.layer_norm` through PyTorch's kernel.

    PyTorch's CPU kernel takes bfloat16 inputs with float32 weights and
    accumulates in float32 itself: no float32 copy of the input and no cast
    back. The CUDA kernel wants one dtype for inputs and weights: float32, as
    Keras and torch.autocast normalize.
    """
    import torch
    import torch.nn.functional as F

    if inputs.dtype not in (torch.float32, torch.bfloat16):
        return portable.layer_norm(inputs, gamma, beta, epsilon)
    gamma, beta = (as_tensor(weight, torch.float32) for weight in (gamma, beta))
    if inputs.dtype == torch.float32 or layer_norm_takes_mixed_dtypes(inputs.device):
        return F.layer_norm(inputs, (inputs.shape[-1],), gamma, beta, epsilon)
    return F.layer_norm(inputs.float(), (inputs.shape[-1],), gamma, beta, epsilon).to(inputs.dtype)


def layer_norm_takes_mixed_dtypes(device):
    """Whether PyTorch's LayerNorm kernel on `device` takes bfloat16 inputs with float32 weights."""
    return device.type == "cpu"


# --- GRN --------------------------------------------------------------------------


def grn(inputs, gamma, beta, epsilon=1e-6):
    """`portable.grn` in torch's own operations, the scale and shift as one `addcmul`.

    Keras' dispatch costs a few microseconds of Python per operation, and
    GRN's small (batch, 1, 1, channels) statistics take about as long in
    torch as that dispatch.
    """
    import torch

    return torch.addcmul(as_tensor(beta, inputs.dtype), inputs, _grn_scale(inputs, gamma, epsilon))


def _grn_scale(inputs, gamma, epsilon):
    """`portable.grn_scale` in torch's own operations: `(batch, 1, 1, channels)`, in the input's dtype."""
    import torch

    sum_of_squares = _sum_of_squares(inputs)
    # Without a gradient to guard, the plain square root: three operations fewer.
    if sum_of_squares.requires_grad:
        spatial_norm = portable.norm_from_sum_of_squares(sum_of_squares)
    else:
        spatial_norm = sum_of_squares.sqrt()
    relative = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + epsilon)
    return (1.0 + as_tensor(gamma, torch.float32) * relative).to(inputs.dtype)


def _sum_of_squares(inputs):
    """`sum(inputs ** 2)` over axes 1 and 2: `(batch, 1, 1, channels)`, float32.

    bfloat16 has float32's exponent range, so its squares cannot overflow,
    and PyTorch accumulates a bfloat16 sum in float32, rounding only the
    result: no full-size float32 copy of the input. At inference on the CPU
    the squares of a map larger than `platform.TORCH_CHUNK_BYTES` are made a
    few samples at a time; a GPU's allocator keeps its memory, and there each
    chunk would only add kernel launches.
    """
    import torch

    def sums(x):
        squares = x.square() if x.dtype == torch.bfloat16 else x.float().square()
        return squares.sum(dim=(1, 2), keepdim=True).float()

    float32_bytes = 4 * inputs.numel()
    chunk_bytes = platform.TORCH_CHUNK_BYTES
    if torch.is_grad_enabled() or inputs.device.type != "cpu" or float32_bytes <= chunk_bytes:
        return sums(inputs)
    samples = max(1, chunk_bytes * inputs.shape[0] // float32_bytes)
    return torch.cat([sums(chunk) for chunk in inputs.split(samples)])


def grn_linear(inputs, gamma, beta, kernel, bias=None, epsilon=1e-6):
    """`portable.grn_linear` with GRN folded into a batched product, at inference.

    `(x * s + beta) @ W + b = x @ (s * W) + (beta @ W + b)`: `baddbmm` with
    per-sample weights instead of GRN's pass over the map and then the
    product. It applies where `platform.grn_fold_applies`, at inference; the
    gradient keeps the separate operations.
    """
    import torch

    batch, height, width, channels = inputs.shape
    kernel = as_tensor(kernel)
    factor = _grn_scale(inputs, gamma, epsilon).reshape(batch, channels, 1)
    folded_bias = torch.mv(kernel.t(), as_tensor(beta, kernel.dtype))
    folded_bias = folded_bias if bias is None else folded_bias + as_tensor(bias, kernel.dtype)
    outputs = torch.baddbmm(folded_bias, inputs.reshape(batch, height * width, channels), factor * kernel)
    return outputs.reshape(batch, height, width, kernel.shape[-1])
