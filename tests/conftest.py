"""Shared fixtures: reference PyTorch models we did not write, with random weights."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
XLA_LEVEL_FLAG = "--xla_backend_optimization_level"
if os.environ["KERAS_BACKEND"] == "jax" and XLA_LEVEL_FLAG not in os.environ.get("XLA_FLAGS", ""):
    # Compiling is most of the JAX run's time, and at LLVM's level 0 it is
    # much faster. The level is LLVM's optimization of the code XLA
    # generates, not what it computes; tests/test_weights.py reruns the parity
    # and fast-path tests at the default level, 3, which users run. XLA:CPU's
    # older loop emitters, instead of its MLIR fusion emitters, cut compiling
    # by about another third, with the same losses to every printed digit.
    flags = f"{XLA_LEVEL_FLAG}=0 --xla_cpu_use_fusion_emitters=false"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()

# With several pytest workers (run_tests.sh), the PyTorch and TensorFlow runs give
# each worker its share of the cores: OpenMP threads that find their cores busy with
# the other worker's wait for them, which made both runs markedly slower. The JAX
# run was not faster so and keeps XLA's defaults.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
SHARE_THE_CORES = _WORKERS > 1 and os.environ["KERAS_BACKEND"] != "jax"
if SHARE_THE_CORES:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(_name, _THREADS)

import numpy as np
import pytest

import keras


def assert_speed_up_kept(condition, detail):
    """The assertion of a `perf_contract` test: what the compiler or framework made of a fast path.

    Such a test pins compiler internals (HLO text, temporary-buffer sizes,
    graph-optimizer op names). Its failure means a speed-up was lost, for
    example after a framework upgrade, not that a result is wrong: the
    value tests say that.
    """
    assert condition, (
        f"A speed-up was lost: {detail}. Results are still checked by the agreement tests; "
        "a framework or compiler upgrade may have changed what this perf_contract test pins."
    )


# The modules that take longest, first: in the PyTorch and TensorFlow runs, run_tests.sh
# hands each module to one worker (`--dist loadscope`, so a module's fixtures are built
# once), in this order, so that a long module does not run alone at the end.
LONGEST_MODULES = ("test_cli.py", "test_benchmarks.py", "test_detseg.py", "test_fcmae.py", "test_export.py",
                   "test_models.py", "test_examples.py", "test_weights.py", "test_hub.py")


def pytest_collection_modifyitems(config, items):
    if not SHARE_THE_CORES:
        return

    def rank(item):
        name = item.path.name
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=rank)


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _reset_keras_state():
    yield
    keras.config.set_image_data_format("channels_last")
    keras.config.set_dtype_policy("float32")
    # Without the full garbage collection clear_session runs by default, which
    # takes over a second per test once the process holds many models.
    keras.backend.clear_session(free_memory=False)


def randomize_torch_model(module, seed=0):
    """Gives every parameter a random, non-trivial value (norm scales around 1).

    GRN gamma/beta and layer scale become clearly nonzero, so a mapping that
    drops or misplaces them changes the outputs.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            is_norm = ("norm" in name) and parameter.ndim == 1
            if is_norm and leaf == "weight":
                parameter.copy_(1.0 + 0.2 * noise)
            elif "grn" in name or "layer_scale" in name or leaf == "gamma":
                parameter.copy_(0.3 * noise + (0.5 if "layer_scale" in name or leaf == "gamma" else 0.0))
            elif parameter.ndim == 1:
                parameter.copy_(0.05 * noise)
            else:
                fan_in = int(np.prod(parameter.shape[1:]))
                parameter.copy_(noise / np.sqrt(max(fan_in, 1)))
    module.eval()
    return module


def hf_reference(version, depths, dims, classes=1000, seed=0):
    """An HF transformers ConvNeXt (v1) or ConvNeXt V2 classifier with random weights."""
    import torch
    import transformers

    if version == "v2":
        config = transformers.ConvNextV2Config(
            depths=list(depths), hidden_sizes=list(dims), num_labels=classes, layer_norm_eps=1e-6
        )
        model = transformers.ConvNextV2ForImageClassification(config)
    else:
        config = transformers.ConvNextConfig(
            depths=list(depths), hidden_sizes=list(dims), num_labels=classes, layer_norm_eps=1e-6
        )
        model = transformers.ConvNextForImageClassification(config)
    torch.manual_seed(seed)
    return randomize_torch_model(model, seed)


def torch_logits(model, images_nhwc):
    """Logits of an HF model for normalized NHWC float32 images."""
    import torch

    with torch.no_grad():
        pixels = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        return model(pixel_values=pixels).logits.numpy()


@pytest.fixture(scope="session")
def hf_v2_atto():
    return hf_reference("v2", (2, 2, 6, 2), (40, 80, 160, 320), seed=1)


@pytest.fixture(scope="session")
def hf_v1_atto():
    return hf_reference("v1", (2, 2, 6, 2), (40, 80, 160, 320), seed=2)


def random_images(batch, height, width, seed=0, channels=3):
    return np.random.default_rng(seed).normal(size=(batch, height, width, channels)).astype("float32")


# ---------------------------------------------------------------- a checkpoint server for download tests

OFFICIAL_FILENAME = "convnextv2_atto_1k_224_ema.pt"


def official_bytes(reference, scale=1.0):
    """The bytes of a `torch.save` file of `reference` in the official naming, as released."""
    import io

    import torch

    from naming_fixtures import hf_to_official

    state_dict = hf_to_official({k: v.detach().clone() * scale for k, v in reference.state_dict().items()})
    buffer = io.BytesIO()
    torch.save({"model": state_dict}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def official_checkpoint(hf_v2_atto):
    return official_bytes(hf_v2_atto)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """An empty weights cache for one test, without files supplied by hand or a download deadline."""
    from keras_convnext.weights import cache, download

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(download.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.delenv(download.DEADLINE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def server(official_checkpoint):
    """A local server (`tests/local_server.py`) with `official_checkpoint` as `OFFICIAL_FILENAME`."""
    from local_server import LocalServer

    server = LocalServer()
    server.files[OFFICIAL_FILENAME] = official_checkpoint
    yield server
    server.close()
