"""Model parallelism: `model_parallel_layout_map` on four JAX host devices, against one device."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras

import keras_convnext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MODEL_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    import keras
    import keras_convnext

    def build():
        return keras_convnext.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), version="v2", classes=6,
                                       input_shape=(32, 32, 3), classifier_activation=None)

    def train(model, steps=3):
        model.compile(optimizer=keras.optimizers.AdamW(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return [float(model.train_on_batch(images, labels)) for _ in range(steps)]

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 6, (8,))
    single = build()
    weights = single.get_weights()
    single_loss = train(single)

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 2), ["data", "model"], devices)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=keras_convnext.model_parallel_layout_map(mesh), batch_dim_name="data"))
    sharded = build()
    sharded.set_weights(weights)
    layouts = {v.path: [list(v.value.sharding.spec), list(v.value.addressable_shards[0].data.shape)]
               for v in sharded.weights}
    sharded_loss = train(sharded)
    print("RESULT " + json.dumps({"devices": len(devices), "layouts": layouts,
                                  "single_loss": single_loss, "sharded_loss": sharded_loss}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution.ModelParallel runs on JAX")
def test_model_parallel_splits_the_wide_linear_layers_and_trains_as_one_device(tmp_path):
    script = tmp_path / "model_parallel.py"
    script.write_text(_MODEL_PARALLEL_SCRIPT)
    # Appended, so the subprocess keeps the test run's other XLA flags (conftest.py).
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS=flags,
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])

    assert result["devices"] == 4
    layouts = result["layouts"]
    # (spec, one device's shard shape): a block of width 8 has a hidden width of 32, 16 per model shard
    assert layouts["stage0_block0/pwconv1/kernel"] == [[None, "model"], [8, 16]]
    assert layouts["stage0_block0/pwconv1/bias"] == [["model"], [16]]
    assert layouts["stage0_block0/grn/gamma"] == [["model"], [16]]
    assert layouts["stage3_block0/pwconv2/kernel"] == [["model", None], [64, 32]]
    assert layouts["predictions/kernel"] == [["model", None], [16, 6]]
    assert layouts["stage0_block0/dwconv/kernel"][1] == [7, 7, 8, 1]  # replicated
    assert layouts["stem_conv/kernel"][1] == [4, 4, 3, 8]
    assert result["single_loss"][-1] < result["single_loss"][0]  # the weights did move
    np.testing.assert_allclose(result["sharded_loss"], result["single_loss"], rtol=1e-5)


def test_a_mesh_without_the_model_axis_is_refused_in_words():
    # The layout map is data: device names suffice, on every backend.
    mesh = keras.distribution.DeviceMesh((2,), ["batch"], ["cpu:0", "cpu:1"])
    with pytest.raises(ValueError, match="none named 'model'.*DeviceMesh"):
        keras_convnext.model_parallel_layout_map(mesh)
    layout_map = keras_convnext.model_parallel_layout_map(mesh, model_axis="batch")
    assert layout_map["stage2_block5/pwconv2/kernel"].axes == ("batch", None)
    assert layout_map["stage2_block5/dwconv/kernel"] is None
    assert layout_map["classifier/convnext_v2_base/stage0_block0/grn/beta"].axes == ("batch",)
