"""Shared fixtures: generated image folders, tiny timm models, composed configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

# Unit tests never reach for the network; tests of the hub lookup set their own endpoint.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test worker (the suite runs one worker per core, pyproject's addopts), for the
    # worker and the commands it starts: workers of as many OpenMP threads as there are cores spin
    # against each other (two such workers were at 85% after 20 minutes, longer than one process's
    # whole run on one thread).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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


def write_folder(root: Path, classes: int = 3, per_class: int = 8, splits: tuple[str, ...] = (),
                 size: int = 24) -> Path:
    """Write ``root/<class_c>/*.png`` (or ``root/<split>/<class_c>``) with learnable classes, seeded."""
    rng = np.random.default_rng(0)
    for split in splits or ("",):
        for c in range(classes):
            for i in range(per_class):
                write_image(root / split / f"class_{c}" / f"{i}.png", rng, size=size, color=c)
    return root


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
        return write_folder(tmp_path / name, classes, per_class, splits, size)

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


@pytest.fixture(autouse=True)
def _restore_root_logger() -> "Iterator[None]":
    """Put back the root logger's handlers after each test.

    A Hydra app run in-process (``cli`` below, tests/test_readme.py) replaces them with handlers bound to
    that test's captured streams; left in place, later tests' log records go to closed files
    (``--- Logging error ---`` in their stderr).
    """
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., "subprocess.CompletedProcess[str]"]:
    """``run_cli`` in this process: the same ``main()``, argv, cwd, exit code and output, without a new interpreter.

    A fresh ``python -m finetune`` spends ~10 s importing torch, Lightning and timm before it reads an
    argument; the error-path tests check what ``main()`` does with the argv, which needs none of that.
    The subprocess tests that remain (a crash, a kill, two runs at once, the installed console
    script) are the ones about the process itself.
    """
    import importlib
    import subprocess

    from hydra.core.global_hydra import GlobalHydra

    def run(args: list[str], cwd: Path, module: str = "finetune.cli") -> "subprocess.CompletedProcess[str]":
        # Hydra's job logging rebinds the root logger to this test's captured streams: _restore_root_logger
        # puts it back after the test.
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [module, *args])
        capfd.readouterr()
        code: int = 0
        try:
            importlib.import_module(module).main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            GlobalHydra.instance().clear()
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess([module, *args], code, out, err)

    return run
