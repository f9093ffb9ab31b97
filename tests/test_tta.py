"""Test-time augmentation: none is the plain path exactly, the views are what they say, the run decides what is safe."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import write_folder
from finetune.checkpoints import Preprocessing
from finetune.errors import FineTuneError
from finetune.tta import check_tta_allowed, tta_transform

TINY = ["data=folder", "backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=6"]


@pytest.fixture(scope="module")
def no_flip_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A data root and the last.ckpt of a run trained with data.hflip=0 (as digits are)."""
    from finetune.config import compose
    from finetune.train import train

    base = tmp_path_factory.mktemp("tta")
    root = write_folder(base / "images", per_class=5, splits=("train", "val", "test"))
    train(compose([*TINY, "trainer.max_epochs=1", f"data.root={root}", "data.hflip=0"]), base / "run")
    return root, base / "run" / "checkpoints" / "last.ckpt"


def _flip_run(ckpt: Path, where: Path) -> Path:
    """The same checkpoint in a run directory whose config says mirrored images keep their class."""
    run = where / "flip_run"
    shutil.copytree(ckpt.parent.parent, run)
    config = OmegaConf.load(run / "config.yaml")
    config.data.hflip = 0.5
    OmegaConf.save(config, run / "config.yaml")
    return run / "checkpoints" / ckpt.name


def _data(root: Path) -> list[str]:
    return ["data=folder", f"data.root={root}", "data.num_workers=0"]


def test_tta_none_is_the_plain_evaluation_exactly(no_flip_run, tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from finetune.checkpoints import load_checkpoint, resolve_preprocessing
    from finetune.data import ImageDataset
    from finetune.data.sources import folder
    from finetune.evaluate import EvaluateConfig, evaluate, split_probabilities
    from finetune.inference import probabilities

    root, ckpt = no_flip_run
    module, raw = load_checkpoint(ckpt)
    prep = resolve_preprocessing(module, raw, ckpt)
    split = folder(root).splits["test"]
    plain, _ = probabilities(module, DataLoader(ImageDataset(split, prep.transform()), batch_size=64))
    assert torch.equal(split_probabilities(module, split, prep, tta="none")[0], plain)

    result = evaluate(EvaluateConfig(ckpt=str(ckpt), out_dir=str(tmp_path)), _data(root))
    assert result["tta"]["mode"] == "none" and set(result["tta"]) == {"mode", "none"}
    assert result["top1"] == result["tta"]["none"]["top1"]
    assert result["top1"] == pytest.approx(float((plain.argmax(1) == torch.tensor(split.labels)).float().mean()))
    assert result["tta"]["none"]["seconds"] > 0
    t = result["calibration"]["temperature"]
    assert t == module.temperature != 1.0  # the run calibrated, and evaluate used the checkpoint's temperature
    assert result["calibration"]["before"] != result["calibration"]["after"]
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "evaluation.json").read_text())["calibration"]["temperature"] == t


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_hflip_is_refused_for_a_run_trained_without_flips(no_flip_run, tmp_path: Path, capsys, command: str) -> None:
    import importlib

    root, ckpt = no_flip_run
    args = _data(root) if command == "evaluate" else [f"images={root / 'test'}", f"out={tmp_path / 'p.csv'}"]
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"finetune.{command}").main([f"ckpt={ckpt}", "tta=hflip", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tta=hflip: the run trained with data.hflip=0") and err.count("\n") == 1
    assert not (tmp_path / "p.csv").exists()


def test_hflip_averages_each_image_with_its_mirror_image(no_flip_run, tmp_path: Path) -> None:
    from finetune.checkpoints import load_checkpoint, resolve_preprocessing
    from finetune.data.images import load_image
    from finetune.evaluate import EvaluateConfig, evaluate
    from finetune.predict import image_probabilities

    root, ckpt = no_flip_run
    flip_ckpt = _flip_run(ckpt, tmp_path)
    module, raw = load_checkpoint(flip_ckpt)
    prep = resolve_preprocessing(module, raw, flip_ckpt)
    check_tta_allowed("hflip", raw, flip_ckpt, prep)  # this run's config allows it
    paths = sorted((root / "test").rglob("*.png"))
    _, probs, _ = image_probabilities(module, paths, prep, batch_size=4, tta="hflip")
    x = torch.stack([prep.transform()(image=load_image(p))["image"] for p in paths])
    with torch.no_grad():
        by_hand = sum((module(v) / module.temperature).softmax(-1) for v in (x, x.flip(-1))) / 2
    torch.testing.assert_close(probs, by_hand)

    result = evaluate(EvaluateConfig(ckpt=str(flip_ckpt), out_dir=str(tmp_path / "e"), tta="hflip"), _data(root))
    assert set(result["tta"]) == {"mode", "none", "hflip"}
    assert result["top1"] == result["tta"]["hflip"]["top1"]  # the metrics are the augmented pass's
    assert result["tta"]["hflip"]["seconds"] > 0 and result["tta"]["none"]["seconds"] > 0


def test_five_crop_views_are_the_four_corners_and_the_center_of_the_eval_resize() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    prep = Preprocessing(image_size=32, mean=mean, std=std, crop_pct=0.8, interpolation="bilinear", source="test")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)  # already at the resize (32 / 0.8): left as it is
    views = tta_transform(prep, "five_crop")(image=image)["image"]
    full = (torch.from_numpy(image).float() / 255 - torch.tensor(mean)) / torch.tensor(std)
    full = full.permute(2, 0, 1)
    assert views.shape == (5, 3, 32, 32)
    expected = [full[:, :32, :32], full[:, :32, 8:], full[:, 8:, :32], full[:, 8:, 8:], full[:, 4:36, 4:36]]
    for view, crop in zip(views, expected):
        torch.testing.assert_close(view, crop, rtol=0, atol=1e-5)
    torch.testing.assert_close(views[4], prep.transform()(image=image)["image"])  # the center is the plain crop


def test_five_crop_is_refused_where_the_crops_would_all_be_the_whole_image() -> None:
    prep = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, interpolation="bilinear",
                         source="test", crop_mode="squash")
    with pytest.raises(FineTuneError, match=r"tta=five_crop needs crop_pct below 1.*1\.0"):
        check_tta_allowed("five_crop", {}, "x.ckpt", prep)


def test_predict_with_five_crop_writes_the_averaged_probabilities(no_flip_run, tmp_path: Path) -> None:
    from finetune.checkpoints import load_checkpoint, resolve_preprocessing
    from finetune.predict import image_probabilities, main

    root, ckpt = no_flip_run
    out = tmp_path / "p.csv"
    main([f"ckpt={ckpt}", f"images={root / 'test'}", f"out={out}", "tta=five_crop", "topk=1"])
    rows = list(csv.DictReader(out.open()))
    module, raw = load_checkpoint(ckpt)
    prep = resolve_preprocessing(module, raw, ckpt)
    paths = sorted((root / "test").rglob("*.png"))
    _, averaged, _ = image_probabilities(module, paths, prep, tta="five_crop")
    _, plain, _ = image_probabilities(module, paths, prep)
    assert [float(r["top1_prob"]) for r in rows] == pytest.approx(averaged.max(1).values.tolist(), abs=1e-6)
    assert not torch.allclose(averaged, plain, atol=1e-4)  # the corners were seen too


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_an_unknown_tta_is_a_one_line_error(tmp_path: Path, capsys, monkeypatch, command: str) -> None:
    import importlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"finetune.{command}").main(
            ["ckpt=missing.ckpt", "tta=foo", *(["images=x.png"] if command == "predict" else [])])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: tta must be one of none, hflip, five_crop, got 'foo'\n"


def test_hflip_is_refused_where_the_checkpoint_cannot_say_how_its_run_flipped(tmp_path: Path) -> None:
    prep = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.9, interpolation="bilinear",
                         source="test")
    alone = tmp_path / "copied.ckpt"  # no RUN/checkpoints/ around it, no config.yaml
    with pytest.raises(FineTuneError, match="tta=hflip: cannot tell whether mirrored images keep their class"):
        check_tta_allowed("hflip", {"hyper_parameters": {"data_config": {"image_size": 32}}}, alone, prep)
    check_tta_allowed("hflip", {"hyper_parameters": {"data_config": {"hflip": 0.5}}}, alone, prep)  # it says
