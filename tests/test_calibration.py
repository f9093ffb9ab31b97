"""Temperature scaling: the fit, the measures, the checkpoint round trip, and a run that leaves calibrated checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import write_folder
from finetune.calibration import calibration_metrics, fit_temperature
from finetune.errors import FineTuneError

TINY = ["data=folder", "backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=6"]


def _overconfident(n: int, seed: int, sharpen: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z), so z is calibrated by construction, and the logits ``sharpen * z``."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, 5, generator=g)
    labels = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    return sharpen * z, labels, z


def test_temperature_scaling_undoes_over_confidence_and_keeps_every_top1() -> None:
    logits, labels, _ = _overconfident(4000, seed=0, sharpen=4.0)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(4.0, rel=0.1)  # the sharpening it was given back

    test_logits, test_labels, calibrated = _overconfident(4000, seed=1, sharpen=4.0)  # held out from the fit
    before = calibration_metrics(test_logits.softmax(-1), test_labels)
    after = calibration_metrics((test_logits / t).softmax(-1), test_labels)
    ideal = calibration_metrics(calibrated.softmax(-1), test_labels)
    assert after["nll"] < 0.6 * before["nll"]
    assert after["nll"] == pytest.approx(ideal["nll"], rel=0.02)
    assert after["ece"] < before["ece"] / 3 and after["brier"] < before["brier"]
    assert torch.equal((test_logits / t).argmax(1), test_logits.argmax(1))


def test_an_under_confident_model_gets_a_temperature_below_one() -> None:
    logits, labels, _ = _overconfident(4000, seed=2, sharpen=0.5)
    assert fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.1)


def test_calibration_measures_match_their_definitions() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1])
    m = calibration_metrics(probs, labels)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7)) / 3)
    assert m["brier"] == pytest.approx((0.02 + 0.72 + 0.18) / 3)
    # Three bins hold one image each: |conf - acc| = 0.1 (0.9, right), 0.6 (0.6, wrong), 0.3 (0.7, right).
    assert m["ece"] == pytest.approx((0.1 + 0.6 + 0.3) / 3, abs=1e-6)


def test_fit_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(FineTuneError, match="N > 0"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(FineTuneError, match="not finite"):
        fit_temperature(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))


def _saved_module(path: Path, temperature: float | None) -> Path:
    import pytorch_lightning as pl

    from finetune.module import FineTuneModule

    module = FineTuneModule("test_resnet", num_classes=3, pretrained=False)
    if temperature is not None:
        module.temperature = temperature
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def test_the_temperature_survives_save_and_load_and_predict_applies_it(tmp_path: Path) -> None:
    from finetune.checkpoints import load_checkpoint
    from finetune.inference import probabilities

    module, raw = load_checkpoint(_saved_module(tmp_path / "t.ckpt", 2.5))
    assert raw["temperature"] == 2.5 and module.temperature == 2.5
    x = torch.randn(4, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(4)), batch_size=3)
    calibrated, _ = probabilities(module, loader)
    uncalibrated, _ = probabilities(module, loader, temperature=1.0)
    with torch.no_grad():
        logits = module(x)
    torch.testing.assert_close(calibrated, (logits / 2.5).softmax(-1))
    torch.testing.assert_close(uncalibrated, logits.softmax(-1))
    assert not torch.allclose(calibrated, uncalibrated, atol=1e-4)
    assert module.temperature == 2.5  # the uncalibrated pass put it back


def test_a_checkpoint_without_a_temperature_loads_uncalibrated_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    from finetune.checkpoints import load_checkpoint

    path = _saved_module(tmp_path / "old.ckpt", None)
    raw = torch.load(path, weights_only=True)
    del raw["temperature"]  # as written before calibration existed
    torch.save(raw, path)
    assert load_checkpoint(path)[0].temperature == 1.0
    raw["temperature"] = -3.0
    torch.save(raw, path)
    with pytest.raises(FineTuneError, match="temperature must be a positive"):
        load_checkpoint(path)


def _images(root: Path) -> Path:
    return write_folder(root, per_class=6, splits=("train", "val", "test"))


def _val_logits(ckpt: Path, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the checkpoint's uncalibrated val probabilities: the logits up to a per-image shift."""
    from finetune.checkpoints import load_checkpoint, resolve_preprocessing
    from finetune.data.sources import folder
    from finetune.evaluate import split_probabilities

    module, raw = load_checkpoint(ckpt)
    prep = resolve_preprocessing(module, raw, ckpt)
    probs, labels = split_probabilities(module, folder(root).splits["val"], prep, temperature=1.0)
    return probs.double().log(), labels


@pytest.mark.parametrize("cached", [False, True], ids=["images", "cached_features"])
def test_a_run_leaves_every_checkpoint_with_the_temperature_of_its_own_weights(
    tmp_path: Path, cached: bool
) -> None:
    from finetune.config import compose
    from finetune.train import train

    root = _images(tmp_path / "images")
    extra = ["freeze=head_only", "augment=none", "cache_features=true"] if cached else []
    metrics = train(compose([*TINY, "trainer.max_epochs=2", f"data.root={root}", *extra]), tmp_path / "run")
    assert metrics["cached_features"] is cached
    files = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert [f.name for f in files] == ["best.ckpt", "last.ckpt"]
    for f in files:
        saved = torch.load(f, weights_only=True)["temperature"]
        assert saved != 1.0 and metrics["checkpoint_temperatures"][f.name] == pytest.approx(saved, rel=1e-5)
        assert fit_temperature(*_val_logits(f, root)) == pytest.approx(saved, rel=1e-3)  # fitted on its own weights
    assert metrics["temperature"] == pytest.approx(metrics["checkpoint_temperatures"]["last.ckpt"])
    assert metrics["val_nll_after"] <= metrics["val_nll_before"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["temperature"] == metrics["temperature"]


def test_calibrate_false_leaves_checkpoints_uncalibrated(tmp_path: Path) -> None:
    from finetune.config import compose
    from finetune.train import train

    root = _images(tmp_path / "images")
    metrics = train(compose([*TINY, "trainer.max_epochs=1", f"data.root={root}", "calibrate=false"]), tmp_path / "run")
    assert "temperature" not in metrics
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["temperature"] == 1.0


def test_calibrate_takes_a_bool_only(tmp_path: Path, cli) -> None:
    r = cli(["calibrate=maybe"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: calibrate: ") and "'maybe'" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "outputs").exists()


def test_a_run_without_val_images_is_refused_before_training(tmp_path: Path) -> None:
    from finetune.config import compose
    from finetune.train import train

    root = _images(tmp_path / "images") / "train"  # no split folders: val comes from val_fraction, here none
    with pytest.raises(FineTuneError, match="calibrate=true needs val images.*calibrate=false"):
        train(compose([*TINY, "trainer.max_epochs=1", f"data.root={root}", "data.val_fraction=0"]), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("evaluate", ["last", "best"])
def test_the_last_validation_of_the_final_weights_is_reused_not_passed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evaluate: str
) -> None:
    import csv

    import pytorch_lightning as pl

    import finetune.callbacks.calibrate as calibrate
    from finetune.config import compose
    from finetune.train import train

    passes = {"calibration": 0, "validate": 0}
    logits, validate = calibrate._logits, pl.Trainer.validate

    def counted_logits(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        passes["calibration"] += 1
        return logits(*args, **kwargs)

    def counted_validate(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        passes["validate"] += 1
        return validate(self, *args, **kwargs)

    monkeypatch.setattr(calibrate, "_logits", counted_logits)
    monkeypatch.setattr(pl.Trainer, "validate", counted_validate)
    root = _images(tmp_path / "images")
    metrics = train(compose([*TINY, "trainer.max_epochs=1", f"data.root={root}", f"evaluate={evaluate}"]),
                    tmp_path / "run")
    # One epoch: best.ckpt and last.ckpt hold the final weights, which the epoch's validation passed already.
    assert passes == {"calibration": 0, "validate": 0 if evaluate == "last" else 1}
    with (tmp_path / "run" / "epochs.csv").open(newline="") as f:
        logged = list(csv.DictReader(f))[-1]
    assert metrics["val_acc"] == pytest.approx(float(logged["val/acc"]), abs=1e-5)
    assert metrics["val_loss"] == pytest.approx(float(logged["val/loss"]), abs=1e-5)
    # The temperature is what a fresh pass over val with the final weights fits.
    f = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert fit_temperature(*_val_logits(f, root)) == pytest.approx(metrics["temperature"], rel=1e-3)


def test_weights_version_follows_the_values_of_the_weights() -> None:
    import timm

    from finetune.weights_version import weights_version

    model = timm.create_model("test_resnet").eval()
    before = weights_version(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert weights_version(model) == before  # an eval forward changes nothing
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert weights_version(model) == before  # the same values loaded back
    next(model.parameters()).data.add_(1e-3)  # through .data: no version counter moves, the sum does
    assert weights_version(model) != before
    now = weights_version(model)
    model.train()(torch.randn(2, 3, 32, 32))  # BatchNorm's running statistics move
    assert weights_version(model) != now
