"""EMA of the weights (ema.decay): what is averaged, what is evaluated and checkpointed, resume, bad values."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from timm.utils.model_ema import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune import FineTuneModule
from finetune.callbacks import EMA
from finetune.callbacks.ema import EmaUpdate
from finetune.config import compose
from finetune.stage_groups import backbone_stages
from finetune.train import train

DECAY = 0.8
# Only the head trains in epoch 0, the top stage joins in epoch 1: frozen, unfrozen and BatchNorm in one run.
GRADUAL = {"name": "gradual", "every_n_epochs": 1}
_SCHED = {"_target_": "finetune.optim.build_scheduler", "_partial_": True, "warmup_epochs": 0}


def _loader(n: int = 24, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3), batch_size=8)


def _module() -> FineTuneModule:
    pl.seed_everything(0, verbose=False)
    return FineTuneModule("test_efficientnet", num_classes=3, pretrained=False, freeze=GRADUAL, lr=0.05,
                          backbone_lr_mult=0.5, scheduler=_SCHED)


class _Raw(pl.Callback):
    """The raw weights after every optimizer step, and at the start of each epoch's first step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.epoch_starts: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, m: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.epoch_starts.append({k: v.detach().clone() for k, v in m.state_dict().items()})

    def on_train_batch_end(self, trainer: pl.Trainer, m: pl.LightningModule, *args: Any) -> None:
        self.steps.append({k: v.detach().clone() for k, v in m.state_dict().items()})


class _Stop(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, m: pl.LightningModule) -> None:
        trainer.should_stop = True


def _fit(root: Path, epochs: int = 2, ckpt: str | None = None, stop: bool = False, ema: bool = True):
    raw = _Raw()
    callbacks: list[pl.Callback] = [raw, ModelCheckpoint(dirpath=root, filename="last", monitor=None)]
    if ema:
        callbacks.insert(0, EMA(decay=DECAY))
    if stop:
        callbacks.append(_Stop())
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=callbacks)
    m = _module()
    trainer.fit(m, _loader(), _loader(12, seed=1), ckpt_path=ckpt)
    return trainer, m, raw


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ema")
    trainer, m, raw = _fit(root)
    return trainer, m, raw, torch.load(root / "last.ckpt", weights_only=True), root / "last.ckpt"


def _head(state: dict[str, torch.Tensor]) -> str:
    return next(k for k in state if k.startswith("head.") and k.endswith("weight"))


def _loss_acc(m: nn.Module, state: dict[str, torch.Tensor]) -> tuple[float, float]:
    m.load_state_dict(state)
    m.eval()
    with torch.no_grad():
        logits, y = zip(*((m(x), y) for x, y in _loader(12, seed=1)))
    logits, y = torch.cat(logits), torch.cat(y)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def test_the_update_is_timms_with_its_warmup_and_exact_for_constants() -> None:
    timm_ema = ModelEmaV3(nn.Linear(1, 1), decay=0.99, use_warmup=True)  # timm counts updates from 1
    update = EmaUpdate(0.99, use_warmup=True, warmup_power=2 / 3)
    assert [update.decay_at(n) for n in range(1, 3000, 7)] == [timm_ema.get_decay(n + 1) for n in range(1, 3000, 7)]
    assert EmaUpdate(0.99, use_warmup=False, warmup_power=2 / 3).decay_at(1) == 0.99
    const, moving, count = torch.full((5,), 0.1234567), torch.zeros(5), torch.tensor(3)
    for n in range(1, 200):
        update([const, moving], [torch.full((5,), 0.1234567), torch.ones(5)], torch.tensor(n))
        update([count], [torch.tensor(n + 3)], torch.tensor(n))
    assert torch.equal(const, torch.full((5,), 0.1234567))  # a frozen weight's average is the weight, bit for bit
    assert 0.99 < moving[0] < 1 and count.item() == 202  # integer buffers (num_batches_tracked) are copied


def test_the_average_is_timms_ema_of_every_step_and_training_runs_on_the_raw_weights(run) -> None:
    trainer, m, raw, ckpt, _ = run
    assert len(raw.steps) == 6 and int(ckpt["averaging_state"]["n_averaged"]) == 6
    timm_ema = ModelEmaV3(nn.Linear(1, 1), decay=DECAY, use_warmup=True)
    expected = {k: v.clone() for k, v in raw.steps[0].items()}
    for t, step in enumerate(raw.steps[1:], start=2):
        d = timm_ema.get_decay(t)
        expected = {k: (e * d + step[k] * (1 - d)) if e.is_floating_point() else step[k] for k, e in expected.items()}
    averaged = ckpt["state_dict"]
    assert averaged.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.allclose(averaged[k], v, atol=1e-6, rtol=1e-5), k
    # Validation after epoch 0 swapped the average in and back: epoch 1 started from the raw weights.
    assert all(torch.equal(raw.epoch_starts[1][k], v) for k, v in raw.steps[2].items())
    assert all(torch.equal(ckpt["current_model_state"][k], v) for k, v in raw.steps[-1].items())
    assert not torch.equal(averaged[_head(averaged)], ckpt["current_model_state"][_head(averaged)])


def test_frozen_weights_and_their_batchnorm_statistics_average_to_themselves(run) -> None:
    _, m, raw, ckpt, _ = run
    top = set(backbone_stages(m.backbone)[-1].param_names)
    frozen = [k for k in ckpt["state_dict"] if k.startswith("backbone.") and k[len("backbone."):] not in top
              and not any(k.startswith(f"backbone.{p.rsplit('.', 1)[0]}.") for p in top)]
    assert any("running_mean" in k for k in frozen) and any(k.endswith("weight") for k in frozen)
    for k in frozen:
        assert torch.equal(ckpt["state_dict"][k], raw.steps[0][k]), k
    moved = [k for k in ckpt["state_dict"] if k[len("backbone."):] in top]
    assert moved and any(not torch.equal(ckpt["state_dict"][k], raw.steps[0][k]) for k in moved)


def test_validation_and_the_checkpoint_are_the_averaged_weights(run) -> None:
    trainer, m, _, ckpt, path = run
    logged_loss, logged_acc = trainer.callback_metrics["val/loss"].item(), trainer.callback_metrics["val/acc"].item()
    probe = _module()
    ema_loss, ema_acc = _loss_acc(probe, ckpt["state_dict"])
    raw_loss, _ = _loss_acc(probe, ckpt["current_model_state"])
    assert logged_loss == pytest.approx(ema_loss, abs=1e-5) and logged_acc == pytest.approx(ema_acc)
    assert abs(raw_loss - ema_loss) > 1e-3  # so the match above tells the averaged weights from the raw ones
    loaded = FineTuneModule.load_from_checkpoint(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ckpt["state_dict"].items())
    # After fit the module holds the averaged weights: what train() validates, tests and calibrates.
    assert all(torch.equal(m.state_dict()[k], v) for k, v in ckpt["state_dict"].items())


def test_resume_continues_identically(tmp_path: Path, run) -> None:
    _, _, _, full, _ = run
    _fit(tmp_path, stop=True)
    resumed = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 0
    _fit(tmp_path, ckpt=str(tmp_path / "last.ckpt"))
    resumed = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == full["epoch"] == 1
    for part in ("state_dict", "current_model_state", "averaging_state"):
        for k, v in full[part].items():
            assert torch.allclose(resumed[part][k], v, atol=1e-7, rtol=0), (part, k)


def test_a_run_with_ema_trains_exactly_as_one_without(tmp_path: Path, run) -> None:
    _, _, _, with_ema, _ = run
    _fit(tmp_path, ema=False)
    without = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(with_ema["current_model_state"][k], v) for k, v in without.items())


def test_a_cli_run_reports_and_evaluates_the_averaged_best_checkpoint(tmp_path: Path, make_folder) -> None:
    root = make_folder(classes=3, per_class=6)
    cfg = compose(["data=folder", f"data.root={root}", "backbone.name=test_resnet", "backbone.pretrained=false",
                   "data.image_size=32", "data.num_workers=0", "data.batch_size=6", "data.val_fraction=0.34",
                   "trainer.enable_progress_bar=false", "trainer.max_epochs=2", "freeze=head_only", "augment=none",
                   "evaluate=best", "ema.decay=0.9"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["cached_features"] is True  # the head trains on cached features; its average is kept all the same
    assert metrics["ema"]["decay"] == 0.9 and metrics["ema"]["updates"] == 4
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["ema"] == metrics["ema"]
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / name, weights_only=True)
        head = _head(ckpt["state_dict"])
        assert not torch.equal(ckpt["state_dict"][head], ckpt["current_model_state"][head])
        assert ckpt["temperature"] == pytest.approx(metrics["checkpoint_temperatures"][name], rel=1e-5)
        backbone = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
        assert all(torch.equal(ckpt["current_model_state"][k], v) for k, v in backbone.items())  # frozen throughout


@pytest.mark.parametrize("value, shown", [("2", "2.0"), ("0", "0.0"), ("1", "1.0"), ("-0.5", "-0.5")])
def test_a_decay_outside_0_1_is_a_one_line_error(tmp_path: Path, cli, value: str, shown: str) -> None:
    r = cli([f"ema.decay={value}"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == f"error: ema.decay must be in (0, 1), got {shown}", r.stderr
    assert not list(tmp_path.rglob("*.ckpt"))



def test_the_callback_pickles_for_ddp_spawn() -> None:
    # Lightning's own EMAWeightAveraging holds a closure (get_ema_avg_fn) and cannot be pickled.
    copy = pickle.loads(pickle.dumps(EMA(decay=0.95, use_warmup=False)))
    assert copy.update.decay_at(10) == 0.95 and copy._kwargs["multi_avg_fn"] is copy.update


class _SameOnEveryRank(pl.Callback):
    """At the end of fit (after EMA put the average into the module): both ranks hold the same average."""

    def on_train_end(self, trainer: pl.Trainer, m: pl.LightningModule) -> None:
        flat = torch.cat([t.detach().flatten().float() for t in m.state_dict().values()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "the ranks' averages diverged"


@pytest.mark.slow  # two spawned processes: ~40 s of CPU, minutes on a loaded machine
def test_under_ddp_spawn_both_ranks_keep_the_same_average(tmp_path: Path) -> None:
    # ddp_spawn pickles the callbacks into each process: the update function must be picklable.
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[EMA(decay=DECAY), _SameOnEveryRank(),
                                    ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)])
    trainer.fit(_module(), _loader(32), _loader(12, seed=1))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 4  # 32 images / 2 ranks / batch 8, 2 epochs
    head = _head(ckpt["state_dict"])
    assert not torch.equal(ckpt["state_dict"][head], ckpt["current_model_state"][head])
