"""Mixup/CutMix (augment.mixup, augment.cutmix): soft targets in the training loss, off by default, odd batches, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import finetune.loss
from finetune import FineTuneModule, ImageDataModule
from finetune.config import compose
from finetune.errors import FineTuneError
from finetune.features import resolve_cache_features
from finetune.loss import soft_target_cross_entropy
from finetune.train import train

TINY = ["data=folder", "backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.max_epochs=1"]


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``n <= 6`` images; at 6, element i and its Mixup partner 5 - i have different labels."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3, 4, 1])[:n]


def _soft_targets_seen(module: FineTuneModule, batch, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Run one training step; return the targets the soft-target loss received."""
    seen: list[torch.Tensor] = []

    def recording(logits, target, weight):
        seen.append(target.detach().clone())
        return soft_target_cross_entropy(logits, target, weight)

    monkeypatch.setattr(finetune.loss, "soft_target_cross_entropy", recording)
    module.train()
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    return seen


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_mixup_feeds_the_loss_convex_combinations_of_two_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    np.random.seed(0)  # timm's Mixup draws from numpy
    m = FineTuneModule("test_resnet", num_classes=5, pretrained=False, mixup={"mixup": 0.2})
    x, y = _batch()
    seen = _soft_targets_seen(m, (x.clone(), y), monkeypatch)
    m.eval()
    m.validation_step((x.clone(), y), 0)  # validation stays cross-entropy on the hard labels: not recorded
    (target,) = seen
    assert target.shape == (6, 5)
    torch.testing.assert_close(target.sum(-1), torch.ones(6))
    assert ((target > 0).sum(-1) == 2).all()  # its own label and its partner's (i pairs with 5 - i)
    lam = target[0, y[0]].item()
    assert 0 < lam < 1
    expected = lam * F.one_hot(y, 5) + (1 - lam) * F.one_hot(y.flip(0), 5)
    torch.testing.assert_close(target, expected.float())

    # The images are mixed with the same weight as the targets.
    np.random.seed(0)
    mixed, same = m.train_loss.mix(x.clone(), y)
    lam = same[0, y[0]].item()
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_label_smoothing_is_folded_into_the_mixed_target(monkeypatch: pytest.MonkeyPatch) -> None:
    np.random.seed(1)
    m = FineTuneModule("test_resnet", num_classes=5, pretrained=False, label_smoothing=0.1,
                       mixup={"cutmix": 1.0})
    (target,) = _soft_targets_seen(m, _batch(), monkeypatch)
    torch.testing.assert_close(target.sum(-1), torch.ones(6))
    assert (target >= 0.1 / 5 - 1e-6).all()  # every class keeps its smoothing share


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_off_by_default_the_training_loss_is_the_plain_cross_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    m = FineTuneModule("test_resnet", num_classes=5, pretrained=False, label_smoothing=0.1, class_weights=weights)
    assert not m.train_loss.mixing and m.hparams["mixup"] is None
    x, y = _batch()
    assert m.train_loss.mix(x, y) == (x, y)  # the batch is not touched
    seen = _soft_targets_seen(m, (x, y), monkeypatch)
    assert seen == []
    torch.manual_seed(0)
    loss = m.training_step((x, y), 0)
    plain = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights), label_smoothing=0.1)(m(x), y)
    assert loss.item() == plain.item()


def test_weighted_soft_target_loss_equals_weighted_cross_entropy_on_one_hot_targets() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 4, generator=g), torch.tensor([0, 1, 2, 3, 3, 2, 1, 1])
    w = torch.tensor([1.0, 4.0, 0.5, 2.0])
    one_hot = F.one_hot(y, 4).float()
    torch.testing.assert_close(soft_target_cross_entropy(logits, one_hot, w),
                               F.cross_entropy(logits, y, weight=w))
    torch.testing.assert_close(soft_target_cross_entropy(logits, one_hot, None), F.cross_entropy(logits, y))
    # The weights matter on a mixed target: the heavier class counts more.
    mixed = 0.5 * one_hot + 0.5 * one_hot.flip(0)
    assert soft_target_cross_entropy(logits, mixed, w) != pytest.approx(soft_target_cross_entropy(logits, mixed, None).item())


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("n", [1, 5])
def test_an_odd_batch_mixes_all_but_its_last_image(mode: str, n: int) -> None:
    np.random.seed(0)
    m = FineTuneModule("test_resnet", num_classes=5, pretrained=False, label_smoothing=0.1,
                       mixup={"mixup": 1.0, "mixup_mode": mode})
    x, y = _batch(n)
    mixed, target = m.train_loss.mix(x.clone(), y)
    assert mixed.shape == x.shape and target.shape == (n, 5)
    torch.testing.assert_close(mixed[-1], x[-1])
    torch.testing.assert_close(target[-1], F.one_hot(y[-1], 5).float() * 0.9 + 0.1 / 5)
    torch.testing.assert_close(target.sum(-1), torch.ones(n))
    if n > 1:
        assert not torch.allclose(mixed[:-1], x[:-1])


def test_a_run_with_mixup_and_odd_batches_trains_and_evaluates_on_hard_labels(tmp_path: Path, make_folder) -> None:
    root = make_folder(classes=3, per_class=6, splits=("train", "val"))
    cfg = compose([*TINY, f"data.root={root}", "data.batch_size=5", "augment.mixup=0.2", "augment.cutmix=1.0",
                   "loss.label_smoothing=0.1", "loss.class_weights=balanced"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["status"] == "ok" and np.isfinite(metrics["val_loss"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["mixup"]["cutmix"] == 1.0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["mixup"]["mixup"] == 0.2
    assert FineTuneModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt").train_loss.mixing


def test_the_feature_cache_is_refused_with_mixup_and_auto_does_not_cache() -> None:
    dm = ImageDataModule("digits", image_size=32, augment={"no_aug": True, "mixup": 0.2})
    mixing = FineTuneModule("test_efficientnet", pretrained=False, freeze="head_only", mixup={"mixup": 0.2})
    plain = FineTuneModule("test_efficientnet", pretrained=False, freeze="head_only")
    assert resolve_cache_features("auto", plain, dm)
    assert not resolve_cache_features("auto", mixing, dm)
    with pytest.raises(FineTuneError, match="augment.mixup/cutmix mix images, not features"):
        resolve_cache_features(True, mixing, dm)


@pytest.mark.parametrize(
    "args, message",
    [
        (["augment.mixup=-0.2"], "error: augment.mixup must be an alpha >= 0 (0: off), got -0.2"),
        (["augment.cutmix=-1"], "error: augment.cutmix must be an alpha >= 0"),
        (["augment.mixup=0.2", "augment.mixup_prob=1.5"], "error: augment.mixup_prob must be a probability in [0, 1]"),
        (["augment.mixup_switch_prob=-0.1"], "error: augment.mixup_switch_prob must be a probability in [0, 1]"),
        (["augment.mixup_mode=rows"], "error: augment.mixup_mode must be batch, pair or elem"),
        (["augment.cutmix_minmax=[0.8,0.2]"], "error: augment.cutmix_minmax must be [min, max]"),
        (["freeze=head_only", "augment=none", "augment.mixup=0.2", "cache_features=true"],
         "error: cache_features=true is not possible: training batches are mixed"),
    ],
)
def test_bad_mixing_values_give_one_line_errors(tmp_path: Path, cli, make_folder, args: list[str], message: str) -> None:
    root = make_folder(classes=2, per_class=5)
    r = cli([*TINY, f"data.root={root}", *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(message), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    with pytest.raises(FineTuneError):
        FineTuneModule("test_resnet", pretrained=False, mixup={"mixup": -1.0})
