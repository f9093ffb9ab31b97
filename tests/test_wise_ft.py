"""WiSE-FT: interpolation between two checkpoints (finetune.interpolate) and at the end of a run (wise_ft=true)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from finetune.errors import FineTuneError
from finetune.weight_space import lerp_state, mean_state

TINY = ["data=folder", "backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=6", "trainer.max_epochs=2",
        "+callbacks.wise_ft.alphas=[0,0.5,1]"]


def _train(tmp_path: Path, make_folder: Callable[..., Path], *extra: str) -> tuple[dict, Path]:
    from finetune.config import compose
    from finetune.train import train

    root = make_folder(classes=3, per_class=6, splits=("train", "val", "test"))
    run = tmp_path / "run"
    return train(compose([*TINY, f"data.root={root}", "wise_ft=true", *extra]), run), run


def test_lerp_is_exact_at_both_ends_and_takes_integer_buffers_from_the_end() -> None:
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(5, 3, generator=g), "n": torch.tensor(3)}
    b = {"w": torch.randn(5, 3, generator=g) * 1e3, "n": torch.tensor(7)}
    assert torch.equal(lerp_state(a, b, 0.0)["w"], a["w"]) and torch.equal(lerp_state(a, b, 1.0)["w"], b["w"])
    mid = lerp_state(a, b, 0.25)
    torch.testing.assert_close(mid["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert int(mid["n"]) == 7
    torch.testing.assert_close(mean_state([a, b])["w"], (a["w"] + b["w"]) / 2)


def _evaluate(ckpt: Path, split: str, out: Path) -> float:
    from finetune.evaluate import EvaluateConfig, evaluate

    return evaluate(EvaluateConfig(ckpt=str(ckpt), split=split, out_dir=str(out)))["top1"]


def test_a_wise_ft_run_keeps_the_chosen_weights_and_interpolate_reproduces_both_endpoints(
    tmp_path: Path, make_folder: Callable[..., Path]
) -> None:
    from finetune.interpolate import interpolate
    from finetune.module import FineTuneModule

    metrics, run = _train(tmp_path, make_folder, "freeze=lp_ft", "freeze.unfreeze_at_epoch=1")
    w = metrics["wise_ft"]
    assert w["alphas"] == [0.0, 0.5, 1.0] and len(w["val_acc"]) == len(w["test_acc"]) == 3
    assert "epoch 1" in w["start"]  # the probe phase's end: the backbone joined at epoch 1
    i = w["alphas"].index(w["chosen_alpha"])
    assert w["val_acc"][i] == max(w["val_acc"])
    # The run's final evaluation is of the chosen weights.
    assert metrics["val_acc"] == pytest.approx(w["val_acc"][i], abs=1e-5)
    assert metrics["test_acc"] == pytest.approx(w["test_acc"][i], abs=1e-5)
    assert metrics["evaluated"].startswith("wise_ft") and (run / "wise_ft.png").is_file()
    saved = json.loads((run / "metrics.json").read_text())["wise_ft"]
    assert saved["chosen_alpha"] == w["chosen_alpha"]

    ckpts = run / "checkpoints"
    start = torch.load(ckpts / "wise_ft_start.ckpt", weights_only=True)["state_dict"]
    last = torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]
    chosen = FineTuneModule.load_from_checkpoint(ckpts / "wise_ft.ckpt", map_location="cpu").eval()
    expected = lerp_state(start, last, w["chosen_alpha"])
    for k, v in chosen.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    probs = chosen.predict_step(torch.randn(2, 3, 32, 32), 0)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))

    result = interpolate(str(ckpts / "wise_ft_start.ckpt"), str(ckpts / "last.ckpt"), alphas=[1, 0],
                         out=str(tmp_path / "out"))
    first, last_point = result["curve"]
    assert (first["alpha"], last_point["alpha"]) == (0.0, 1.0)
    for split in ("val", "test"):  # the same images right (evaluate's top-1 is a float32, ours a float64)
        for point, ckpt in ((first, "wise_ft_start.ckpt"), (last_point, "last.ckpt")):
            assert point[f"{split}_acc"] == pytest.approx(_evaluate(ckpts / ckpt, split, tmp_path), abs=1e-6)
    assert (tmp_path / "out" / "interpolation.png").is_file() and (tmp_path / "out" / "wise_ft.ckpt").is_file()
    assert json.loads((tmp_path / "out" / "interpolation.json").read_text())["chosen_alpha"] == result["chosen_alpha"]


def test_without_a_probe_phase_the_start_gets_a_fitted_probe(tmp_path: Path, make_folder: Callable[..., Path]
                                                             ) -> None:
    metrics, run = _train(tmp_path, make_folder, "freeze=none", "calibrate=false")
    start = torch.load(run / "checkpoints" / "wise_ft_start.ckpt", weights_only=True)
    assert start["weight_averaging"]["probe"].startswith("the pretrained backbone with a linear probe")
    assert "linear probe" in metrics["wise_ft"]["start"]
    # The probe trained the head only: the backbone is the one the run started from, not the fine-tuned one.
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    key = next(k for k in last if k.startswith("backbone.") and last[k].is_floating_point() and last[k].ndim > 1)
    assert not torch.equal(start["state_dict"][key], last[key])
    assert torch.load(run / "checkpoints" / "wise_ft.ckpt", weights_only=True)["temperature"] == 1.0


@pytest.mark.parametrize("extra, match", [
    (["freeze=head_only"], "trains no backbone weight"),
    (["freeze=none", "evaluate=best"], "evaluate=best cannot be combined"),
])
def test_wise_ft_refuses_runs_it_cannot_interpolate_before_training(
    tmp_path: Path, make_folder: Callable[..., Path], extra: list[str], match: str
) -> None:
    with pytest.raises(FineTuneError, match=match):
        _train(tmp_path, make_folder, *extra)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _saved(path: Path, backbone: str = "test_resnet", num_classes: int = 3, head: str = "linear") -> Path:
    import pytorch_lightning as pl

    from finetune.module import FineTuneModule

    module = FineTuneModule(backbone, num_classes=num_classes, pretrained=False, head=head)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("other, words", [
    ({"backbone": "test_efficientnet"}, "backbone differ (test_resnet vs test_efficientnet)"),
    ({"num_classes": 4}, "number of classes differ (3 vs 4)"),
    ({"head": "mlp"}, "different parameters"),
])
def test_a_mismatched_pair_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], other: dict,
                                                words: str) -> None:
    from finetune.interpolate import main

    a, b = _saved(tmp_path / "a.ckpt"), _saved(tmp_path / "b.ckpt", **other)
    with pytest.raises(SystemExit) as e:
        main([str(a), str(b)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: cannot average")
    assert words in err
    assert not list(tmp_path.glob("interpolation.*"))
