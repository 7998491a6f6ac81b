"""ResNet-20/32/44/56 for CIFAR-10 (He et al. 2015, arXiv:1512.03385), written from the facts in
``$FISHERTUNE_DATA/vision/README.md`` so that the pretrained weights of
akamaster/pytorch_resnet_cifar10 load with ``strict=True``.

Parameter names follow the weight files: ``conv1``/``bn1`` (the stem), ``layer1..3.{i}`` (the residual
blocks, each an ``nn.Sequential`` of :class:`BasicBlock`), ``linear`` (the head). Shortcuts are
parameter-free ("option A") modules stored as ``block.shortcut``, so a block can be removed by replacing
it with its own shortcut (identity except in the two down-sampling blocks).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fishertune.utils.settings import data_root

DEPTHS: dict[int, int] = {20: 3, 32: 5, 44: 7, 56: 9}
"""Depth -> blocks per stage (depth = 6n + 2)."""

WEIGHT_SHA256: dict[int, str] = {
    20: "82ffab9f23f21b6a1f1dcb754ff887e7489e3e339754378e1f6389db3234f7c2",
    56: "84d6cebea5620707230092d2c47db43ae2357093f2089e8b052c95608f03745d",
}
"""sha256 of the safetensors files shipped in the vision dataset folder (from its README)."""

STAGES: tuple[str, ...] = ("layer1", "layer2", "layer3")
GROUPS: dict[str, tuple[str, ...]] = {
    "stem": ("conv1", "bn1"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "head": ("linear",),
}
"""Role name -> top-level module names, for freeze rules such as ``stem`` or ``layer1..3``."""


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every second row/column, pad zero channels on both sides."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        if (planes - in_planes) % 2:
            raise ValueError(f"channel growth {in_planes}->{planes} must be even")
        self.pad = (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if stride != 2:
                raise ValueError("option-A shortcut needs stride 2 when the width changes")
            self.shortcut: nn.Module = PadShortcut(in_planes, planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 on normalised 3x32x32 inputs; returns logits (N, num_classes)."""

    def __init__(self, depth: int = 56, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for name, planes, stride in (("layer1", 16, 1), ("layer2", 32, 2), ("layer3", 64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            self.add_module(name, nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    @property
    def stages(self) -> list[nn.Sequential]:
        """The three stages (``layer1..3``), each an indexable sequence of blocks."""
        return [getattr(self, s) for s in STAGES]

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """All residual blocks in forward order as ``(qualified name, module)``, e.g. ``layer2.0``."""
        return [(f"{s}.{i}", b) for s in STAGES for i, b in enumerate(getattr(self, s))]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 64 pooled features before the head."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_path(depth: int) -> Path:
    """``$FISHERTUNE_DATA/vision/resnet{depth}.safetensors``."""
    return data_root() / "vision" / f"resnet{depth}.safetensors"


def load_cifar_resnet(depth: int = 56, path: str | os.PathLike | None = None, *,
                      verify: bool = True) -> CifarResNet:
    """Build a ResNet-``depth`` and load pretrained weights with ``strict=True``, in eval mode.

    ``path`` defaults to :func:`weights_path`. With ``verify`` the file's sha256 is checked against
    :data:`WEIGHT_SHA256` when the default path is used and the depth has a known hash.
    """
    from safetensors.torch import load_file

    if depth not in DEPTHS:
        raise ValueError(f"no pretrained CIFAR ResNet of depth {depth}; choose from {sorted(DEPTHS)}")
    default = path is None
    p = weights_path(depth) if default else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; put the vision dataset under FISHERTUNE_DATA "
                                f"(now {data_root()}) or pass path=")
    if verify and default and depth in WEIGHT_SHA256:
        got = sha256_file(p)
        if got != WEIGHT_SHA256[depth]:
            raise ValueError(f"{p}: sha256 {got} != expected {WEIGHT_SHA256[depth]} (corrupt or wrong file)")
    model = CifarResNet(depth)
    state = load_file(str(p))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{p}: weights do not match ResNet-{depth}: {err}") from err
    return model.eval()
