"""The Hydra CLI and train(cfg): configs, recipes, run directory, one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from finetune.config import compose, recipe_names
from finetune.train import train

from conftest import run_cli

TINY = ["backbone.name=test_resnet", "backbone.pretrained=false", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]


def test_every_recipe_composes_and_names_itself() -> None:
    assert {"linear_probe", "full_finetune"} <= set(recipe_names())
    for name in recipe_names():
        cfg = compose([f"+recipe={name}"])
        assert cfg.recipe == name
    assert compose(["+recipe=linear_probe"]).freeze.name == "head_only"
    assert compose(["+recipe=full_finetune"]).freeze.name == "none"


def test_train_on_digits_writes_metrics(tmp_path: Path) -> None:
    cfg = compose(
        ["backbone.name=test_efficientnet", "backbone.pretrained=false", "data.image_size=32",
         "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "+recipe=linear_probe"]
    )
    m = train(cfg, tmp_path)
    for key in ("recipe", "backbone", "freeze", "epochs", "train_time_s", "trainable_params", "total_params",
                "val_acc", "val_top5", "test_acc", "test_top5"):
        assert key in m, key
    assert m["recipe"] == "linear_probe" and m["freeze"] == "head_only" and m["epochs"] == 1
    assert m["split_sizes"] == {"train": 1257, "val": 180, "test": 360}
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    assert (tmp_path / "checkpoints" / "best.ckpt").exists()


def test_cli_run_on_a_folder_leaves_a_complete_run_dir(tmp_path: Path, make_folder) -> None:
    root = make_folder(classes=3, per_class=6, splits=("train", "val", "test"))
    out = tmp_path / "run"
    r = run_cli(["data=folder", f"data.root={root}", "data.image_size=32", "data.num_workers=0",
                 f"hydra.run.dir={out}", *TINY], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "finetune summary" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"] == 2 and "test_acc" in m and "val_top5" not in m  # 3 classes: no top-5
    assert m["trainable_params"] == m["total_params"]
    assert (out / "config.yaml").exists() and (out / ".hydra" / "config.yaml").exists()
    rows = list(csv.DictReader((out / "epochs.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(r["val/acc"] for r in rows)
    assert (out / "checkpoints" / "best.ckpt").exists() and (out / "checkpoints" / "last.ckpt").exists()
    assert m["evaluated"] == "last"


@pytest.mark.parametrize(
    "args, message",
    [
        (["data=folder", "data.root=/definitely/not/here"], "error: data root '/definitely/not/here' does not exist"),
        (["data=folder"], "error: data.root is not set"),
        (["backbone.name=resnet181"], "error: unknown backbone 'resnet181'; did you mean"),
        (["backbone.pretrained=true", "backbone.weights=/no/such/w.safetensors"], "error: weights file"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path: Path, args: list[str], message: str) -> None:
    r = run_cli([*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(message), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_one_class_folder_is_refused(tmp_path: Path, make_folder) -> None:
    root = make_folder(classes=1, per_class=4)
    r = run_cli([*TINY, "data=folder", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2 and "need at least 2" in r.stderr.strip().splitlines()[-1]


def test_unreadable_weights_file_via_cli(tmp_path: Path) -> None:
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"garbage")
    r = run_cli([*TINY, "backbone.pretrained=true", f"backbone.weights={bad}", f"hydra.run.dir={tmp_path / 'run'}"],
                cwd=tmp_path)
    assert r.returncode == 2 and "cannot read weights file" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["+recipe=nope"], "Could not find 'recipe/nope'"),
        (["freeze=bogus"], "Could not find 'freeze/bogus'"),
        (["optim.lrr=1"], "Key 'lrr' is not in struct"),
    ],
)
def test_hydra_reports_unknown_recipes_groups_and_keys(tmp_path: Path, args: list[str], message: str) -> None:
    r = run_cli([*args, "--cfg", "job"], cwd=tmp_path)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
