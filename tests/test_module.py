"""FineTuneModule: freezing, BatchNorm, parameter groups, checkpoints, plain Lightning use."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune import FineTuneModule
from finetune.errors import FineTuneError

from conftest import TINY_MODELS


def _loader(n: int = 16, classes: int = 3, size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def _bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_head_only_trains_exactly_the_head(name: str) -> None:
    m = FineTuneModule(name, num_classes=4, pretrained=False, freeze="head_only")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    assert m.trainable_params() == m.backbone.num_features * 4 + 4
    full = FineTuneModule(name, num_classes=4, pretrained=False, freeze="none")
    assert full.trainable_params() == full.total_params()


def test_frozen_batchnorm_statistics_stay_bit_identical(tmp_path: Path) -> None:
    m = FineTuneModule("test_resnet", num_classes=3, pretrained=False, freeze="head_only")
    before = _bn_stats(m)
    backbone_before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    _trainer(tmp_path).fit(m, _loader(), _loader())
    after = _bn_stats(m)
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, m.backbone.state_dict()[k]) for k, v in backbone_before.items())
    # ...and they stay frozen although Lightning calls model.train() every epoch.
    m.train()
    assert all(not bn.training for bn in m.backbone.modules() if isinstance(bn, nn.BatchNorm2d))


def test_trainable_batchnorm_statistics_change(tmp_path: Path) -> None:
    m = FineTuneModule("test_resnet", num_classes=3, pretrained=False, freeze="none")
    before = _bn_stats(m)
    _trainer(tmp_path).fit(m, _loader(), _loader())
    after = _bn_stats(m)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_train_bn_lets_affine_params_train_but_not_statistics(tmp_path: Path) -> None:
    m = FineTuneModule("test_resnet", num_classes=3, pretrained=False, freeze={"name": "head_only", "train_bn": True})
    bn = next(x for x in m.backbone.modules() if isinstance(x, nn.BatchNorm2d))
    assert bn.weight.requires_grad
    w, stats = bn.weight.detach().clone(), _bn_stats(m)
    _trainer(tmp_path).fit(m, _loader(), _loader())
    assert not torch.equal(w, bn.weight.detach())
    assert all(torch.equal(stats[k], v) for k, v in _bn_stats(m).items())


def test_param_groups_have_head_and_reduced_backbone_lrs(tmp_path: Path) -> None:
    constant = {"_target_": "finetune.optim.build_scheduler", "_partial_": True, "sched": "constant", "warmup_epochs": 0}
    m = FineTuneModule("test_resnet", num_classes=3, pretrained=False, lr=0.01, backbone_lr_mult=0.1, scheduler=constant)
    trainer = _trainer(tmp_path)
    trainer.fit(m, _loader(), _loader())
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["head"]["lr"] == pytest.approx(0.01)
    stage_groups = [g for name, g in groups.items() if name.startswith("stage")]
    assert stage_groups and all(g["lr"] == pytest.approx(0.001) for g in stage_groups)
    no_decay = [g for name, g in groups.items() if "no_decay" in name]
    assert no_decay and all(g["weight_decay"] == 0.0 for g in no_decay)
    assert all(p.ndim <= 1 for g in no_decay for p in g["params"])
    assert all(p.ndim > 1 for name, g in groups.items() if "no_decay" not in name for p in g["params"])
    n_in_groups = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_in_groups == m.total_params()


def test_top5_is_logged_only_with_more_than_five_classes(tmp_path: Path) -> None:
    many = FineTuneModule("test_resnet", num_classes=7, pretrained=False)
    trainer = _trainer(tmp_path)
    trainer.fit(many, _loader(classes=7), _loader(classes=7))
    assert {"val/acc", "val/top5", "train/acc"} <= set(trainer.callback_metrics)
    few = FineTuneModule("test_resnet", num_classes=3, pretrained=False)
    trainer = _trainer(tmp_path)
    trainer.fit(few, _loader(), _loader())
    assert "val/top5" not in trainer.callback_metrics


def test_checkpoint_rebuilds_without_hydra_or_weights_file(tmp_path: Path) -> None:
    import timm

    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    m = FineTuneModule("test_resnet", num_classes=3, weights=str(weights), freeze="head_only", class_names=["a", "b", "c"])
    trainer = _trainer(tmp_path)
    trainer.fit(m, _loader(), _loader())
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    weights.unlink()  # the checkpoint holds every weight: the original file is not needed
    loaded = FineTuneModule.load_from_checkpoint(ckpt)
    assert loaded.hparams.class_names == ["a", "b", "c"] and loaded.hparams.freeze["name"] == "head_only"
    x = torch.randn(2, 3, 32, 32)
    m.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(m(x), loaded(x))


def test_unknown_freeze_strategy() -> None:
    with pytest.raises(FineTuneError, match="unknown freeze strategy 'bogus'"):
        FineTuneModule("test_resnet", num_classes=3, pretrained=False, freeze="bogus")


def test_vit_position_embedding_and_class_token_are_not_decayed() -> None:
    from finetune.optim import param_groups

    m = FineTuneModule("test_vit", num_classes=3, pretrained=False)
    assert {"pos_embed", "cls_token"} <= m.backbone.no_weight_decay()  # what timm's ViT says of itself
    groups = param_groups(m.backbone, m.head, m.freeze_plan, 0.01, 0.1, 0.05)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(m.backbone.named_parameters())
    assert decay_of[id(params["pos_embed"])] == 0.0 and decay_of[id(params["cls_token"])] == 0.0
    assert params["pos_embed"].ndim == 3  # not caught by the 1-d rule: only no_weight_decay() spares it
    assert decay_of[id(params["patch_embed.proj.weight"])] == 0.05


def test_python_api_defaults_are_the_cli_defaults() -> None:
    from finetune.builders import build_module
    from finetune.config import compose
    from finetune.data import ImageDataModule

    cfg = compose(["backbone.name=test_resnet", "backbone.pretrained=false"])
    built = build_module(cfg, ImageDataModule("digits", image_size=32))
    plain = FineTuneModule("test_resnet", num_classes=10, pretrained=False)
    for key in ("lr", "backbone_lr_mult", "layer_decay", "weight_decay", "optimizer", "scheduler", "head", "freeze",
                "label_smoothing", "class_weights", "channels_last"):
        assert plain.hparams[key] == built.hparams[key], key


def test_optimizer_and_scheduler_are_swapped_from_config(tmp_path: Path) -> None:
    from finetune.builders import build_module
    from finetune.config import compose
    from finetune.data import ImageDataModule

    cfg = compose(["optim=sgd", "optim.scheduler.sched=linear", "backbone.name=test_resnet", "backbone.pretrained=false"])
    m = build_module(cfg, ImageDataModule("digits", image_size=32))
    trainer = _trainer(tmp_path)
    trainer.fit(m, _loader(classes=10), _loader(classes=10))
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
    with pytest.raises(FineTuneError, match="optim.optimizer"):
        bad = FineTuneModule("test_resnet", num_classes=3, pretrained=False,
                             optimizer={"_target_": "torch.optim.NoSuchOptimizer", "_partial_": True})
        _trainer(tmp_path).fit(bad, _loader(), _loader())
