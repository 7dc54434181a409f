"""ConvNeXt throughput on every installed Keras backend against the PyTorch reference.

Each measurement runs in its own process (one Keras backend per process), all
in the same invocation, so the ratios compare like with like:

    keras-convnext benchmark --model ConvNeXtV2Tiny --batch-size 8 --resolution 224

Measured per backend: inference images/s (batch B and batch 1), first-call
(compile) time, training steps/s (AdamW, batch `--train-batch-size`), peak
memory added by the model, and achieved GFLOP/s against the machine's
measured float32 matrix-multiply peak. `--device cuda` runs every
implementation on the GPU instead (the reference included); memory is then
the GPU's, as its allocator counts it, and every timed call waits for the
device (Keras returns NumPy arrays; the reference copies its logits to the
host and synchronizes after each training step). Under mixed precision the
reference also runs under `torch.autocast` in bfloat16, as a second row;
ratios stay against the float32 reference. `--torch-compile` adds a row for
the PyTorch backend with `jit_compile=True` (torch.compile; its first calls
compile). With `--rounds N` every implementation runs N times, in turn, and
the table reports medians, with each round's ratios listed below it. The reference is HF
transformers' PyTorch ConvNeXt (V2 or V1) in eager mode (it needs PyTorch and
transformers; `--no-reference` leaves it out). Results go to
`<--output-dir>/<name>.json` and `.md` (`benchmarks/results/` when run as
`benchmarks/run.py` in the source repository).
"""

import argparse
import datetime
import json
import os
import platform
import queue
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

# The directory that holds the keras_convnext package, so that worker
# processes import this same copy (an installed one or a source checkout).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER_MODULE = "keras_convnext.benchmark"  # its __main__
DEFAULT_OUTPUT_DIR = "benchmark_results"
BACKENDS = ("tensorflow", "jax", "torch")


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak():
    """Restarts the kernel's peak-RSS counter (VmHWM); False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return _peak_mb()


def _release_free_memory():
    """Hands memory that glibc's allocator holds but no longer uses back to the system.

    Building and compiling free hundreds of MB that malloc keeps mapped; left
    there it would count as inference memory. Every worker does this alike.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _baseline_mb():
    """Resident MB before the model is built, free allocator memory released first.

    The steady peak is measured after such a release; a baseline that still
    held freed memory could lie above it.
    """
    _release_free_memory()
    return _rss_mb()


class ResidentMemory:
    """Host memory of this process: resident MB, from Linux's /proc."""

    def baseline(self):
        return _baseline_mb()

    def peak(self):
        """Peak MB since the process started (or since the last successful `reset`)."""
        return _peak_mb()

    def reset(self):
        """Starts a new peak; False where that is not possible."""
        _release_free_memory()
        return _reset_peak()

    def high_water(self):
        return _high_water_mb()


class TorchDeviceMemory:
    """GPU memory that PyTorch's caching allocator hands out, in MB."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda

    def baseline(self):
        return self.cuda.memory_allocated() / 2**20

    def peak(self):
        return self.cuda.max_memory_allocated() / 2**20

    def reset(self):
        self.cuda.reset_peak_memory_stats()
        return True

    high_water = peak


class JaxDeviceMemory:
    """GPU memory in use by JAX's allocator, in MB. Its peak cannot be reset."""

    def __init__(self):
        import jax

        self.device = jax.devices()[0]

    def _stat(self, key):
        return (self.device.memory_stats() or {}).get(key, 0) / 2**20

    def baseline(self):
        return self._stat("bytes_in_use")

    def peak(self):
        return self._stat("peak_bytes_in_use")

    def reset(self):
        return False

    high_water = peak


class TensorFlowDeviceMemory:
    """GPU memory in use by TensorFlow's allocator, in MB."""

    def __init__(self):
        import tensorflow as tf

        self.experimental = tf.config.experimental

    def _info(self):
        return self.experimental.get_memory_info("GPU:0")

    def baseline(self):
        return self._info()["current"] / 2**20

    def peak(self):
        return self._info()["peak"] / 2**20

    def reset(self):
        self.experimental.reset_memory_stats("GPU:0")
        return True

    high_water = peak


def _steady_inference(fn, repeats, baseline, memory=None):
    """(first call s, median s, peak MB of the first call, peak MB of the later calls).

    Both peaks are memory above `baseline` (taken before the model was
    built), so they include the weights. The first call's peak also holds
    tracing and compilation; the later calls' peak is what serving costs. It
    is None where `memory` cannot restart its peak (JAX on a GPU).
    """
    memory = memory or ResidentMemory()
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    first_peak = memory.peak() - baseline
    steady_peak = None
    if memory.reset():
        fn()
        steady_peak = memory.high_water() - baseline
    _, seconds = _timed(fn, repeats, warm=True)
    return first, seconds, first_peak, steady_peak


def _timed(fn, repeats, warm=False):
    """(first call seconds, median seconds of `repeats` later calls); `warm` skips the first call."""
    first = None
    if not warm:
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
    return first, float(np.median(_call_times(fn, repeats)))


def _call_times(fn, calls):
    """Seconds of each of `calls` calls of `fn`, in order."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _page_faults_per_call(fn, repeats=3):
    """Median minor page faults of a call (new 4 KB pages touched for the first time), or None.

    Eager frameworks allocate every result afresh; blocks over 32 MB come
    from the system as new pages, each faulting when first written. The cost
    per fault varies by machine and load, so it explains part of the spread
    between runs.
    """
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    counts = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return float(np.median(counts))


def _inference_result(args, first, seconds, seconds_b1, first_peak, steady_peak):
    result = {
        "inference_images_per_s": args.batch_size / seconds,
        "first_call_s": first,
        "first_call_peak_memory_mb": first_peak,
        "peak_memory_mb": steady_peak if steady_peak is not None else first_peak,
        "peak_memory_includes_first_call": steady_peak is None,
    }
    if seconds_b1 is not None:
        result["batch1_latency_ms"] = seconds_b1 * 1000
    return result


def _measure_inference(args, infer, baseline, memory):
    """Inference at `args.batch_size` (and batch 1 with `args.batch1_latency`): the result's numbers."""
    first, seconds, first_peak, steady_peak = _steady_inference(
        lambda: infer(args.batch_size), args.repeats, baseline, memory
    )
    seconds_b1 = _timed(lambda: infer(1), args.repeats)[1] if args.batch1_latency else None
    result = _inference_result(args, first, seconds, seconds_b1, first_peak, steady_peak)
    result["page_faults_per_call"] = _page_faults_per_call(lambda: infer(args.batch_size))
    return result


def _measure_training(step, args, baseline, memory, warm_steps=1):
    """Training steps/s of `step()`, the first `warm_steps` steps' seconds and the peak memory of training.

    The peak is memory above `baseline`, over the steps (compilation
    included), restarted before them where `memory` allows (not on JAX's GPU
    allocator, whose peak then includes what ran before).
    """
    memory.reset()
    start = time.perf_counter()
    for _ in range(warm_steps):
        step()
    train_first = time.perf_counter() - start
    _, train_seconds = _timed(step, max(2, args.repeats // 2), warm=True)
    return {"train_steps_per_s": 1.0 / train_seconds, "train_first_call_s": train_first,
            "train_peak_memory_mb": memory.high_water() - baseline}


# The fine-tuning recipe's peak learning rate at batch 256 (keras_convnext.training's default);
# it is scaled by batch size / 256, as the official recipe does.
FINETUNE_LEARNING_RATE = 5e-4
FINETUNE_WEIGHT_DECAY = 0.05


def _keras_optimizer(args, model):
    """AdamW at 1e-4 ("adamw"), or the fine-tuning recipe's ("finetune": layer decay, weight decay
    0.05, warm-up and cosine schedule); wrapped in loss scaling under mixed_float16."""
    import keras

    if args.optimizer == "finetune":
        from keras_convnext.training import finetune_optimizer

        optimizer = finetune_optimizer(
            model, learning_rate=FINETUNE_LEARNING_RATE * args.train_batch_size / 256,
            weight_decay=FINETUNE_WEIGHT_DECAY,
        )
    else:
        optimizer = keras.optimizers.AdamW(1e-4)
    if args.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _keras_training(args, model, jit_compile, baseline, memory):
    import keras

    rng = np.random.default_rng(1)
    shape = (args.resolution, args.resolution, 3)
    train_images = rng.uniform(0, 255, size=(args.train_batch_size,) + shape).astype("float32")
    labels = rng.integers(0, 1000, size=(args.train_batch_size,))
    model.compile(
        optimizer=_keras_optimizer(args, model),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile or "auto",
    )
    # torch.compile compiles the second step again
    return _measure_training(lambda: model.train_on_batch(train_images, labels), args, baseline, memory,
                             warm_steps=2 if jit_compile else 1)


def _keras_device(args):
    """(memory meter, device label) for this Keras backend; raises if it is not on `args.device`."""
    import keras

    backend = keras.backend.backend()
    if args.device == "cpu":
        return ResidentMemory(), "cpu"
    if backend == "jax":
        import jax

        first = jax.devices()[0]
        on_gpu, device, meter = first.platform == "gpu", str(first), JaxDeviceMemory
    elif backend == "torch":
        import torch

        on_gpu, meter = torch.cuda.is_available(), TorchDeviceMemory
        device = torch.cuda.get_device_name() if on_gpu else "cpu"
    else:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        on_gpu, device, meter = bool(gpus), (gpus[0].name if gpus else "cpu"), TensorFlowDeviceMemory
    if not on_gpu:
        raise RuntimeError(f"--device cuda: the {backend} backend sees no GPU")
    return meter(), device


def set_tf32(mode, backend):
    """float32 products and convolutions on a GPU: "default", "on" (TF32) or "off" (full float32).

    "default" restores each framework's own choice: PyTorch uses TF32 in
    cuDNN's convolutions but not in its matrix products; JAX and TensorFlow
    use it in both. The PyTorch reference follows the same setting as the
    Keras backend it is compared with.
    """
    if backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = mode == "on"
        torch.backends.cudnn.allow_tf32 = mode != "off"
    elif backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision",
                          {"default": None, "on": "tensorfloat32", "off": "highest"}[mode])
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(mode != "off")


def _precision_settings(backend):
    """How float32 products and convolutions are computed on a GPU (TF32 or full float32)."""
    if backend == "torch":
        import torch

        return {"torch_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                "torch_cudnn_tf32": torch.backends.cudnn.allow_tf32}
    if backend == "jax":
        import jax

        return {"jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision or "default")}
    import tensorflow as tf

    return {"tensorflow_tf32": tf.config.experimental.tensor_float_32_execution_enabled()}


def _variant_shapes(model_name):
    from keras_convnext.models.variants import VARIANTS, multiply_adds

    if model_name not in VARIANTS:
        raise ValueError(f"--model {model_name!r} is unknown; choose one of {', '.join(VARIANTS)}.")
    variant = VARIANTS[model_name]
    return variant, multiply_adds


def _keras_inference(args):
    """(model, infer): `infer(batch)` runs `predict_on_batch` on the first `batch` of `args.batch_size` images.

    The images are pixels in [0, 255], (batch, resolution, resolution, 3).
    Sets the run's float32 setting on a GPU (`--tf32`) and its dtype policy
    first; the `keras_convnext_jit` implementation compiles the model with
    `jit_compile=True` (torch.compile on PyTorch: its first calls compile).
    """
    import keras

    import keras_convnext

    if args.device != "cpu":
        set_tf32(args.tf32, keras.backend.backend())
    if args.precision != "float32":
        keras.config.set_dtype_policy(args.precision)
    shape = (args.resolution, args.resolution, 3)
    if args.implementation == "keras_applications":
        model = getattr(keras.applications, args.model)(weights=None, input_shape=shape, classifier_activation=None)
    else:
        model = keras_convnext.CONSTRUCTORS[args.model](input_shape=shape, classifier_activation=None)
    if args.implementation == "keras_convnext_jit":
        model.compile(jit_compile=True)
    images = np.random.default_rng(0).uniform(0, 255, size=(args.batch_size,) + shape).astype("float32")
    return model, lambda batch: keras.ops.convert_to_numpy(model.predict_on_batch(images[:batch]))


def keras_worker(args):
    import keras

    # A first small product starts the backend's runtime (and compiler), which
    # the memory baseline then includes. The large products of the peak
    # measurement come last: allocators keep freed memory, which would hide
    # the model's own from the memory measurement.
    keras.ops.convert_to_numpy(keras.ops.matmul(keras.ops.ones((64, 64)), keras.ops.ones((64, 64))))
    memory, device = _keras_device(args)
    baseline = memory.baseline()
    model, infer = _keras_inference(args)
    jit_compile = args.implementation == "keras_convnext_jit"
    result = {"device": device}
    if args.inference:
        result.update(_measure_inference(args, infer, baseline, memory))
    if args.device != "cpu":
        result.update(_precision_settings(keras.backend.backend()))
    if args.train_batch_size:
        result.update(_keras_training(args, model, jit_compile, baseline, memory))
    if args.implementation != "keras_applications" and args.matmul_peak:
        on_gpu = args.device != "cpu"
        result["matmul_peak_gflops"] = _keras_matmul_peak("float32", on_gpu)
        if args.precision == "mixed_bfloat16":
            result["bfloat16_matmul_peak_gflops"] = _keras_matmul_peak("bfloat16", on_gpu)
    return result


# The reference implementations: HF transformers' model in eager mode (float32,
# or under autocast), and as a tuned user runs it: channels_last memory,
# autocast in the run's mixed precision, torch.compile.
REFERENCE_AUTOCAST = ("reference_autocast", "reference_tuned")


def _autocast_dtype(args):
    """The reference's autocast dtype for `args` (a torch dtype), or None where it runs in float32."""
    import torch

    if args.implementation not in REFERENCE_AUTOCAST or args.precision == "float32":
        return None
    return torch.float16 if args.precision == "mixed_float16" else torch.bfloat16


def _reference_inference(args):
    """(forward, infer, precision, memory_format) for HF transformers' ConvNeXt of `args.model`'s shape.

    Random weights. `forward` is the model (torch.compile'd for
    `reference_tuned`); `infer(batch)` runs the first `batch` of
    `args.batch_size` images in [0, 1) through it without gradients and
    copies the logits to the host; `precision()` is the autocast context
    (`_autocast_dtype`; disabled where that is None), which the training
    step uses too; `memory_format` is the images' layout (channels_last for
    `reference_tuned`). Sets the run's float32 setting on a GPU (`--tf32`) first.
    """
    import torch
    import transformers

    variant, _ = _variant_shapes(args.model)
    config_class, model_class = (
        (transformers.ConvNextV2Config, transformers.ConvNextV2ForImageClassification)
        if variant.version == "v2"
        else (transformers.ConvNextConfig, transformers.ConvNextForImageClassification)
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        set_tf32(args.tf32, "torch")
    config = config_class(depths=list(variant.stage_depths), hidden_sizes=list(variant.stage_dims), num_labels=1000)
    model = model_class(config).eval().to(device)
    tuned = args.implementation == "reference_tuned"
    memory_format = torch.channels_last if tuned else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    forward = torch.compile(model) if tuned else model
    images = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device)
    images = images.contiguous(memory_format=memory_format)
    autocast_dtype = _autocast_dtype(args)

    def precision():
        return torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)

    def infer(batch):
        with torch.no_grad(), precision():
            return forward(pixel_values=images[:batch]).logits.cpu()

    return forward, infer, precision, memory_format


def _reference_optimizer(args, model):
    """AdamW at 1e-4, or the fine-tuning recipe's settings (`--optimizer finetune`): the scaled
    learning rate and weight decay 0.05 on weights of two or more dimensions (biases and norms
    without), the groups the official recipe makes; its per-layer rate multipliers are left out."""
    import torch

    if args.optimizer != "finetune":
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.ndim > 1], "weight_decay": FINETUNE_WEIGHT_DECAY},
        {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=FINETUNE_LEARNING_RATE * args.train_batch_size / 256)


def _reference_training(args, forward, precision, memory_format, baseline, memory):
    import torch

    device = torch.device(args.device)
    forward.train()
    optimizer = _reference_optimizer(args, forward)
    # Loss scaling where autocast computes in float16, as PyTorch's AMP recipe does.
    scaler = torch.amp.GradScaler(device.type, enabled=_autocast_dtype(args) == torch.float16)
    train_images = torch.rand(args.train_batch_size, 3, args.resolution, args.resolution, device=device)
    train_images = train_images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (args.train_batch_size,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with precision():
            logits = forward(pixel_values=train_images).logits
        scaler.scale(torch.nn.functional.cross_entropy(logits.float(), labels)).backward()
        scaler.step(optimizer)
        scaler.update()
        _synchronize(device)

    # torch.compile compiles the training graph on the first step and may again on the second
    warm_steps = 2 if args.implementation == "reference_tuned" else 1
    return _measure_training(step, args, baseline, memory, warm_steps=warm_steps)


def reference_worker(args):
    import torch

    device = torch.device(args.device)
    # As for Keras: the runtime starts before the baseline.
    torch.mm(torch.ones(64, 64, device=device), torch.ones(64, 64, device=device)).cpu()
    memory = ResidentMemory() if args.device == "cpu" else TorchDeviceMemory()
    baseline = memory.baseline()
    forward, infer, precision, memory_format = _reference_inference(args)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if args.inference:
        result.update(_measure_inference(args, infer, baseline, memory))
    if device.type == "cuda":
        result.update(_precision_settings("torch"))
    if args.train_batch_size:
        result.update(_reference_training(args, forward, precision, memory_format, baseline, memory))
    if args.implementation == "reference" and args.matmul_peak:
        result["matmul_peak_gflops"] = _matmul_peak("float32", device)
        if args.precision == "mixed_bfloat16":
            result["bfloat16_matmul_peak_gflops"] = _matmul_peak("bfloat16", device)
    return result


def _synchronize(device):
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


MATMUL_SIZES = (1024, 2048, 4096)
GPU_MATMUL_SIZES = (2048, 4096, 8192)


def _matmul_peak(dtype="float32", device=None):
    """Best GFLOP/s of square matrix products through PyTorch (MKL or oneDNN, or cuBLAS)."""
    import torch

    device = device or torch.device("cpu")
    best = 0.0
    for size in GPU_MATMUL_SIZES if device.type == "cuda" else MATMUL_SIZES:
        a, b = (torch.rand(size, size, device=device).to(getattr(torch, dtype)) for _ in range(2))
        _, seconds = _timed(lambda: (torch.mm(a, b), _synchronize(device)), 5)
        best = max(best, 2 * size**3 / seconds / 1e9)
    return best


def _keras_matmul_peak(dtype="float32", on_gpu=False):
    """Best GFLOP/s of square matrix products through the Keras backend's own library.

    The libraries differ (MKL may take a slower code path on AMD processors,
    oneDNN and XLA's Eigen do not), so the machine's peak is the best of all.
    """
    import keras

    best = 0.0
    for size in GPU_MATMUL_SIZES if on_gpu else MATMUL_SIZES:
        a = keras.random.uniform((size, size), seed=1, dtype=dtype)
        b = keras.random.uniform((size, size), seed=2, dtype=dtype)
        # The product's sum comes back, not the product: that waits for the
        # device without timing a copy of the whole matrix.
        product_sum = lambda: keras.ops.cast(keras.ops.sum(keras.ops.matmul(a, b)), "float32")
        _, seconds = _timed(lambda: keras.ops.convert_to_numpy(product_sum()), 5)
        best = max(best, 2 * size**3 / seconds / 1e9)
    return best


def _implementations(args):
    """[(row name, Keras backend of its process, worker implementation)], the reference first."""
    implementations = [("pytorch-reference", "torch", "reference")] if args.reference else []
    if args.reference and args.precision == "mixed_bfloat16":
        implementations.append(("pytorch-reference/autocast-bf16", "torch", "reference_autocast"))
    for backend in args.backends:
        implementations.append((f"keras_convnext/{backend}", backend, "keras_convnext"))
        if args.torch_compile and backend == "torch":
            implementations.append(("keras_convnext/torch+jit_compile", backend, "keras_convnext_jit"))
        if args.keras_applications:
            implementations.append((f"keras.applications/{backend}", backend, "keras_applications"))
    return implementations


def _run_worker(args, backend, implementation):
    return run_in_backend(_worker_command(args, ["--worker", implementation]), backend, args.device, args.malloc)


def _worker_command(args, role):
    return [sys.executable, "-m", WORKER_MODULE] + role + _forward(args)


def _serving_inference(args):
    """`infer(batch)` of `args.implementation`, built as its `--worker` process builds it."""
    if args.implementation.startswith("reference"):
        return _reference_inference(args)[1]
    return _keras_inference(args)[1]


def serve(infer, batch_sizes, commands, output, untimed_first=True):
    """The worker side of `paired_latency`: times `infer(batch)` calls on request.

    Warms every batch size with two calls (compilation included), writes
    `READY`, then answers each `TIME <batch> <calls>` line of `commands` with
    `TIMES <JSON list of seconds, one per call>`, until `EXIT` or the end of
    `commands`. With `untimed_first`, each request first makes one untimed
    call: the other implementations ran since the last request, and their
    data evicted this one's weights from the caches, which a process serving
    call after call keeps warm.
    """
    for batch in batch_sizes:
        infer(batch)
        infer(batch)
    output.write("READY\n")
    output.flush()
    for line in commands:
        words = line.split()
        if not words or words[0] == "EXIT":
            break
        batch, calls = int(words[1]), int(words[2])
        if untimed_first:
            infer(batch)
        output.write("TIMES " + json.dumps(_call_times(lambda: infer(batch), calls)) + "\n")
        output.flush()


# Timed calls of one implementation per turn, by batch size (other sizes: 2).
PAIRED_CALLS = {1: 5}


def paired_latency(workers, batch_sizes, turns, calls, pause=0.25, answer_timeout=1800.0):
    """Inference latency of every implementation, all alive at once and timed in turn.

    `workers` maps a row name to the (command, environment) of a process that
    speaks `serve`'s protocol. In each turn, for each batch size, every
    implementation times `calls[batch]` calls, one implementation after the
    other: the order rotates by one each turn, and a pause before each lets
    the previous one's threads go idle. A drift in the machine's speed then
    reaches every implementation within the same turn, which separate
    processes run minutes apart cannot promise.

    Returns `{"latency_ms": {name: {str(batch): [median ms of each turn]}},
    "errors": {name: [lines]}}`; a worker that fails, or gives no answer
    within `answer_timeout` seconds (its `READY` included) and is stopped, is
    dropped from the turns after it and keeps its error lines.
    """
    processes, outputs, errors = {}, {}, {}
    for name, (command, environment) in workers.items():
        stderr = tempfile.TemporaryFile(mode="w+")
        process = subprocess.Popen(command, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
        processes[name], outputs[name] = (process, stderr), queue.Queue()
        # A thread per worker reads its output, so that a worker that hangs
        # can be waited for with a deadline.
        threading.Thread(target=_queue_lines, args=(process.stdout, outputs[name]), daemon=True).start()

    def answer(name, prefix):
        process, stderr = processes[name]
        deadline = time.monotonic() + answer_timeout
        while True:
            try:
                line = outputs[name].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                process.kill()
                process.wait()
                errors[name] = [f"no answer within {answer_timeout:g} s; the worker was stopped"]
                return None
            if line is None:
                break
            if line.startswith(prefix):
                return line[len(prefix):]
        process.wait()
        stderr.seek(0)
        errors[name] = _error_lines(stderr.read())
        return None

    def ask(name, batch):
        try:
            processes[name][0].stdin.write(f"TIME {batch} {calls[batch]}\n")
            processes[name][0].stdin.flush()
        except BrokenPipeError:
            pass  # the process ended; `answer` reads its error
        return answer(name, "TIMES ")

    names = [name for name in workers if answer(name, "READY") is not None]
    latency = {name: {str(batch): [] for batch in batch_sizes} for name in names}
    for turn in range(turns):
        for batch in batch_sizes:
            for name in names[turn % len(names):] + names[:turn % len(names)] if names else []:
                if name in errors:
                    continue
                time.sleep(pause)
                times = ask(name, batch)
                if times is not None:
                    latency[name][str(batch)].append(float(np.median(json.loads(times))) * 1000)
    for process, stderr in processes.values():
        if process.poll() is None:
            try:
                process.stdin.write("EXIT\n")
                process.stdin.close()
            except BrokenPipeError:
                pass
            process.wait()
        stderr.close()
    return {"latency_ms": {name: value for name, value in latency.items() if name not in errors}, "errors": errors}


def _queue_lines(stream, lines):
    """Puts each line of `stream` on the queue `lines`, then None for its end."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def paired_ratios(latency_ms, batch, reference="pytorch-reference"):
    """`{name: [reference ms / name's ms in each turn]}` for one batch size (higher is faster)."""
    reference_ms = latency_ms.get(reference, {}).get(str(batch), [])
    return {
        name: [ref / ours for ref, ours in zip(reference_ms, value[str(batch)])]
        for name, value in latency_ms.items()
        if name != reference and reference_ms
    }


def device_environment(device):
    """Environment variables that put every backend on `device` ("cpu" or "cuda").

    On "cpu" the GPUs are hidden, so a machine with one measures its
    processor. On "cuda", JAX and TensorFlow take GPU memory as they need it
    instead of reserving most of it up front, so that their memory use can
    be read.
    """
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def malloc_environment(malloc):
    """glibc's settings for a worker process: "default" (the system's) or "reuse"
    (`keras_convnext.reuse_freed_memory`'s, as environment variables)."""
    if malloc == "default":
        return {}
    from keras_convnext.process import REUSE_FREED_MEMORY_ENVIRONMENT

    return dict(REUSE_FREED_MEMORY_ENVIRONMENT)


def backend_environment(backend, device="cpu", malloc="default"):
    """This process's environment with `backend` as the Keras backend, on `device`, with glibc's `malloc` settings.

    The directory holding this keras_convnext comes first on PYTHONPATH, so
    workers import the same copy as the process that starts them.
    """
    python_path = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=python_path,
                **device_environment(device), **malloc_environment(malloc))


def run_in_backend(command, backend, device="cpu", malloc="default", timeout=None):
    """Runs a worker command under `backend` on `device`; its last `RESULT <json>` line, or `{"error": [...]}`.

    A worker still running after `timeout` seconds is stopped and reported as such.
    """
    environment = backend_environment(backend, device, malloc)
    # With a time limit the worker gets its own process group, so that
    # stopping it also stops what it started (torch.compile's compile workers).
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=timeout is not None)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"error": [f"stopped after {timeout:.0f} s, the time left to this run"]}
    completed = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        return {"error": _error_lines(completed.stderr or completed.stdout)}
    return json.loads(lines[-1][len("RESULT "):])


def _error_lines(output):
    """The last exception line (`SomeError: ...`), the line after it (Keras puts the message
    there) and the output's last line, each once."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return ["no output"]
    found = [i for i, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    picked = lines[found[-1] : found[-1] + 2] if found else []
    return list(dict.fromkeys(picked + lines[-1:]))


def _forward(args):
    return [
        "--model", args.model, "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
        "--precision", args.precision, "--repeats", str(args.repeats),
        "--train-batch-size", str(args.train_batch_size), "--device", args.device, "--tf32", args.tf32,
        "--matmul-peak" if args.matmul_peak else "--no-matmul-peak",
        "--inference" if args.inference else "--no-inference",
        "--batch1-latency" if args.batch1_latency else "--no-batch1-latency", "--optimizer", args.optimizer,
    ]


def _versions():
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for package in ("keras", "tensorflow", "jax", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX-BF16"}


def _cpu():
    """Processor name, core count and the vector features that decide float32/bfloat16 speed."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    features = [label for flag, label in CPU_FEATURES.items() if flag in flags]
    return f"{names[0]} x{len(names)} ({', '.join(features) or 'no AVX2'})"


def _gpu():
    """The first GPU's name, from nvidia-smi; "GPU" where it cannot be read."""
    try:
        completed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "GPU"
    lines = completed.stdout.strip().splitlines()
    return lines[0].strip() if completed.returncode == 0 and lines else "GPU"


def machine(device):
    """The processor, and on "cuda" the GPU before it: the report's machine line."""
    return _cpu() if device == "cpu" else f"{_gpu()}, host {_cpu()}"


def markdown(report):
    rows = report["results"]
    reference = rows.get("pytorch-reference", {})
    peaks = {name: row["matmul_peak_gflops"] for name, row in rows.items() if "matmul_peak_gflops" in row}
    peak_source = max(peaks, key=peaks.get) if peaks else None
    peak = peaks.get(peak_source)
    lines = [
        f"### {report['model']}, batch {report['batch_size']}, {report['resolution']}x{report['resolution']}, "
        f"{report['precision']}",
        "",
        f"{report['date']}, {report['machine']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
    ]
    if report.get("malloc", "default") != "default":
        lines += [
            "glibc's settings in every process, the reference's included: "
            + " ".join(f"{key}={value}" for key, value in malloc_environment(report["malloc"]).items())
            + " (`keras_convnext.reuse_freed_memory()`: freed memory is handed out again instead of new pages).",
            "",
        ]
    if not rows:  # --rounds 0: only the paired measurement ran
        return "\n".join(lines) + paired_markdown(report)
    lines += [
        "| implementation | images/s | x ref | batch-1 ms | x ref | train steps/s (batch "
        f"{report['train_batch_size']}) | x ref | first call s | peak MB | of ref MB | GFLOP/s | of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(row, key, inverse=False):
        if key not in row or key not in reference:
            return "-"
        value = reference[key] / row[key] if inverse else row[key] / reference[key]
        return f"{value:.2f}x"

    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {' '.join(row['error'])} |" + " |" * 11)
            continue
        gflops = row["inference_images_per_s"] * 2 * report["multiply_adds"] / 1e9
        fraction = f"{gflops / peak:.0%}" if peak else "-"
        lines.append(
            f"| {name} | {row['inference_images_per_s']:.2f} | {ratio(row, 'inference_images_per_s')} "
            f"| {row['batch1_latency_ms']:.1f} | {ratio(row, 'batch1_latency_ms', inverse=True)} "
            f"| {row.get('train_steps_per_s', float('nan')):.3f} | {ratio(row, 'train_steps_per_s')} "
            f"| {row['first_call_s']:.1f} | {row['peak_memory_mb']:.0f} "
            f"| {ratio(row, 'peak_memory_mb')} | {gflops:.1f} "
            f"| {fraction} |"
        )
    lines.append("")
    if peak:
        sizes = MATMUL_SIZES if report.get("device", "cpu") == "cpu" else GPU_MATMUL_SIZES
        measured = ", ".join(f"{name.split('/')[-1]} {value:.1f}" for name, value in peaks.items())
        lines.append(
            f"Matrix-multiply peak: {peak:.1f} GFLOP/s, the best float32 square product "
            f"({'/'.join(str(size) for size in sizes)}) of any library in this run "
            f"(GFLOP/s: {measured})."
        )
    bf16_peaks = {name: row["bfloat16_matmul_peak_gflops"] for name, row in rows.items()
                  if "bfloat16_matmul_peak_gflops" in row}
    if bf16_peaks:
        lines.append(
            "bfloat16 square products, GFLOP/s: "
            + ", ".join(f"{name.split('/')[-1]} {value:.1f}" for name, value in bf16_peaks.items())
            + "."
        )
    faults = {name: row["page_faults_per_call"] for name, row in rows.items()
              if row.get("page_faults_per_call") is not None}
    if faults:
        lines.append(
            f"Minor page faults per inference call (batch {report['batch_size']}; 4 KB pages written for the "
            "first time): " + ", ".join(f"{name} {value:.0f}" for name, value in faults.items()) + "."
        )
    rounds = report.get("rounds", [])
    if len(rounds) > 1:
        lines.append("")
        lines.append(
            f"Medians of {len(rounds)} rounds (every implementation once per round, in turn). "
            "Ratios to the reference of the same round, lowest-highest:"
        )
        for label, key, inverse in (
            ("images/s", "inference_images_per_s", False),
            ("batch-1", "batch1_latency_ms", True),
            ("train", "train_steps_per_s", False),
        ):
            spans = round_ratios(rounds, key, inverse)
            if spans:
                lines.append(
                    f"- {label}: "
                    + ", ".join(f"{name} {min(v):.2f}x-{max(v):.2f}x" for name, v in spans.items())
                )
    lines.append("")
    if report.get("device", "cpu") != "cpu":
        settings = {}
        for row in rows.values():
            settings.update({key: value for key, value in row.items() if "tf32" in key or "precision" in key})
        lines.append(
            "Peak MB: GPU memory that the framework's allocator handed out, above what it held before the model "
            "was built, during inference after the first call"
            + (" (JAX: since the process started, its peak cannot be reset)" if any(
                row.get("peak_memory_includes_first_call") for row in rows.values()) else "")
            + ". Every timed call waits for the GPU. float32 settings: "
            + (", ".join(f"{key} {value}" for key, value in sorted(settings.items())) or "not recorded")
            + "."
        )
        return "\n".join(lines) + "\n" + paired_markdown(report)
    lines.append(
        "Peak MB: resident memory above the process's memory before the model was built, during "
        "inference after the first call (weights included; tracing and compilation excluded; "
        "memory the allocator kept from building and compiling is released first, in every process)."
    )
    return "\n".join(lines) + "\n" + paired_markdown(report)


def paired_markdown(report):
    """The table of `paired_latency`'s measurement, or "" where none ran."""
    paired = report.get("paired")
    if not paired:
        return ""
    latency, batch_sizes = paired["latency_ms"], sorted(int(batch) for batch in paired["calls"])
    lines = [
        "",
        f"Paired inference latency: every implementation alive at once in its own process, "
        f"{paired['turns']} turns; in each, every implementation timed "
        + " and ".join(f"{paired['calls'][str(b)]} calls at batch {b}" for b in batch_sizes)
        + " in turn, after one untimed call (order rotated each turn, a pause before each), so each turn's "
        "ratio compares calls made under the same machine state. ms: median of the turns' medians; "
        "x ref: median of the turns' ratios (reference ms / ours), with their lower and upper quartiles.",
        "",
        "| implementation | " + " | ".join(f"batch-{b} ms | x ref | quartiles" for b in batch_sizes) + " |",
        "|---|" + "---|---|---|" * len(batch_sizes),
    ]
    ratios = {batch: paired_ratios(latency, batch) for batch in batch_sizes}
    for name, value in latency.items():
        cells = []
        for batch in batch_sizes:
            times, turn_ratios = value[str(batch)], ratios[batch].get(name)
            cells.append(f"{np.median(times):.1f}" if times else "-")
            if turn_ratios:
                low, middle, high = np.percentile(turn_ratios, [25, 50, 75])
                cells += [f"{middle:.2f}x", f"{low:.2f}x-{high:.2f}x"]
            else:
                cells += ["1.00x" if name == "pytorch-reference" else "-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, error in paired["errors"].items():
        lines.append(f"| {name} | failed: {' '.join(error)} |" + " |" * (3 * len(batch_sizes) - 1))
    against_applications = []
    for backend in BACKENDS:
        ours, theirs = f"keras_convnext/{backend}", f"keras.applications/{backend}"
        if ours in latency and theirs in latency:
            pair = {name: latency[name] for name in (ours, theirs)}
            against_applications.append(backend + " " + ", ".join(
                f"{np.median(paired_ratios(pair, batch, reference=theirs)[ours]):.2f}x at batch {batch}"
                for batch in batch_sizes
            ))
    if against_applications:
        lines += ["", "Against keras.applications on the same backend (median of the turns' ratios, "
                  "keras.applications ms / ours): " + "; ".join(against_applications) + "."]
    return "\n".join(lines) + "\n"


def build_parser(prog="keras-convnext benchmark", output_dir=DEFAULT_OUTPUT_DIR):
    """The benchmark's flags; `output_dir` is the default of `--output-dir`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ConvNeXtV2Tiny", help="a keras_convnext constructor name")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-batch-size", type=int, default=16, help="0 skips the training step")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every implementation this many times, in turn; report the medians "
                             "(0 with --paired: only the paired measurement)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--keras-applications", action="store_true",
                        help="also time keras.applications.<model> (V1 names only) on each backend")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where every implementation runs (cuda: the first GPU)")
    parser.add_argument("--tf32", default="default", choices=["default", "on", "off"],
                        help="on a GPU: TF32 in float32 products and convolutions for every implementation "
                             "(default: each framework's own choice, which differ)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time the PyTorch backend with jit_compile=True (torch.compile)")
    parser.add_argument("--malloc", default="default", choices=["default", "reuse"],
                        help="glibc's settings in every implementation's process, the reference's included: "
                             "the system's, or those of keras_convnext.reuse_freed_memory() (freed memory "
                             "handed out again instead of new pages)")
    parser.add_argument("--name", help="results file name (default: derived from the settings)")
    parser.add_argument("--paired", type=int, default=0, metavar="TURNS",
                        help="also time inference with every implementation alive at once, calls taken in turn "
                             "(batch 1 and --batch-size), for this many turns")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="time the PyTorch reference (HF transformers) too (default: yes)")
    parser.add_argument("--matmul-peak", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the machine's matrix-multiply peak in every process (default: yes)")
    parser.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True,
                        help="time inference at --batch-size (default: yes)")
    parser.add_argument("--batch1-latency", action=argparse.BooleanOptionalAction, default=True,
                        help="time inference at batch 1 too (default: yes)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "finetune"],
                        help="the training step's optimizer: AdamW at 1e-4, or the fine-tuning recipe's AdamW "
                             "(keras_convnext.training.finetune_optimizer; its learning rate and weight decay "
                             "in the reference)")
    parser.add_argument("--output-dir", default=output_dir,
                        help=f"where <name>.json and <name>.md go (default: {output_dir})")
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)  # the command line's own
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    return parser


def main(argv=None, output_dir=DEFAULT_OUTPUT_DIR):
    """Runs the benchmark (or, with `--worker`/`--serve`, one of its worker processes); returns 0.

    Each implementation runs in its own process; one that fails is reported
    as "failed: <its error>" in the table. Raises ValueError for an unknown
    `--model`.
    """
    args = build_parser(output_dir=output_dir).parse_args(argv)

    if args.worker:
        args.implementation = args.worker
        result = reference_worker(args) if args.worker.startswith("reference") else keras_worker(args)
        print("RESULT " + json.dumps(result))
        return 0

    if args.serve:
        args.implementation = args.serve
        serve(_serving_inference(args), sorted({1, args.batch_size}), sys.stdin, sys.stdout)
        return 0

    variant, multiply_adds = _variant_shapes(args.model)
    implementations = _implementations(args)
    rounds = [
        {name: _run_worker(args, backend, implementation) for name, backend, implementation in implementations}
        for _ in range(args.rounds)
    ]
    report = {
        "model": args.model,
        "batch_size": args.batch_size,
        "train_batch_size": args.train_batch_size,
        "resolution": args.resolution,
        "precision": args.precision,
        "multiply_adds": multiply_adds(variant.stage_depths, variant.stage_dims, (args.resolution,) * 2),
        "date": datetime.date.today().isoformat(),
        "machine": machine(args.device),
        "device": args.device,
        "malloc": args.malloc,
        "versions": _versions(),
        "results": median_results(rounds) if rounds else {},
        "rounds": rounds,
    }
    if args.paired:
        batch_sizes = sorted({1, args.batch_size})
        workers = {
            name: (
                _worker_command(args, ["--serve", implementation]),
                backend_environment(backend, args.device, args.malloc),
            )
            for name, backend, implementation in implementations
        }
        calls = {batch: PAIRED_CALLS.get(batch, 2) for batch in batch_sizes}
        report["paired"] = {"turns": args.paired, "calls": {str(b): c for b, c in calls.items()},
                            **paired_latency(workers, batch_sizes, args.paired, calls)}
    suffix = ("" if args.device == "cpu" else f"_{args.device}") + ("" if args.malloc == "default" else "_malloc_reuse")
    write_report(args.name or f"{args.model}_b{args.batch_size}_{args.resolution}_{args.precision}{suffix}",
                 report, markdown(report), args.output_dir)
    return 0


def median_results(rounds):
    """Per implementation, the median of each number over the rounds where it ran.

    The implementations run in turn within a round, so a drift in the
    machine's load hits them in every round alike; the medians keep one slow
    round from deciding a ratio. Settings (flags, names) come from the first
    round. An implementation that failed in every round keeps its first error.
    """
    merged = {}
    for name in rounds[0]:
        rows = [results[name] for results in rounds if "error" not in results[name]]
        if not rows:
            merged[name] = rounds[0][name]
            continue
        merged[name] = {
            key: float(np.median([row[key] for row in rows if key in row]))
            if isinstance(value, (int, float)) and not isinstance(value, bool) else value
            for key, value in rows[0].items()
        }
    return merged


def round_ratios(rounds, key, inverse=False):
    """`{implementation: [ratio to the reference in each round]}` for one number."""
    ratios = {}
    for results in rounds:
        reference = results.get("pytorch-reference", {})
        for name, row in results.items():
            if name == "pytorch-reference" or key not in row or key not in reference:
                continue
            ratios.setdefault(name, []).append(reference[key] / row[key] if inverse else row[key] / reference[key])
    return ratios


def write_report(name, report, text, directory=DEFAULT_OUTPUT_DIR):
    """Writes `<directory>/<name>.json` and `.md` (each to a temporary file, then renamed) and prints the table."""
    os.makedirs(directory, exist_ok=True)
    for suffix, write in ((".json", lambda f: json.dump(report, f, indent=2)), (".md", lambda f: f.write(text))):
        path = os.path.join(directory, name + suffix)
        with open(path + ".tmp", "w") as f:
            write(f)
        os.replace(path + ".tmp", path)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
