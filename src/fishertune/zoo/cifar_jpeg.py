"""CIFAR-10 images stored as JPEG (quality 75), from ``$FISHERTUNE_DATA/vision``: decoding with
Pillow into uint8 tensors (cached as ``.npy``), normalisation, seeded k-per-class draws for the
few-shot setting, and simple batch augmentations as tensor functions.

The JPEG artefacts are a real domain shift for models trained on the lossless images (ResNet-56:
93.6 % clean, about 83.2 % here), which makes these files a target domain for small-data fine-tuning.
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fishertune.utils.io import atomic_write, file_lock
from fishertune.utils.progress import track
from fishertune.utils.settings import cache_root, data_root

CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck")
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet statistics: what the pretrained CIFAR ResNets were trained with (see the README)."""

SPLITS: dict[str, tuple[str, str, str]] = {
    # split -> (zip file, folder inside the zip, sha256)
    "test": ("cifar10_test_jpeg.zip", "test",
             "b109075b44d9525eb3796e49b290b0a6c1beb17d7f4106c1a074e20947d37829"),
    "train5k": ("cifar10_train5k_jpeg.zip", "train",
                "40659c07a2d96b27994076df7e8db6fab81b00b6309c973610ea934c13c694a0"),
}

_ENTRY = re.compile(r"^(?P<split>[^/]+)/(?P<cls>[^/]+)/(?P<num>\d+)\.jpg$")


def zip_path(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLITS)}")
    return data_root() / "vision" / SPLITS[split][0]


def _entries(zf: zipfile.ZipFile, folder: str, zpath: Path) -> list[tuple[int, str, str]]:
    """``(label, file number, entry name)`` for every image, sorted by label then number."""
    out = []
    for name in zf.namelist():
        if name.endswith("/"):
            continue
        m = _ENTRY.match(name)
        if m is None or m["split"] != folder:
            raise ValueError(f"{zpath}: unexpected entry {name!r} (want {folder}/<class>/NNNN.jpg)")
        if m["cls"] not in CLASSES:
            raise ValueError(f"{zpath}: entry {name!r} has unknown class {m['cls']!r}")
        out.append((CLASSES.index(m["cls"]), m["num"], name))
    out.sort()
    return out


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape != (32, 32, 3):
        raise ValueError(f"{name}: image of shape {arr.shape}, expected 32x32 RGB")
    return arr


def _read_zip(zpath: Path, folder: str, first_per_class: int | None) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(zpath) as zf:
        entries = _entries(zf, folder, zpath)
        if first_per_class is not None:
            seen: dict[int, int] = {}
            kept = []
            for e in entries:
                if seen.get(e[0], 0) < first_per_class:
                    kept.append(e)
                    seen[e[0]] = seen.get(e[0], 0) + 1
            entries = kept
        images = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
        for i, (_, _, name) in enumerate(track(entries, f"decode {zpath.name}")):
            images[i] = _decode(zf.read(name), f"{zpath}:{name}")
    labels = np.array([e[0] for e in entries], dtype=np.int64)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file handle: np.save would append ".npy" to a path
            np.save(fh, arr)
    atomic_write(path, writer)


def load_cifar_jpeg(split: str = "test", *, first_per_class: int | None = None, cache: bool = True,
                    verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64, sorted by class then file number.

    ``split`` is ``"test"`` (10,000 images) or ``"train5k"`` (5,000). ``first_per_class`` keeps only
    the first files of each class (decoded directly, not cached). The full split is cached as two
    ``.npy`` files under ``$FISHERTUNE_CACHE/vision`` keyed by the zip's sha256; ``verify`` checks that
    hash against the README's.
    """
    zpath = zip_path(split)
    _, folder, expected = SPLITS[split]
    if not zpath.is_file():
        raise FileNotFoundError(f"{zpath} not found; put the vision dataset under FISHERTUNE_DATA "
                                f"(now {data_root()})")
    if verify:
        from fishertune.zoo.cifar_resnet import sha256_file

        got = sha256_file(zpath)
        if got != expected:
            raise ValueError(f"{zpath}: sha256 {got} != expected {expected} (corrupt or wrong file)")
    if first_per_class is not None:
        if first_per_class < 1:
            raise ValueError(f"first_per_class must be >= 1, got {first_per_class}")
        images, labels = _read_zip(zpath, folder, first_per_class)
        return torch.from_numpy(images), torch.from_numpy(labels)
    if not cache:
        images, labels = _read_zip(zpath, folder, None)
        return torch.from_numpy(images), torch.from_numpy(labels)
    base = cache_root() / "vision" / f"cifar10_{split}_jpeg_{expected[:16]}"
    img_p, lab_p = base.with_name(base.name + "_images.npy"), base.with_name(base.name + "_labels.npy")
    with file_lock(base):
        if not (img_p.is_file() and lab_p.is_file()):
            images, labels = _read_zip(zpath, folder, None)
            _save_npy(img_p, images)
            _save_npy(lab_p, labels)
    images, labels = np.load(img_p), np.load(lab_p)
    if images.shape != (len(labels), 3, 32, 32) or images.dtype != np.uint8:
        raise ValueError(f"{img_p}: corrupt cache (shape {images.shape}, dtype {images.dtype}); delete it")
    return torch.from_numpy(images), torch.from_numpy(labels)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] (or floats in [0, 1]) -> float32 normalised with :data:`MEAN`/:data:`STD`."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def draw_per_class(labels: torch.Tensor | np.ndarray, k: int, seed: int, *,
                   exclude: torch.Tensor | np.ndarray | Sequence[int] | None = None) -> torch.Tensor:
    """Indices of ``k`` images of every class, drawn without replacement by ``seed`` (sorted).

    Indices in ``exclude`` are never drawn (e.g. a validation draw that must not overlap training).
    Raises when a class has fewer than ``k`` images left.
    """
    lab = np.asarray(labels)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    allowed = np.ones(len(lab), dtype=bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(lab):
        pool = np.flatnonzero((lab == c) & allowed)
        if len(pool) < k:
            raise ValueError(f"class {c} has {len(pool)} images left, cannot draw {k}")
        picked.append(rng.choice(pool, size=k, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64))


def disjoint_draws(labels: torch.Tensor | np.ndarray, k: int, seeds: Sequence[int]) -> list[torch.Tensor]:
    """One k-per-class draw per seed, each disjoint from the earlier ones (draw i excludes 0..i-1)."""
    used: list[torch.Tensor] = []
    out = []
    for s in seeds:
        idx = draw_per_class(labels, k, s, exclude=torch.cat(used) if used else None)
        out.append(idx)
        used.append(idx)
    return out


# --- augmentations: batch tensors (N, C, H, W); `generator` makes them reproducible ---------------

def _batch(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x, False


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator).to(device)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of every image."""
    return x.flip(-1)


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    xb, single = _batch(x)
    flip = (_rand(len(xb), generator, xb.device) < p).view(-1, 1, 1, 1)
    out = torch.where(flip, xb.flip(-1), xb)
    return out[0] if single else out


def random_crop(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` on each side, then crop back to the original size at a random offset."""
    xb, single = _batch(x)
    n, _, h, w = xb.shape
    padded = F.pad(xb, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(xb.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(xb.device)
    rows = (oy[:, None] + torch.arange(h, device=xb.device))[:, :, None]  # (n, h, 1)
    cols = (ox[:, None] + torch.arange(w, device=xb.device))[:, None, :]  # (n, 1, w)
    nidx = torch.arange(n, device=xb.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[nidx, rows, cols].permute(0, 3, 1, 2).contiguous()
    return out[0] if single else out


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate every image counter-clockwise by ``degrees``: exact for multiples of 90 (any dtype),
    bilinear with zero fill otherwise (float only)."""
    if float(degrees) % 90 == 0:
        return torch.rot90(x, int(degrees // 90) % 4, dims=(-2, -1))
    xb, single = _batch(x)
    out = _rotate_batch(xb, torch.full((len(xb),), float(degrees), device=xb.device))
    return out[0] if single else out


def _rotate_batch(xb: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    if not xb.is_floating_point():
        raise TypeError("rotation by a non-multiple of 90 degrees needs float images")
    t = degrees.to(xb.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(t), torch.sin(t)
    zero = torch.zeros_like(t)
    # affine_grid maps output coords to input coords; counter-clockwise image rotation in (x right,
    # y down) coordinates samples the input at R(-theta)... with y down this is [[c, -s], [s, c]].
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
    return F.grid_sample(xb, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotation(x: torch.Tensor, max_degrees: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees] (float images)."""
    xb, single = _batch(x)
    angles = (_rand(len(xb), generator, xb.device) * 2 - 1) * max_degrees
    out = _rotate_batch(xb, angles)
    return out[0] if single else out


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add N(0, std^2) noise to float images."""
    if not x.is_floating_point():
        raise TypeError("gaussian_noise needs float images (normalise or divide by 255 first)")
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x + std * noise


def compose(*fns: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply ``fns`` left to right."""
    def run(x: torch.Tensor) -> torch.Tensor:
        for f in fns:
            x = f(x)
        return x
    return run


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 500) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode on uint8 ``images`` (normalised here)."""
    was_training = model.training
    model.eval()
    correct = 0
    starts = range(0, len(images), batch_size)
    for s in track(starts, "evaluate", total=len(starts)):
        logits = model(normalize(images[s:s + batch_size]))
        correct += int((logits.argmax(1) == labels[s:s + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(images), 1)
