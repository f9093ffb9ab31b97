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

from conftest import write_image
from finetune.data.scan import check_split_images, scan_images
from finetune.data.sources import folder

TRAIN_ARGS = [
    "data=folder",
    "backbone.name=test_resnet",
    "backbone.pretrained=false",
    "data.image_size=32",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
]


def _train(root: Path, run_dir: Path, epochs: int = 1, batch_size: int = 32) -> Path:
    from finetune.config import compose
    from finetune.train import train

    args = [*TRAIN_ARGS, f"trainer.max_epochs={epochs}", f"data.batch_size={batch_size}", f"data.root={root}"]
    train(compose(args), run_dir)
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
    """A data root with train/val/test, and a checkpoint trained on it until it beats chance (32 px)."""
    base = tmp_path_factory.mktemp("trained")
    root = _make_root(base / "images")
    return root, _train(root, base / "run", epochs=8, batch_size=6)


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


def _empty_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# -- predict -------------------------------------------------------------------------------
def test_predict_cli_writes_top_k_per_image_with_the_checkpoints_class_names(trained, tmp_path: Path) -> None:
    root, ckpt = trained
    cwd = _empty_dir(tmp_path / "cwd")
    out = tmp_path / "p.csv"
    args = [f"ckpt={ckpt}", f"images={root / 'test'}", f"out={out}", "topk=2", "batch_size=4"]
    r = _cli("finetune.predict", args, cwd)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert list(cwd.iterdir()) == []  # Hydra wrote no outputs/, .hydra/ or log there
    assert "32 px" in r.stdout  # the run's image size, not the backbone's 160
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 18
    assert list(rows[0]) == ["path", "top1_class", "top1_prob", "top2_class", "top2_prob"]
    assert [Path(r["path"]) for r in rows] == sorted((root / "test").rglob("*.png"))  # in the order found
    for row in rows:
        assert {row["top1_class"], row["top2_class"]} <= {"class_0", "class_1", "class_2"}
        p1, p2 = float(row["top1_prob"]), float(row["top2_prob"])
        assert p1 >= p2 >= 0 and p1 + p2 <= 1 + 1e-5
        assert f"{row['path']}: {row['top1_class']} " in r.stdout


def test_paths_with_commas_and_equals_signs_are_taken_as_typed(trained, tmp_path: Path, monkeypatch) -> None:
    from finetune.predict import main

    root, ckpt = trained
    # Lightning names checkpoints epoch=3-step=9.ckpt; Hydra's grammar reads '=', ',' and ' ' as syntax.
    odd = _empty_dir(tmp_path / "run, 2 (copy)")
    named = shutil.copy(ckpt, odd / "epoch=3-step=9.ckpt")
    image = shutil.copy(root / "test" / "class_0" / "0.png", _empty_dir(tmp_path / "x=[1]") / "a b.png")
    monkeypatch.chdir(tmp_path)
    main([f"ckpt={named}", f"images={image},{root / 'test' / 'class_1' / '0.png'}", f"out={odd / 'p,q.csv'}"])
    rows = list(csv.DictReader((odd / "p,q.csv").open()))
    assert [r["path"] for r in rows] == [str(image), str(root / "test" / "class_1" / "0.png")]


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

    main([f"ckpt={ckpt}", f"images={images},{root / 'val' / 'class_1' / '0.png'}", "on_bad_image=skip", "topk=9",
          "batch_size=2"])
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in out and f"  {bad}: " in out
    from finetune.checkpoints import output_dir_of

    assert not (tmp_path / "predictions.csv").exists()  # never into the working directory
    rows = list(csv.DictReader((output_dir_of(ckpt) / "predictions.csv").open()))
    assert len(rows) == 7 and "top3_prob" in rows[0] and "top4_prob" not in rows[0]  # topk capped at 3 classes
    good = sorted(p for p in images.iterdir() if p != bad)
    assert [Path(r["path"]) for r in rows] == [*good, root / "val" / "class_1" / "0.png"]  # order kept, bad left out


@pytest.mark.parametrize(
    ("command", "args"), [("predict", ["images=x.png", "batch_size=two"]), ("evaluate", ["batch_size=two"])]
)
def test_a_wrongly_typed_argument_is_a_one_line_error_and_nothing_is_written(
    trained, tmp_path: Path, capsys, monkeypatch, command: str, args: list[str]
) -> None:
    import importlib

    _, ckpt = trained
    monkeypatch.chdir(_empty_dir(tmp_path / "cwd"))
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"finetune.{command}").main([f"ckpt={ckpt}", *args])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "error: batch_size: expected an int, got 'two'\n"
    assert captured.out == ""
    assert list((tmp_path / "cwd").iterdir()) == []


def test_preprocessing_comes_from_the_checkpoint_then_the_run_then_the_backbone(trained, tmp_path: Path) -> None:
    from finetune.checkpoints import load_checkpoint, resolve_preprocessing

    _, ckpt = trained
    module, raw = load_checkpoint(ckpt)
    assert raw["hyper_parameters"]["data_config"]["image_size"] == 32  # train() stores it
    alone = shutil.copy(ckpt, tmp_path / "alone.ckpt")  # no run dir beside it
    assert resolve_preprocessing(module, raw, alone).image_size == 32
    assert resolve_preprocessing(module, raw, ckpt, image_size=48).image_size == 48
    assert resolve_preprocessing(module, raw, ckpt).crop_mode == "center"  # saved before crop_mode existed
    raw["hyper_parameters"]["data_config"]["crop_mode"] = "squash"
    assert resolve_preprocessing(module, raw, ckpt).crop_mode == "squash"
    del raw["hyper_parameters"]["data_config"]  # a checkpoint from before: the run's config.yaml, then the backbone
    assert resolve_preprocessing(module, raw, ckpt).image_size == 32
    from_backbone = resolve_preprocessing(module, raw, alone)
    assert from_backbone.image_size == module.data_config["input_size"][-1]
    assert from_backbone.crop_mode == module.data_config.get("crop_mode", "center")


# -- one inference path ----------------------------------------------------------------------
def test_predict_and_evaluate_give_the_same_probabilities_as_the_model_in_eval_mode(trained) -> None:
    import torch

    from finetune.checkpoints import load_checkpoint, resolve_preprocessing
    from finetune.data.images import load_image
    from finetune.evaluate import split_probabilities
    from finetune.predict import image_probabilities

    root, ckpt = trained
    module, raw = load_checkpoint(ckpt)
    prep = resolve_preprocessing(module, raw, ckpt)
    split = folder(root).splits["test"]
    by_eval, labels = split_probabilities(module, split, prep, batch_size=5)
    paths = list(reversed(split.items))  # another order and batch size: results follow the input
    readable, by_predict, bad = image_probabilities(module, paths, prep, batch_size=4)
    assert readable == paths and bad == []
    assert labels.tolist() == list(split.labels)
    torch.testing.assert_close(by_predict.flip(0), by_eval)

    transform = prep.transform()
    x = torch.stack([transform(image=load_image(p))["image"] for p in split.items])
    with torch.no_grad():
        # eval mode: BatchNorm's running statistics; the temperature the run fitted (finetune.calibration)
        direct = (module.eval()(x) / module.temperature).softmax(-1)
    # Not closer: on a GPU, convolutions may run in TF32. Train-mode BatchNorm would be off by ~0.4 here.
    torch.testing.assert_close(by_eval, direct, rtol=0, atol=1e-3)


# -- evaluate ------------------------------------------------------------------------------
def test_evaluate_cli_agrees_with_predict_and_with_training(trained, tmp_path: Path, cli) -> None:
    root, ckpt = trained
    cwd = _empty_dir(tmp_path / "cwd")
    out_dir = tmp_path / "eval"
    r = cli([f"ckpt={ckpt}", "data=folder", f"data.root={root}", "data.num_workers=0", f"out_dir={out_dir}"],
            cwd, module="finetune.evaluate")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert list(cwd.iterdir()) == []
    assert "test: 18 images   top-1 " in r.stdout and "class_2" in r.stdout and "precision" in r.stdout
    result = json.loads((out_dir / "evaluation.json").read_text())
    assert result["split"] == "test" and result["images"] == 18
    assert result["top5"] is None  # 3 classes
    assert [c["support"] for c in result["per_class"]] == [6, 6, 6]
    assert (out_dir / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # top-1 is the share of predict's top-1 classes that name the image's folder...
    csv_out = tmp_path / "p.csv"
    p = cli([f"ckpt={ckpt}", f"images={root / 'test'}", f"out={csv_out}"], cwd, module="finetune.predict")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(csv_out.open()))
    hits = [row["top1_class"] == Path(row["path"]).parent.name for row in rows]
    assert result["top1"] == pytest.approx(sum(hits) / len(rows))
    # ...and training's own test accuracy of the same (last) weights; above chance: the classes are learnable.
    metrics = json.loads((ckpt.parent.parent / "metrics.json").read_text())
    assert result["top1"] == pytest.approx(metrics["test_acc"], abs=1e-5)
    assert result["top1"] > 1 / 3 + 0.1

    # The confusion matrix counts predict's (true, predicted) pairs, and per-class numbers follow from it.
    names = result["class_names"]
    confusion = np.zeros((3, 3), dtype=int)
    for row in rows:
        confusion[names.index(Path(row["path"]).parent.name), names.index(row["top1_class"])] += 1
    assert result["confusion_matrix"] == confusion.tolist()
    for c, per in enumerate(result["per_class"]):
        assert per["recall"] == pytest.approx(confusion[c, c] / confusion[c].sum())
        predicted = confusion[:, c].sum()
        assert per["precision"] == (pytest.approx(confusion[c, c] / predicted) if predicted else None)


def test_metrics_are_torchmetrics_with_undefined_precision_and_recall_as_null() -> None:
    import torch

    from finetune.metrics import format_report, metrics_of

    names = [f"c{i}" for i in range(7)]
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 5, 6])
    predicted = torch.tensor([0, 0, 1, 1, 0, 0, 5, 5])  # c2 and c6 never predicted; c3 and c4 have no images
    probs = 0.001 * torch.arange(1, 8, dtype=torch.float).repeat(8, 1)  # no ties: below the top two, c5 > c4 > ...
    probs[torch.arange(8), predicted] = 0.5
    probs[:, 6] = 0.2  # every image's second guess
    probs[5, 2] = 0.1  # image 5's third guess is its class
    m = metrics_of(probs / probs.sum(1, keepdim=True), labels, names)
    assert m["images"] == 8 and m["top1"] == pytest.approx(4 / 8)
    assert m["top5"] == pytest.approx(6 / 8)  # images 2 and 4: top-5 {pred, c6, c5, c4, c3} misses c0 and c1
    rows = {r["class"]: r for r in m["per_class"]}
    assert rows["c0"] == {"class": "c0", "support": 3, "recall": pytest.approx(2 / 3), "precision": 0.5}
    assert rows["c1"]["recall"] == pytest.approx(1 / 2) and rows["c1"]["precision"] == pytest.approx(1 / 2)
    assert rows["c2"]["recall"] == 0.0 and rows["c2"]["precision"] is None  # never predicted: null, not 0
    assert rows["c3"]["recall"] is None and rows["c3"]["precision"] is None  # no images, never predicted
    assert rows["c5"]["recall"] == 1.0 and rows["c5"]["precision"] == pytest.approx(1 / 2)
    assert rows["c6"]["recall"] == 0.0 and rows["c6"]["precision"] is None
    assert m["confusion_matrix"][0] == [2, 1, 0, 0, 0, 0, 0] and m["confusion_matrix"][6] == [0, 0, 0, 0, 0, 1, 0]
    lines = format_report(m, "test").splitlines()
    assert lines[0] == "test: 8 images   top-1 50.00%   top-5 75.00%"
    assert lines[3].split() == ["c0", "3", "66.67%", "50.00%"] and lines[6].split() == ["c3", "0", "-", "-"]


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
    # One rule for what the commands write: beside the checkpoint's run directory, nothing in the cwd.
    assert (tmp_path / "run" / "predictions.csv").is_file() and (tmp_path / "run" / "evaluation.json").is_file()
    assert list(work.iterdir()) == []


def test_a_corrupt_image_in_the_data_stops_the_run_or_is_skipped_and_listed(tmp_path: Path, make_folder, cli) -> None:
    root = make_folder(classes=2, per_class=6)
    bad = root / "class_0" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)  # a PNG signature and nothing after it
    out = tmp_path / "run"
    args = ["data=folder", f"data.root={root}", "data.image_size=32", "data.num_workers=0",
            "backbone.name=test_resnet", "backbone.pretrained=false", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"]
    r = cli(args, cwd=tmp_path)
    assert r.returncode == 2 and "broken.png" in r.stderr.strip().splitlines()[-1]
    assert not (out / "metrics.json").exists()  # stopped before training
    r = cli([*args, "data.on_bad_image=skip"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "broken.png" in (out / "bad_images.txt").read_text()
    assert "skipped 1" in r.stdout
    assert bad.exists()  # the user's file is left alone
