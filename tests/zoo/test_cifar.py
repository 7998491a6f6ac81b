"""CIFAR ResNets and JPEG CIFAR-10 (fishertune.zoo). Tests on real files skip when
``$FISHERTUNE_DATA/vision`` is absent."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fishertune.utils.settings import data_root
from fishertune.zoo import (
    CifarResNet,
    PadShortcut,
    disjoint_draws,
    draw_per_class,
    evaluate_accuracy,
    gaussian_noise,
    hflip,
    load_cifar_jpeg,
    load_cifar_resnet,
    normalize,
    random_crop,
    random_hflip,
    random_rotation,
    rotate,
)
from fishertune.zoo import cifar_jpeg as cj
from fishertune.zoo.cifar_resnet import GROUPS


def _vision(name: str) -> Path:
    path = data_root() / "vision" / name
    if not path.is_file():
        pytest.skip(f"{name} not found under FISHERTUNE_DATA/vision ({data_root()})")
    return path


# --- architecture (no data) ------------------------------------------------------------------------

@pytest.mark.parametrize("depth,params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_parameter_counts_match_readme(depth: int, params: int) -> None:
    model = CifarResNet(depth)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.blocks()) == 3 * (depth - 2) // 6


def test_resnet56_has_27_blocks_named_like_weights() -> None:
    model = CifarResNet(56)
    names = [n for n, _ in model.blocks()]
    assert len(names) == 27
    assert names[0] == "layer1.0" and names[9] == "layer2.0" and names[-1] == "layer3.8"
    assert [len(s) for s in model.stages] == [9, 9, 9]
    modules = dict(model.named_modules())
    assert all(modules[n] is b for n, b in model.blocks())
    # freeze groups refer to real top-level modules, and cover every parameter exactly once
    tops = [m for group in GROUPS.values() for m in group]
    owners = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert sorted(tops) == sorted(owners)


def test_pad_shortcut_by_hand() -> None:
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    out = PadShortcut(4, 8)(x)
    assert out.shape == (2, 8, 2, 2)
    assert torch.equal(out[:, :2], torch.zeros(2, 2, 2, 2)) and torch.equal(out[:, 6:], torch.zeros(2, 2, 2, 2))
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert out[0, 2, 1, 1] == x[0, 0, 2, 2]


def test_forward_shapes_and_block_replaced_by_shortcut() -> None:
    torch.manual_seed(0)
    model = CifarResNet(20).eval()
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, 10) and model.features(x).shape == (3, 64)
    # every block (down-sampling ones included) can be swapped for its own shortcut
    for stage in model.stages:
        for i in range(len(stage)):
            stage[i] = stage[i].shortcut
    assert model(x).shape == (3, 10)


def test_bad_depth_and_bad_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="no pretrained"):
        load_cifar_resnet(110)
    monkeypatch.setenv("FISHERTUNE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="resnet20.safetensors"):
        load_cifar_resnet(20)
    (tmp_path / "vision").mkdir()
    (tmp_path / "vision" / "resnet20.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="sha256"):
        load_cifar_resnet(20)


def test_wrong_weights_named_in_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in CifarResNet(20).state_dict().items() if "num_batches" not in k}
    save_file(state, str(tmp_path / "r20.safetensors"))
    assert isinstance(load_cifar_resnet(20, tmp_path / "r20.safetensors"), CifarResNet)
    with pytest.raises(ValueError, match="r20.safetensors.*ResNet-56"):
        load_cifar_resnet(56, tmp_path / "r20.safetensors")


# --- real weights and images -----------------------------------------------------------------------

@pytest.mark.parametrize("depth,n_keys", [(20, 97), (56, 277)])
def test_strict_load_real_weights(depth: int, n_keys: int) -> None:
    from safetensors.torch import load_file

    path = _vision(f"resnet{depth}.safetensors")
    model = load_cifar_resnet(depth)
    state = load_file(str(path))
    assert len(state) == n_keys
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    assert not model.training


@pytest.fixture(scope="module")
def test_head() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 100 test files of each class (1,000 images, balanced)."""
    _vision("cifar10_test_jpeg.zip")
    return load_cifar_jpeg("test", first_per_class=100)


def test_first_per_class_layout(test_head: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = test_head
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(labels, torch.arange(10).repeat_interleave(100))
    # README: test-set channel means (0.494, 0.485, 0.450) on [0, 1]; a 1,000-image subset is close
    means = images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.494, 0.485, 0.450]), atol=0.03)


@pytest.mark.parametrize("depth,readme", [(20, 81.03), pytest.param(56, 83.20, marks=pytest.mark.slow)])
def test_accuracy_near_readme(test_head: tuple[torch.Tensor, torch.Tensor], depth: int, readme: float) -> None:
    _vision(f"resnet{depth}.safetensors")
    images, labels = test_head
    acc = 100 * evaluate_accuracy(load_cifar_resnet(depth), images, labels)
    assert abs(acc - readme) < 3.5, acc
    # colour order matters: BGR must be clearly worse (README: 70.4 % for ResNet-20 on the full set)
    if depth == 20:
        sub = slice(None, None, 4)  # 250 images, 25 per class
        rgb = 100 * evaluate_accuracy(load_cifar_resnet(depth), images[sub], labels[sub])
        bgr = 100 * evaluate_accuracy(load_cifar_resnet(depth), images[sub].flip(1), labels[sub])
        assert bgr < rgb - 5, (rgb, bgr)


# --- zip reading and cache (a tiny synthetic zip) ----------------------------------------------------

def _tiny_zip(path: Path, folder: str = "test", extra: str | None = None) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for cls in ("truck", "airplane", "cat"):  # not in label order, on purpose
            for num in ("0001", "0000"):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
                zf.writestr(f"{folder}/{cls}/{num}.jpg", buf.getvalue())
        if extra:
            zf.writestr(extra, b"x")


def _use_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw) -> Path:
    from fishertune.zoo.cifar_resnet import sha256_file

    (tmp_path / "data" / "vision").mkdir(parents=True)
    zpath = tmp_path / "data" / "vision" / "tiny.zip"
    _tiny_zip(zpath, **kw)
    monkeypatch.setenv("FISHERTUNE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(cj.SPLITS, "tiny", ("tiny.zip", "test", sha256_file(zpath)))
    return zpath


def test_zip_order_decode_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    zpath = _use_tiny(tmp_path, monkeypatch)
    images, labels = load_cifar_jpeg("tiny")
    assert labels.tolist() == [0, 0, 3, 3, 9, 9]  # airplane, cat, truck; files 0000 before 0001
    with zipfile.ZipFile(zpath) as zf:
        ref = np.array(Image.open(io.BytesIO(zf.read("test/cat/0001.jpg"))).convert("RGB"))
    assert torch.equal(images[3], torch.from_numpy(ref).permute(2, 0, 1))
    cached = sorted(p.name for p in (tmp_path / "cache" / "vision").glob("*.npy"))
    assert len(cached) == 2
    again, labels2 = load_cifar_jpeg("tiny")  # from the cache now
    assert torch.equal(again, images) and torch.equal(labels2, labels)
    fresh, _ = load_cifar_jpeg("tiny", cache=False)
    assert torch.equal(fresh, images)
    first, first_labels = load_cifar_jpeg("tiny", first_per_class=1)
    assert first_labels.tolist() == [0, 3, 9] and torch.equal(first, images[::2])


def test_zip_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_tiny(tmp_path, monkeypatch, extra="test/unicorn/0000.jpg")
    with pytest.raises(ValueError, match="unicorn"):
        load_cifar_jpeg("tiny", cache=False)
    monkeypatch.setitem(cj.SPLITS, "tiny", ("tiny.zip", "test", "0" * 64))
    with pytest.raises(ValueError, match="sha256"):
        load_cifar_jpeg("tiny")
    with pytest.raises(ValueError, match="unknown split"):
        load_cifar_jpeg("valid")


def test_normalize_by_hand() -> None:
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                           (1 - 0.406) / 0.225]))
    assert torch.allclose(normalize(x.float() / 255), out)


# --- k-per-class draws ---------------------------------------------------------------------------------

LABELS = torch.arange(10).repeat_interleave(50)[torch.randperm(500, generator=torch.Generator().manual_seed(1))]


def test_draw_seeded_and_balanced() -> None:
    a = draw_per_class(LABELS, 10, seed=3)
    assert torch.equal(a, draw_per_class(LABELS, 10, seed=3))
    assert not torch.equal(a, draw_per_class(LABELS, 10, seed=4))
    assert len(a) == 100 and len(set(a.tolist())) == 100
    assert torch.equal(torch.bincount(LABELS[a], minlength=10), torch.full((10,), 10))


def test_draw_exclude_and_disjoint() -> None:
    draws = disjoint_draws(LABELS, 10, seeds=[0, 1, 2, 3, 4])
    sets = [set(d.tolist()) for d in draws]
    for i in range(5):
        assert torch.equal(torch.bincount(LABELS[draws[i]], minlength=10), torch.full((10,), 10))
        for j in range(i):
            assert not sets[i] & sets[j]
    assert torch.equal(draws[0], draw_per_class(LABELS, 10, seed=0))  # the first draw is the plain one
    val = draw_per_class(LABELS, 2, seed=9, exclude=draws[0])
    assert not set(val.tolist()) & sets[0]
    with pytest.raises(ValueError, match="cannot draw"):
        disjoint_draws(LABELS, 10, seeds=range(6))


# --- augmentations ------------------------------------------------------------------------------------

def _images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_flip() -> None:
    x = _images()
    assert torch.equal(hflip(hflip(x)), x) and torch.equal(hflip(x)[..., 0], x[..., -1])
    assert torch.equal(random_hflip(x, p=1.0), hflip(x)) and torch.equal(random_hflip(x, p=0.0), x)
    out = random_hflip(x, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(o, xi) or torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x))


def test_random_crop_matches_loop() -> None:
    x = _images()
    assert torch.equal(random_crop(x, padding=0), x)
    out = random_crop(x, padding=2, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    oy, ox = torch.randint(0, 5, (4,), generator=g), torch.randint(0, 5, (4,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):
        assert torch.equal(out[i], padded[i, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 8])
    assert random_crop(x[0].to(torch.uint8), padding=1).shape == (3, 8, 8)


def test_rotation() -> None:
    x = _images()
    assert torch.equal(rotate(x, 180), x.flip(-1).flip(-2))
    assert torch.equal(rotate(x, 360), x) and torch.equal(rotate(rotate(x, 90), -90), x)
    # the bilinear path agrees with the exact one where both apply (sign convention included)
    assert torch.allclose(cj._rotate_batch(x, torch.full((4,), 90.0)), rotate(x, 90), atol=1e-5)
    assert torch.allclose(cj._rotate_batch(x, torch.full((4,), 180.0)), rotate(x, 180), atol=1e-5)
    assert torch.allclose(random_rotation(x, 0.0), x, atol=1e-6)
    small = rotate(x, 10)
    assert small.shape == x.shape and not torch.allclose(small, x)
    with pytest.raises(TypeError, match="float"):
        rotate(x.to(torch.uint8), 10)


def test_gaussian_noise() -> None:
    x = torch.zeros(2, 3, 64, 64)
    out = gaussian_noise(x, 0.5, generator=torch.Generator().manual_seed(0))
    assert abs(out.std().item() - 0.5) < 0.02 and abs(out.mean().item()) < 0.02
    assert torch.equal(gaussian_noise(x, 0.0), x)
    with pytest.raises(TypeError, match="float"):
        gaussian_noise(x.to(torch.uint8), 0.1)
