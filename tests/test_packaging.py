"""The built wheel carries conf/ and recipes/ and runs from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.packaging


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, installed (without dependencies) into a target dir."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    wheels = list((tmp / "dist").glob("finetune-*.whl"))
    assert len(wheels) == 1
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(site), str(wheels[0])],
        check=True, capture_output=True, text=True,
    )
    return site


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_ships_configs_and_recipes(installed: Path, tmp_path: Path) -> None:
    r = _run(installed, tmp_path, "-c", "import finetune.config as c; print(c.CONF_DIR); print(c.recipe_names())")
    assert r.returncode == 0, r.stderr
    conf_dir, recipes = r.stdout.strip().splitlines()
    assert Path(conf_dir).is_relative_to(installed)  # the wheel's copy, not this checkout's
    assert "small_similar" in recipes and "small_dissimilar" in recipes
    assert not (installed / "finetune" / "conf" / "recipe").exists()  # Hydra #2511: no duplicate group


def test_installed_cli_composes_a_recipe_from_another_directory(installed: Path, tmp_path: Path) -> None:
    r = _run(installed, tmp_path, "-m", "finetune", "+recipe=small_similar", "data=photos", "--cfg", "job")
    assert r.returncode == 0, r.stderr[-2000:]
    # The recipe's freeze, and a data source's own defaults: the structured configs came with the wheel.
    assert "recipe: small_similar" in r.stdout and "name: head_only" in r.stdout and "per_class: 60" in r.stdout
    assert not any(tmp_path.iterdir())  # --cfg job writes nothing


def test_installed_cli_trains_from_another_directory(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _run(installed, tmp_path, "-m", "finetune", "+recipe=small_similar", "backbone.name=test_resnet",
             "backbone.pretrained=false", "data.image_size=32", "trainer.max_epochs=1",
             "trainer.enable_progress_bar=false", "+trainer.limit_train_batches=2", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "metrics.json").exists()
