"""The Hydra CLI and train(cfg): configs, recipes, run directory, one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from finetune.config import compose, recipe_names
from finetune.train import train

from conftest import run_cli

TINY = ["backbone.name=test_resnet", "backbone.pretrained=false", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]


def test_every_recipe_composes_names_itself_and_changes_something() -> None:
    from omegaconf import OmegaConf

    def plain(cfg) -> dict:
        out = OmegaConf.to_container(cfg)
        out.pop("recipe")
        return out

    defaults = plain(compose([]))
    for name in recipe_names():
        cfg = compose([f"+recipe={name}"])
        assert cfg.recipe == name
        if name not in ("auto", "compare", "compare_all"):  # those pick or sweep; the others must differ from the defaults
            assert plain(cfg) != defaults, f"recipe {name} changes nothing"
    assert compose(["+recipe=small_similar"]).freeze.name == "head_only"
    assert compose(["+recipe=large_similar"]).optim.backbone_lr_mult == 0.1
    assert compose(["+recipe=scratch"]).backbone.pretrained is False


def test_train_on_digits_writes_metrics(tmp_path: Path) -> None:
    cfg = compose(
        ["backbone.name=test_efficientnet", "backbone.pretrained=false", "data.image_size=32",
         "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "+recipe=small_similar"]
    )
    m = train(cfg, tmp_path)
    for key in ("recipe", "backbone", "freeze", "epochs", "train_time_s", "trainable_params", "total_params",
                "val_acc", "val_top5", "test_acc", "test_top5"):
        assert key in m, key
    assert m["recipe"] == "small_similar" and m["freeze"] == "head_only" and m["epochs"] == 1
    assert m["split_sizes"] == {"train": 1257, "val": 180, "test": 360}
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    assert (tmp_path / "checkpoints" / "best.ckpt").exists()


def test_cli_run_on_a_folder_leaves_a_complete_run_dir(tmp_path: Path, make_folder) -> None:
    root = make_folder(classes=3, per_class=6, splits=("train", "val", "test"))
    out = tmp_path / "run"
    r = run_cli(["data=folder", f"data.root={root}", "data.image_size=32", "data.num_workers=0",
                 f"hydra.run.dir={out}", *TINY], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "finetune summary" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"] == 2 and "test_acc" in m and "val_top5" not in m  # 3 classes: no top-5
    assert m["trainable_params"] == m["total_params"]
    assert (out / "config.yaml").exists() and (out / ".hydra" / "config.yaml").exists()
    rows = list(csv.DictReader((out / "epochs.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(r["val/acc"] for r in rows)
    assert (out / "checkpoints" / "best.ckpt").exists() and (out / "checkpoints" / "last.ckpt").exists()
    assert m["evaluated"] == "last"


@pytest.mark.parametrize(
    "args, message",
    [
        (["data=folder", "data.root=/definitely/not/here"], "error: data root '/definitely/not/here' does not exist"),
        (["data=folder"], "error: data.root is not set"),
        (["backbone.name=resnet181"], "error: unknown backbone 'resnet181'; did you mean"),
        (["backbone.pretrained=true", "backbone.weights=/no/such/w.safetensors"], "error: weights file"),
        (["freeze=top_stages", "freeze.n=two"], "error: freeze.n: expected an int, got 'two'"),
        (["trainer.max_epochs=1.5"], "error: trainer.max_epochs: expected an int, got '1.5'"),
        (["+trainer.max_epoch=1"], "error: trainer: "),
        (["evaluate=worst"], "error: evaluate must be one of last, best, got 'worst'"),
        (["optim.optimizer._target_=torch.optim.Nope"], "error: optim.optimizer: "),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path: Path, cli, args: list[str], message: str) -> None:
    r = cli([*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(message), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_one_class_folder_is_refused(tmp_path: Path, make_folder) -> None:
    root = make_folder(classes=1, per_class=4)
    r = run_cli([*TINY, "data=folder", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2 and "need at least 2" in r.stderr.strip().splitlines()[-1]


def test_unreadable_weights_file_via_cli(tmp_path: Path, cli) -> None:
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"garbage")
    r = cli([*TINY, "backbone.pretrained=true", f"backbone.weights={bad}", f"hydra.run.dir={tmp_path / 'run'}"],
                cwd=tmp_path)
    assert r.returncode == 2 and "cannot read weights file" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["+recipe=nope"], "Could not find 'recipe/nope'"),
        (["freeze=bogus"], "Could not find 'freeze/bogus'"),
        (["optim.lrr=1"], "Key 'lrr' not in 'OptimConfig'"),
        (["freeze.n=1"], "Key 'n' not in 'NoFreeze'"),  # freeze=none has no n
    ],
)
def test_hydra_errors_are_one_line_with_exit_2(tmp_path: Path, cli, args: list[str], message: str) -> None:
    r = cli([*args, "--cfg", "job"], cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


class WreckLastEpoch(__import__("pytorch_lightning").Callback):
    """Zeroes the head after every step of the last epoch: val accuracy falls to chance after peaking earlier."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        import torch

        if trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                for p in pl_module.head.parameters():
                    p.zero_()


def test_last_checkpoint_holds_the_last_epoch_even_when_val_acc_peaked_earlier(tmp_path: Path) -> None:
    """Lightning's save_last=True beside a monitor writes last.ckpt only when the monitor improves."""
    import torch

    cfg = compose([*TINY, "trainer.max_epochs=3", "data.image_size=16", "optim.lr=0.03", "+trainer.limit_train_batches=10",
                   "+callbacks.wreck._target_=test_cli.WreckLastEpoch"])
    m = train(cfg, tmp_path)
    accs = [float(r["val/acc"]) for r in csv.DictReader((tmp_path / "epochs.csv").open())]
    assert max(accs[:-1]) > accs[-1] == m["val_acc"]  # the peak came before the last epoch
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == m["epochs"] - 1 == 2 and best["epoch"] < last["epoch"]
    # last.ckpt holds the weights metrics.json scored: the wrecked head, not the best epoch's.
    head = {k: v for k, v in last["state_dict"].items() if k.startswith("head.")}
    assert head and all(not v.any() for v in head.values())
    assert any(v.any() for k, v in best["state_dict"].items() if k.startswith("head."))


def test_epochs_csv_has_the_learning_rate_of_every_group(tmp_path: Path) -> None:
    cfg = compose([*TINY, "freeze=lp_ft", "freeze.unfreeze_at_epoch=1", "data.image_size=16"])
    train(cfg, tmp_path)
    rows = list(csv.DictReader((tmp_path / "epochs.csv").open()))
    lr_cols = [k for k in rows[0] if k.startswith("lr-")]
    assert "lr-AdamW/head" in lr_cols and any(k.startswith("lr-AdamW/stage") for k in lr_cols)
    stage = next(k for k in lr_cols if k.startswith("lr-AdamW/stage"))
    assert float(rows[0][stage]) == 0.0 and float(rows[1][stage]) > 0.0  # frozen in epoch 0, trains from epoch 1
    logged = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "lr-AdamW/head" in logged  # the CSV logger got them too (LearningRateMonitor)
