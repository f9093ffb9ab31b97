"""Predicting with, and evaluating, a trained checkpoint; scanning for unreadable images."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, write_image
from finetune.data.scan import check_split_images, scan_images
from finetune.data.sources import folder

TRAIN_ARGS = [
    "data=folder",
    "backbone.name=test_resnet",
    "backbone.pretrained=false",
    "data.image_size=32",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
]


def _train(root: Path, run_dir: Path) -> Path:
    from finetune.config import compose
    from finetune.train import train

    train(compose([*TRAIN_ARGS, f"data.root={root}"]), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def _make_root(root: Path, classes: int = 3, per_class: int = 6, names: str = "class_{}") -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(classes):
            for i in range(per_class):
                write_image(root / split / names.format(c) / f"{i}.png", rng, color=c)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A data root with train/val/test, and a checkpoint trained on it (1 epoch, 32 px)."""
    base = tmp_path_factory.mktemp("trained")
    root = _make_root(base / "images")
    return root, _train(root, base / "run")


def _cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _truncated_png(path: Path) -> Path:
    write_image(path, np.random.default_rng(1), size=32)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# -- predict -------------------------------------------------------------------------------
def test_predict_cli_writes_top_k_per_image_with_the_checkpoints_class_names(trained, tmp_path: Path) -> None:
    root, ckpt = trained
    out = tmp_path / "p.csv"
    args = [f"ckpt={ckpt}", f"images={root / 'test'}", f"out={out}", "topk=2", "batch_size=4"]
    r = _cli("finetune.predict", args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "32 px" in r.stdout  # the run's image size, not the backbone's 160
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 18
    assert list(rows[0]) == ["path", "top1_class", "top1_prob", "top2_class", "top2_prob"]
    assert sorted(Path(r["path"]).relative_to(root / "test").as_posix() for r in rows) == sorted(
        p.relative_to(root / "test").as_posix() for p in (root / "test").rglob("*.png")
    )
    for row in rows:
        assert {row["top1_class"], row["top2_class"]} <= {"class_0", "class_1", "class_2"}
        p1, p2 = float(row["top1_prob"]), float(row["top2_prob"])
        assert p1 >= p2 >= 0 and p1 + p2 <= 1 + 1e-5
        assert f"{row['path']}: {row['top1_class']} " in r.stdout


def test_predict_bad_image_is_an_error_naming_it_or_skipped_and_listed(
    trained, tmp_path: Path, capsys, monkeypatch
) -> None:
    from finetune.predict import main

    root, ckpt = trained
    images = tmp_path / "new"
    shutil.copytree(root / "test" / "class_0", images)
    bad = _truncated_png(images / "broken.png")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([f"ckpt={ckpt}", f"images={images}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and err.count("\n") == 1

    main([f"ckpt={ckpt}", f"images={images},{root / 'val' / 'class_1' / '0.png'}", "on_bad_image=skip", "topk=9"])
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in out and f"  {bad}: " in out
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 7 and "top3_prob" in rows[0] and "top4_prob" not in rows[0]  # topk capped at 3 classes


def test_preprocessing_comes_from_the_checkpoint_then_the_run_then_the_backbone(trained, tmp_path: Path) -> None:
    from finetune.predict import load_checkpoint, resolve_preprocessing

    _, ckpt = trained
    module, raw = load_checkpoint(ckpt)
    assert raw["hyper_parameters"]["data_config"]["image_size"] == 32  # train() stores it
    alone = shutil.copy(ckpt, tmp_path / "alone.ckpt")  # no run dir beside it
    assert resolve_preprocessing(module, raw, alone).image_size == 32
    assert resolve_preprocessing(module, raw, ckpt, image_size=48).image_size == 48
    del raw["hyper_parameters"]["data_config"]  # a checkpoint from before: the run's config.yaml, then the backbone
    assert resolve_preprocessing(module, raw, ckpt).image_size == 32
    assert resolve_preprocessing(module, raw, alone).image_size == module.data_config["input_size"][-1]


# -- evaluate ------------------------------------------------------------------------------
def test_evaluate_cli_prints_accuracy_and_writes_json_and_png(trained, tmp_path: Path) -> None:
    root, ckpt = trained
    r = _cli(
        "finetune.evaluate",
        [f"ckpt={ckpt}", "data=folder", f"data.root={root}", "data.num_workers=0", f"out_dir={tmp_path}"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "test: 18 images   top-1 " in r.stdout and "class_2" in r.stdout and "precision" in r.stdout
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["split"] == "test" and result["images"] == 18 and 0 <= result["top1"] <= 1
    assert result["top5"] is None  # 3 classes
    assert [c["support"] for c in result["per_class"]] == [6, 6, 6]
    assert np.asarray(result["confusion_matrix"]).sum() == 18
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_with_other_classes_is_a_one_line_error(trained, tmp_path: Path, capsys) -> None:
    from finetune.evaluate import main

    _, ckpt = trained
    other = _make_root(tmp_path / "other", per_class=2, names="kind_{}")
    with pytest.raises(SystemExit) as e:
        main([f"ckpt={ckpt}", "data=folder", f"data.root={other}", "data.num_workers=0", f"out_dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "differ from the checkpoint's" in err and "kind_0" in err and err.count("\n") == 1
    assert not (tmp_path / "evaluation.json").exists()


# -- scan ----------------------------------------------------------------------------------
def test_scan_catches_truncated_non_image_and_empty_files_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = [write_image(tmp_path / f"ok{ext}", rng, size=32) for ext in (".png", ".jpg", ".bmp", ".gif")]
    truncated = _truncated_png(tmp_path / "truncated.png")
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    jpeg = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])

    bad = dict(scan_images([*good, truncated, text, empty, tmp_path / "cut.jpg"]))
    assert set(bad) == {truncated, text, empty, tmp_path / "cut.jpg"}
    assert "empty" in bad[empty] and "not an image" in bad[text]
    for path in bad:  # what the scan flags, the loader cannot read
        with pytest.raises(Exception), Image.open(path) as img:
            img.load()


def test_check_split_images_raises_or_skips_with_a_note(make_folder) -> None:
    from finetune.errors import FineTuneError

    root = make_folder(classes=2, per_class=5)
    bad = _truncated_png(root / "class_1" / "zz.png")
    splits = folder(root, val_fraction=0.4)
    with pytest.raises(FineTuneError, match=r"unreadable image '.*zz\.png'.*1 unreadable image"):
        check_split_images(splits, "error")
    kept, listed = check_split_images(splits, "skip")
    assert listed == [(bad, listed[0][1])]
    assert sum(len(s) for s in kept.splits.values()) == 10
    assert all(bad not in s.items for s in kept.splits.values())
    assert kept.notes[-1] == "skipped 1 unreadable image(s); listed in bad_images.txt"


# -- the user's data -----------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime, and every folder's mtime (a file created and removed changes it)."""
    snap: dict[str, tuple[bytes, int]] = {}
    for p in [root, *root.rglob("*")]:
        name = p.relative_to(root).as_posix()
        snap[name + "/" if p.is_dir() else name] = (b"" if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
    return snap


def test_training_predicting_and_evaluating_leave_the_data_folder_untouched(
    make_folder, tmp_path: Path, monkeypatch
) -> None:
    from finetune.evaluate import main as evaluate_main
    from finetune.predict import main as predict_main

    root = make_folder(classes=2, per_class=5, splits=("train", "val", "test"))
    before = _snapshot(root)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ckpt = _train(root, tmp_path / "run")
    predict_main([f"ckpt={ckpt}", f"images={root}"])
    evaluate_main([f"ckpt={ckpt}"])  # the run's own data, results into the run dir
    assert _snapshot(root) == before
    assert (work / "predictions.csv").is_file() and (tmp_path / "run" / "evaluation.json").is_file()


def test_a_corrupt_image_in_the_data_stops_the_run_or_is_skipped_and_listed(tmp_path: Path, make_folder) -> None:
    root = make_folder(classes=2, per_class=6)
    bad = root / "class_0" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)  # a PNG signature and nothing after it
    out = tmp_path / "run"
    args = ["data=folder", f"data.root={root}", "data.image_size=32", "data.num_workers=0",
            "backbone.name=test_resnet", "backbone.pretrained=false", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 2 and "broken.png" in r.stderr.strip().splitlines()[-1]
    assert not (out / "metrics.json").exists()  # stopped before training
    r = run_cli([*args, "data.on_bad_image=skip"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "broken.png" in (out / "bad_images.txt").read_text()
    assert "skipped 1" in r.stdout
    assert bad.exists()  # the user's file is left alone
