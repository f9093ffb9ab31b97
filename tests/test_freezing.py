"""Freeze strategies, per-stage LRs over epochs, BatchNorm and resume (issue: freezing, heads, LRs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune import FineTuneModule
from finetune.config import compose
from finetune.errors import FineTuneError
from finetune.stage_groups import backbone_stages
from finetune.train import train


FAMILIES = ("test_efficientnet", "test_vit")  # one with BatchNorm, one ViT


def _loader(n: int = 16, classes: int = 3, size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    return DataLoader(TensorDataset(x, torch.arange(n) % classes), batch_size=8)


def _trainable_backbone(m: FineTuneModule) -> set[str]:
    return {n for n, p in m.backbone.named_parameters() if p.requires_grad}


def _stage_params(m: FineTuneModule, indices) -> set[str]:
    stages = backbone_stages(m.backbone)
    return {n for i in indices for n in stages[i].param_names}


def _module(name: str, freeze, **kw) -> FineTuneModule:
    return FineTuneModule(name, num_classes=3, pretrained=False, freeze=freeze, **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_stages_cover_every_parameter_once(name: str) -> None:
    m = _module(name, "none")
    stages = backbone_stages(m.backbone)
    names = [n for s in stages for n in s.param_names]
    assert sorted(names) == sorted(n for n, _ in m.backbone.named_parameters())
    assert len(names) == len(set(names)) and len(stages) >= 4 and stages[0].label == "stem"


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_trainable_sets(name: str) -> None:
    s = len(backbone_stages(_module(name, "none").backbone))
    m = _module(name, {"name": "top_stages", "n": 2})
    assert _trainable_backbone(m) == _stage_params(m, [s - 2, s - 1])
    m = _module(name, {"name": "bottom_stages", "n": 1})
    assert _trainable_backbone(m) == _stage_params(m, [0])
    m = _module(name, "head_only")
    assert _trainable_backbone(m) == set()
    m = _module(name, "none")
    assert _trainable_backbone(m) == {n for n, _ in m.backbone.named_parameters()}
    m = _module(name, {"name": "gradual", "every_n_epochs": 2})
    for epoch, expected in ((0, []), (1, []), (2, [s - 1]), (3, [s - 1]), (4, [s - 2, s - 1])):
        m.apply_freeze(epoch)
        assert _trainable_backbone(m) == _stage_params(m, expected), epoch
    m = _module(name, {"name": "lp_ft", "unfreeze_at_epoch": 2})
    m.apply_freeze(1)
    assert _trainable_backbone(m) == set()
    m.apply_freeze(2)
    assert _trainable_backbone(m) == {n for n, _ in m.backbone.named_parameters()}
    # Head parameters always train.
    assert all(p.requires_grad for p in m.head.parameters())


def test_patterns() -> None:
    m = _module("test_vit", {"name": "patterns", "trainable": ["blocks.3.*", "norm.*"], "frozen": ["*.bias"]})
    assert _trainable_backbone(m) == {
        n for n, _ in m.backbone.named_parameters() if (n.startswith("blocks.3.") or n.startswith("norm.")) and not n.endswith(".bias")
    }
    with pytest.raises(FineTuneError, match="match no backbone parameter"):
        _module("test_vit", {"name": "patterns", "trainable": ["nothing.*"]})
    with pytest.raises(FineTuneError, match="has no option"):
        _module("test_vit", {"name": "top_stages", "k": 3})


def test_frozen_stages_keep_batchnorm_statistics(tmp_path: Path) -> None:
    m = _module("test_efficientnet", {"name": "top_stages", "n": 1})
    last = set(backbone_stages(m.backbone)[-1].param_names)
    bns = {n: b for n, b in m.backbone.named_modules() if isinstance(b, nn.BatchNorm2d)}
    before = {n: (b.running_mean.clone(), b.running_var.clone()) for n, b in bns.items()}
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(m, _loader(), _loader())
    for n, b in bns.items():
        unchanged = torch.equal(before[n][0], b.running_mean) and torch.equal(before[n][1], b.running_var)
        assert unchanged == (f"{n}.weight" not in last), n


class _Recorder(pl.Callback):
    """Per epoch: the per-group LRs after the first step, and the trainable backbone set."""

    def __init__(self) -> None:
        self.lrs: dict[int, dict[str, float]] = {}
        self.trainable: dict[int, set[str]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            e = trainer.current_epoch
            self.lrs[e] = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
            self.trainable[e] = _trainable_backbone(pl_module)


_SCHED = {"_target_": "finetune.optim.build_scheduler", "_partial_": True, "sched": "cosine", "warmup_epochs": 0}


def _gradual(**kw) -> FineTuneModule:
    return _module("test_efficientnet", {"name": "gradual", "every_n_epochs": 1}, lr=0.01, backbone_lr_mult=0.1,
                   layer_decay=0.5, scheduler=_SCHED, **kw)


def _fit(m: FineTuneModule, root: Path, epochs: int, ckpt: str | None = None, stop_after: int | None = None) -> _Recorder:
    rec = _Recorder()
    callbacks: list[pl.Callback] = [rec]
    if stop_after is not None:
        class Stop(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module) -> None:
                if trainer.current_epoch + 1 >= stop_after:
                    trainer.should_stop = True
        callbacks.append(Stop())
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root, callbacks=callbacks, enable_checkpointing=False)
    pl.seed_everything(0, verbose=False)
    trainer.fit(m, _loader(), _loader(), ckpt_path=ckpt)
    if stop_after is not None:
        trainer.save_checkpoint(root / "mid.ckpt")
    return rec


def test_per_group_lrs_follow_unfreezing_and_layer_decay(tmp_path: Path) -> None:
    m = _gradual()
    rec = _fit(m, tmp_path, epochs=4)
    s = len(backbone_stages(m.backbone))
    top, second = f"stage{s - 1}", f"stage{s - 2}"
    name_of = lambda e, stage: next(k for k in rec.lrs[e] if k.startswith(stage + "_") or k == stage)  # noqa: E731
    # Epoch 0: only the head has an LR; epoch 1 the top stage joins, epoch 2 the next one.
    assert rec.lrs[0]["head"] > 0
    assert all(v == 0 for k, v in rec.lrs[0].items() if k.startswith("stage"))
    assert rec.lrs[1][name_of(1, top)] > 0 and rec.lrs[1][name_of(1, second)] == 0
    assert rec.lrs[2][name_of(2, second)] > 0
    # Layer decay: the base LRs of adjacent stages differ by the factor 0.5.
    base = {g["name"]: g["initial_lr"] for g in m.trainer.optimizers[0].param_groups}
    assert base["head"] == pytest.approx(0.01)
    assert base[name_of(1, top)] == pytest.approx(0.001)
    assert base[name_of(1, second)] == pytest.approx(0.0005)
    assert rec.trainable[0] == set() and rec.trainable[1] == set(backbone_stages(m.backbone)[-1].param_names)


def test_resume_mid_gradual_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    full = _fit(_gradual(), tmp_path / "a", epochs=4)
    _fit(_gradual(), tmp_path / "b", epochs=4, stop_after=2)
    resumed = _fit(_gradual(), tmp_path / "b", epochs=4, ckpt=str(tmp_path / "b" / "mid.ckpt"))
    assert sorted(resumed.lrs) == [2, 3]
    for e in (2, 3):
        assert resumed.trainable[e] == full.trainable[e]
        assert resumed.lrs[e].keys() == full.lrs[e].keys()
        for k in full.lrs[e]:
            assert resumed.lrs[e][k] == pytest.approx(full.lrs[e][k], rel=1e-6), (e, k)


def test_mlp_head() -> None:
    m = FineTuneModule("test_resnet", num_classes=5, pretrained=False,
                       head={"_target_": "finetune.heads.MLPHead", "hidden_dim": 16, "drop_rate": 0.2})
    assert isinstance(m.head[0], nn.Linear) and m.head[0].out_features == 16 and m.head[-1].out_features == 5
    assert m.head[3].p == 0.2
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    short = FineTuneModule("test_resnet", num_classes=5, pretrained=False, head="mlp")
    assert short.head[0].out_features == 512  # MLPHead's own default: the one place it lives
    with pytest.raises(FineTuneError, match="unknown head"):
        FineTuneModule("test_resnet", num_classes=5, pretrained=False, head="conv")


@pytest.mark.parametrize("strategy, overrides, last_epoch, first_epoch", [
    ("head_only", [], [], []),
    ("top_stages", ["freeze.n=1"], [-1], [-1]),
    ("bottom_stages", ["freeze.n=2"], [0, 1], [0, 1]),
    ("lp_ft", ["freeze.unfreeze_at_epoch=1"], "all", []),
])
def test_metrics_trainable_params_match_the_strategy(
    tmp_path: Path, make_folder, strategy: str, overrides: list[str], last_epoch, first_epoch
) -> None:
    root = make_folder(classes=2, per_class=4)
    cfg = compose([f"freeze={strategy}", *overrides, "backbone.name=test_efficientnet", "backbone.pretrained=false",
                   "data=folder", f"data.root={root}", "data.image_size=32", "data.num_workers=0", "data.val_fraction=0.25",
                   "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "head=mlp"])
    m = train(cfg, tmp_path / "run")
    # Expected counts from the stages themselves (not from the strategy code under test).
    model = FineTuneModule("test_efficientnet", num_classes=2, pretrained=False, head="mlp")
    stages = backbone_stages(model.backbone)
    sizes = dict((n, p.numel()) for n, p in model.backbone.named_parameters())
    head = sum(p.numel() for p in model.head.parameters())

    def count(which) -> int:
        chosen = stages if which == "all" else [stages[i] for i in which]
        return head + sum(sizes[n] for s in chosen for n in s.param_names)

    assert m["trainable_params"] == count(last_epoch)
    assert m["trainable_params_first_epoch"] == count(first_epoch)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["freeze"] == strategy


def test_a_new_strategy_is_one_class_and_its_registration() -> None:
    from dataclasses import dataclass

    from finetune.stages import describe
    from finetune.strategies import STRATEGIES, FreezeStrategy, register

    @register("odd_stages")
    @dataclass
    class OddStages(FreezeStrategy):
        name: str = "odd_stages"
        offset: int = 1

        def stage_start(self, index: int, num_stages: int) -> int | None:
            return 0 if (index + self.offset) % 2 == 0 else None

    try:
        m = _module("test_efficientnet", {"name": "odd_stages", "offset": 1})
        stages = backbone_stages(m.backbone)
        assert _trainable_backbone(m) == _stage_params(m, [i for i in range(len(stages)) if i % 2 == 1])
        cfg = compose(["freeze=odd_stages", "freeze.offset=0"])  # a CLI option too, typed from the dataclass
        assert cfg.freeze.offset == 0 and cfg.freeze.name == "odd_stages"
        with pytest.raises(Exception, match="offset"):
            compose(["freeze=odd_stages", "freeze.offset=two"])
        assert "odd_stages offset=1" in describe("test_efficientnet")
        from finetune.strategies import compared_strategies

        assert "odd_stages" in compared_strategies().split(",")  # +recipe=compare sweeps it too
    finally:
        STRATEGIES.pop("odd_stages")


def test_stages_command(tmp_path: Path, cli) -> None:
    # freeze.n applies to every strategy that has n, whatever freeze= is (the default none has none).
    r = cli(["backbone.name=test_efficientnet", "freeze.n=1"], tmp_path, module="finetune.stages")
    assert r.returncode == 0, r.stderr
    assert "stem" in r.stdout and "top_stages n=1" in r.stdout and "bottom_stages n=1" in r.stdout
    assert "from epoch 1" in r.stdout and "RuntimeWarning" not in r.stderr
    r = cli(["backbone.name=test_efficientnet", "freeze.n=two"], tmp_path, module="finetune.stages")
    assert r.returncode == 2 and r.stderr.strip() == "error: n: expected an int, got 'two'", r.stderr
