"""Shared fixtures: generated image folders, tiny timm models, composed configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

# Unit tests never reach for the network; tests of the hub lookup set their own endpoint.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODELS = ("test_resnet", "test_efficientnet", "test_vit")


def write_image(path: Path, rng: np.random.Generator, size: int = 24, mode: str = "RGB", color: int = 0) -> Path:
    """A small image whose mean color depends on ``color`` (so classes are learnable)."""
    base = np.zeros((size, size, 3), dtype=np.float64)
    base[..., color % 3] = 180.0
    arr = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """Build ``root/<class>/*.png`` (or ``root/<split>/<class>``) with learnable classes."""

    def make(
        classes: int = 3,
        per_class: int = 8,
        splits: tuple[str, ...] = (),
        name: str = "images",
        size: int = 24,
    ) -> Path:
        rng = np.random.default_rng(0)
        root = tmp_path / name
        for split in splits or ("",):
            for c in range(classes):
                for i in range(per_class):
                    write_image(root / split / f"class_{c}" / f"{i}.png", rng, size=size, color=c)
        return root

    return make


def run_cli(args: list[str], cwd: Path, timeout: float = 600) -> "subprocess.CompletedProcess[str]":
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
