"""The 7x7 depthwise convolution's formulations, timed on the backend's default device.

    KERAS_BACKEND=jax python benchmarks/depthwise.py --batch-size 16

For each ConvNeXt Tiny stage shape, milliseconds per call of the forward
pass and of forward + backward (gradients of the input and the kernel) for:
`portable` (`keras.ops.depthwise_conv`), `shifted` (k*k shifted
multiply-adds with the Fourier-domain kernel gradient, JAX only) and
`dispatched` (what `keras_convnext.ops.depthwise_conv2d` picks on this
device). JAX and PyTorch; every timed call waits for the device.
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ((56, 96), (28, 192), (14, 384), (7, 768))
sys.path.insert(0, ROOT)

from keras_convnext.benchmark.throughput import _synchronize, _timed  # noqa: E402


def _median_ms(fn, repeats):
    """Milliseconds, the median of `repeats` calls after a first, untimed one."""
    return _timed(fn, repeats)[1] * 1000


def _jax_callables(formulations, inputs, kernel):
    import jax
    import jax.numpy as jnp

    timed = {}
    for name, fn in formulations.items():
        forward = jax.jit(fn)
        backward = jax.jit(jax.grad(lambda x, k, fn=fn: jnp.sum(fn(x, k) ** 2), argnums=(0, 1)))
        timed[name] = (
            lambda forward=forward: forward(inputs, kernel).block_until_ready(),
            lambda backward=backward: jax.block_until_ready(backward(inputs, kernel)),
        )
    return timed


def _torch_callables(formulations, inputs, kernel):
    import torch

    inputs, kernel = inputs.detach().requires_grad_(), kernel.detach().requires_grad_()

    def forward(fn):
        with torch.no_grad():
            fn(inputs, kernel)
        _synchronize(inputs.device)

    def backward(fn):
        torch.autograd.grad((fn(inputs, kernel) ** 2).sum(), (inputs, kernel))
        _synchronize(inputs.device)

    return {name: (lambda fn=fn: forward(fn), lambda fn=fn: backward(fn)) for name, fn in formulations.items()}


def measure(batch_size, repeats, stages=STAGES):
    import keras

    sys.path.insert(0, ROOT)
    from keras_convnext import ops

    backend = keras.backend.backend()
    formulations = {"portable": ops.portable_depthwise_conv2d, "dispatched": ops.depthwise_conv2d}
    if backend == "jax":
        from keras_convnext.ops import jax_backend

        formulations["shifted"] = jax_backend.depthwise_conv2d
    elif backend != "torch":
        raise SystemExit("depthwise.py times JAX and PyTorch")
    rng = np.random.default_rng(0)
    rows = []
    for size, channels in stages:
        inputs = keras.ops.convert_to_tensor(rng.standard_normal((batch_size, size, size, channels), "float32"))
        kernel = keras.ops.convert_to_tensor(rng.standard_normal((7, 7, channels, 1), "float32") * 0.1)
        make = _jax_callables if backend == "jax" else _torch_callables
        for name, (forward, backward) in make(formulations, inputs, kernel).items():
            rows.append({
                "shape": [batch_size, size, size, channels], "formulation": name,
                "forward_ms": _median_ms(forward, repeats), "forward_backward_ms": _median_ms(backward, repeats),
            })
    return rows


def _device():
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.devices()[0].device_kind
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    import keras

    rows = measure(args.batch_size, args.repeats)
    print(f"{keras.backend.backend()} on {_device()}")
    print("| shape | formulation | forward ms | forward+backward ms |\n|---|---|---|---|")
    for row in rows:
        print(f"| {tuple(row['shape'])} | {row['formulation']} | {row['forward_ms']:.3f} "
              f"| {row['forward_backward_ms']:.3f} |")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"backend": keras.backend.backend(), "device": _device(), "rows": rows}, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
