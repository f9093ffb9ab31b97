"""optim.lr=find: the valley rule on synthetic curves, and Lightning's finder on a tiny model with its freeze strategy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from pytorch_lightning.tuner.lr_finder import _LRFinder

from finetune import FineTuneModule
from finetune.builders import check_run_config
from finetune.config import compose
from finetune.data import ImageDataModule
from finetune.errors import FineTuneError
from finetune.lr_find import find_lr, valley_lr


def _finder_curve(spike_at: int | None = None, nan_at: int | None = None) -> tuple[list[float], list[float]]:
    """A range test's losses as Lightning records them (its EMA, beta 0.98, debiased) for a known curve:
    flat at 2.3 below LR 1e-4, falling to 0.3 at 3e-2, diverging after."""
    rng = np.random.default_rng(0)
    lrs = np.logspace(-6, 0, 100)
    raw = []
    for lr in lrs:
        x = math.log10(lr)
        loss = 2.3 if x < -4 else 2.3 - 2.0 * (x + 4) / 2.5 if x < -1.5 else 0.3 * math.exp(3 * (x + 1.5))
        raw.append(loss + rng.normal(0, 0.05))
    if spike_at is not None:
        raw[spike_at] = 20.0  # one bad batch early in the test
    avg, losses = 0.0, []
    for step, loss in enumerate(raw):
        avg = 0.98 * avg + 0.02 * loss
        losses.append(avg / (1 - 0.98 ** (step + 2)))
    if nan_at is not None:
        losses[nan_at:] = [float("nan")] + [0.01] * (len(losses) - nan_at - 1)  # NaN, then garbage
    return list(lrs), losses


def _lightning_suggestion(lrs: list[float], losses: list[float]) -> float:
    finder = _LRFinder("exponential", lrs[0], lrs[-1], len(lrs))
    finder.results = {"lr": lrs, "loss": losses}
    return finder.suggestion()


def test_valley_is_not_fooled_by_an_early_spike_where_lightning_is() -> None:
    lrs, losses = _finder_curve(spike_at=12)
    # Lightning's steepest gradient lands on the spike's decay, two decades before the loss starts to fall.
    assert _lightning_suggestion(lrs, losses) < 1e-4
    lr, _ = valley_lr(lrs, losses)
    assert 1e-4 < lr < 3e-2  # inside the real descent
    clean, _ = valley_lr(*_finder_curve())
    assert 1e-4 < clean < 3e-2


def test_valley_stops_at_nan_and_never_suggests_past_it() -> None:
    lrs, losses = _finder_curve(nan_at=60)
    lr, idx = valley_lr(lrs, losses)
    assert idx < 60 and lr < lrs[60]


def test_a_curve_that_never_falls_is_an_error() -> None:
    lrs = list(np.logspace(-6, 0, 30))
    with pytest.raises(FineTuneError, match="did not fall"):
        valley_lr(lrs, [1.0 + i for i in range(30)])


def _module(freeze: str | dict, mult: float = 0.3) -> FineTuneModule:
    torch.manual_seed(0)
    return FineTuneModule("test_resnet", num_classes=3, pretrained=False, freeze=freeze, backbone_lr_mult=mult)


def _data(make_folder: Callable[..., Path]) -> ImageDataModule:
    root = make_folder(classes=3, per_class=8)
    return ImageDataModule("folder", root=root, backbone="test_resnet", image_size=32, batch_size=8, val_fraction=0.25)


def test_finder_keeps_frozen_parameters_and_returns_a_finite_lr(make_folder: Callable[..., Path]) -> None:
    module = _module({"name": "lp_ft", "unfreeze_at_epoch": 1})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    result = find_lr(module, _data(make_folder), num_training_steps=15, accelerator="cpu")
    assert math.isfinite(result["lr"]) and result["lr"] > 0
    assert module.hparams.lr == result["lr"]
    # What the test trained: the head alone (lp_ft's epoch 0), every backbone group at LR 0.
    assert result["trained_params"] == sum(p.numel() for p in module.head.parameters())
    assert all(lr == 0 for name, lr in result["group_lrs"].items() if name.startswith("stage"))
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics as they were


def test_finder_keeps_each_groups_ratio_to_the_head_lr(make_folder: Callable[..., Path]) -> None:
    module = _module("none", mult=0.1)
    result = find_lr(module, _data(make_folder), num_training_steps=10, accelerator="cpu")
    lrs = result["group_lrs"]
    head = lrs["head"]
    # Lightning's own finder would give every group the same LR.
    assert head > 0 and all(math.isclose(v / head, 0.1, rel_tol=1e-6) for k, v in lrs.items() if k.startswith("stage"))


@pytest.mark.parametrize("value", ["abc", "-0.1", "0"])
def test_bad_lr_is_one_line(value: str) -> None:
    with pytest.raises(FineTuneError, match="optim.lr must be a positive number or 'find'"):
        check_run_config(compose([f"optim.lr={value}"]))


def test_lr_find_composes() -> None:
    cfg = compose(["optim.lr=find"])
    check_run_config(cfg)
    assert cfg.optim.lr == "find"


def test_the_finders_steps_are_a_knob_and_bad_counts_are_one_line() -> None:
    from finetune.builders import _run_callbacks

    found = _run_callbacks(compose(["optim.lr=find", "optim.find_num_training_steps=12"]), Path("run"))
    assert found[0]._num_training_steps == 12
    budgeted = _run_callbacks(compose(["budget=5m", "optim.find_share=0.1", "optim.find_num_training_steps=7"]), Path("run"))
    assert budgeted[0]._num_training_steps == 7
    for bad in ("2", "-5"):
        with pytest.raises(FineTuneError, match=f"optim.find_num_training_steps must be an integer of at least 3, got '{bad}'"):
            check_run_config(compose(["optim.lr=find", f"optim.find_num_training_steps={bad}"]))
