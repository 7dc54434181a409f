"""Isotropic ConvNeXt against a PyTorch model of the official definition's structure."""

import io

import numpy as np
import pytest

import keras_convnext as kc
from keras_convnext.layers import block as block_module
from keras_convnext.models import isotropic as isotropic_module
from keras_convnext.weights import cache as weights_cache
from keras_convnext.weights import download, registry
from keras_convnext.weights.shapes import variant_shapes
from local_server import LocalServer

torch = pytest.importorskip("torch")
nn = torch.nn


class ReferenceBlock(nn.Module):
    """The official V1 block with layer scale 0 (no gamma): NCHW in and out."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(nn.functional.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ReferenceIsotropic(nn.Module):
    """Stem conv 16x16 / 16 (no norm), `depth` blocks, mean pool, LayerNorm, Linear."""

    def __init__(self, depth, dim, classes):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, kernel_size=16, stride=16)
        self.blocks = nn.Sequential(*[ReferenceBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem(x)).mean((-2, -1))))


def _random_reference(depth, dim, classes, seed=0):
    torch.manual_seed(seed)
    reference = ReferenceIsotropic(depth, dim, classes).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.1 + (0.5 if parameter.ndim == 1 else 0.0))
    return reference


def _reference_logits(reference, images):
    with torch.no_grad():
        return reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def test_official_isotropic_checkpoint_matches_reference(tmp_path):
    reference = _random_reference(depth=2, dim=32, classes=7)
    path = tmp_path / "convnext_iso_tiny_test.pth"
    torch.save({"model": reference.state_dict()}, path)

    model = kc.ConvNeXtIsotropic(
        2, 32, classes=7, weights=str(path), input_shape=(64, 64, 3),
        include_preprocessing=False, classifier_activation=None,
    )
    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype("float32")
    expected = _reference_logits(reference, images)
    logits = np.asarray(model.predict(images, verbose=0))
    assert np.abs(expected).max() > 0.1
    assert np.abs(logits - expected).max() <= 1e-4


def test_isotropic_blocks_have_no_layer_scale_and_keep_the_patch_grid():
    model = kc.ConvNeXtIsotropic(3, 16, include_top=False, input_shape=(48, 64, 3))
    assert model.output_shape == (None, 3, 4, 16)
    assert all(model.get_layer(f"block{i}").layer_scale is None for i in range(3))


def test_checkpoint_of_another_depth_is_refused_whole(tmp_path):
    reference = ReferenceIsotropic(depth=3, dim=16, classes=5)
    path = tmp_path / "deeper.pth"
    torch.save(reference.state_dict(), path)
    model = kc.ConvNeXtIsotropic(2, 16, classes=5, input_shape=(32, 32, 3))
    before = [np.asarray(w) for w in model.get_weights()]
    with pytest.raises(kc.CheckpointError, match=r"blocks\.2\.dwconv\.weight"):
        kc.load_weights(model, str(path))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize(
    "name,official_millions",
    [("ConvNeXtIsotropicSmall", 22), ("ConvNeXtIsotropicBase", 87), ("ConvNeXtIsotropicLarge", 306)],
)
def test_parameter_count_matches_the_official_structure(name, official_millions, monkeypatch):
    # Zero initialization: counting Large's 304M parameters needs no random numbers.
    monkeypatch.setattr(block_module, "kernel_init", lambda: "zeros")
    monkeypatch.setattr(isotropic_module, "kernel_init", lambda: "zeros")
    depth, dim = isotropic_module.ISOTROPIC_VARIANTS[name]
    with torch.device("meta"):
        reference = ReferenceIsotropic(depth, dim, classes=1000)
    reference_count = sum(p.numel() for p in reference.parameters())
    model = getattr(kc, name)(input_shape=(32, 32, 3))
    count = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert count == reference_count
    # The registry converts checkpoints against this table, without building a model.
    assert {v.path: tuple(v.shape) for v in model.weights} == variant_shapes(name, 1000)
    # The official README's table, in millions.
    assert round(count / 1e6) == official_millions


def test_readme_isotropic_table_matches_the_code():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| `(ConvNeXtIsotropic\w+)` \| (\d+) \| (\d+) \| 16 \| ([\d.]+) \| ([\d.]+) \|$", readme, re.M)
    assert {row[0] for row in rows} == set(isotropic_module.ISOTROPIC_VARIANTS)
    for name, depth, dim, params, gmacs in rows:
        assert (int(depth), int(dim)) == isotropic_module.ISOTROPIC_VARIANTS[name]
        with torch.device("meta"):
            reference = ReferenceIsotropic(int(depth), int(dim), classes=1000)
        assert params == f"{sum(p.numel() for p in reference.parameters()) / 1e6:.2f}"
        gmacs_in_code = isotropic_module.isotropic_multiply_adds(int(depth), int(dim)) / 1e9
        assert gmacs == f"{gmacs_in_code:.3f}"
        # The official README's GFLOPs (multiply-adds) column: 4.3, 16.9, 59.7.
        assert round(gmacs_in_code, 1) == {"384": 4.3, "768": 16.9, "1024": 59.7}[dim]


def test_imagenet_tag_downloads_converts_and_loads_the_official_file(tmp_path, monkeypatch):
    # The registry entry of Small, served locally, at a reduced size to stay fast.
    monkeypatch.setenv(weights_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(download.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setitem(isotropic_module.ISOTROPIC_VARIANTS, "ConvNeXtIsotropicSmall", (2, 16))
    entry = registry.lookup("ConvNeXtIsotropicSmall", "imagenet")
    assert (entry.filename, entry.license, entry.top1) == ("convnext_iso_small_1k_224_ema.pth", "MIT", 78.7)
    reference = _random_reference(depth=2, dim=16, classes=1000, seed=4)
    buffer = io.BytesIO()
    torch.save({"model": reference.state_dict()}, buffer)
    server = LocalServer()
    try:
        server.files[entry.filename] = buffer.getvalue()
        monkeypatch.setitem(registry.REGISTRY, (entry.variant, entry.tag), entry._replace(url=server.url(entry.filename)))
        model = kc.ConvNeXtIsotropic(
            2, 16, weights="imagenet", variant_name="ConvNeXtIsotropicSmall", input_shape=(32, 32, 3),
            include_preprocessing=False, classifier_activation=None,
        )
    finally:
        server.close()
    images = np.random.default_rng(5).normal(size=(1, 32, 32, 3)).astype("float32")
    assert np.abs(np.asarray(model.predict(images, verbose=0)) - _reference_logits(reference, images)).max() <= 1e-4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(depth=0, dim=8), "depth must be a positive integer; got 0"),
        (dict(depth=2, dim=True), "dim must be a positive integer; got True"),
        (dict(depth=2, dim=8, classes="ten"), "classes must be a positive integer"),
        (dict(depth=2, dim=8, drop_path_rate=1.0), r"drop_path_rate .* in \[0, 1\); got 1.0"),
        (dict(depth=2, dim=8, input_shape=(16, 16, 3)), "at least 32x32"),
    ],
)
def test_bad_arguments_are_refused_in_words(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kc.ConvNeXtIsotropic(**kwargs)
