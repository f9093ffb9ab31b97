"""The LR finder under a budget: ``optim.find_share`` runs it where the plan has room, and auto records the LR."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from finetune.builders import check_run_config
from finetune.config import compose
from finetune.errors import FineTuneError

from test_budget import _fake_timings


def _cfg(root: Path, *extra: str):  # noqa: ANN202
    return compose(["backbone.name=test_resnet", "backbone.pretrained=false", "data=folder", f"data.root={root}",
                    "data.image_size=32", "data.batch_size=4", "data.val_fraction=0.25", "data.num_workers=0", "optim.lr=0.02",
                    "trainer.enable_progress_bar=false", "calibrate=false", "budget_replan=false", *extra])


def _head_lr(run_dir: Path) -> float:
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    return next(g["initial_lr"] for g in groups if g.get("name") == "head")


@pytest.mark.parametrize("batch_s,budget,share,runs", [(2.0, "1m", 0.1, False), (1.0, "2m", 0.9, True)])
def test_the_finder_runs_only_where_the_plan_has_room(
    make_folder: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    batch_s: float, budget: str, share: float, runs: bool,
) -> None:
    """Made-up step times: the finder's 100 steps cost 200 s (no room in 10% of 1m) or 100 s (room in 90% of 2m)."""
    import finetune.callbacks.budget_planner as bp
    from finetune.train import train

    monkeypatch.setattr(bp, "measure", _fake_timings(batch_s))
    monkeypatch.setattr(bp, "clock_elapsed", lambda: 5.0)
    root = make_folder(classes=2, per_class=8)
    metrics = train(_cfg(root, f"budget={budget}", f"optim.find_share={share}"), tmp_path / "run")
    found = metrics["lr_find"]
    if runs:
        assert found["lr"] > 0 and found["lr"] != 0.02 and "lr_find" in metrics["budget"]["reserved_s"]
        assert _head_lr(tmp_path / "run") == pytest.approx(found["lr"])
    else:
        assert found["lr"] is None and found["trained_lr"] == 0.02 and "more than 0.1 of the 1m budget" in found["skipped"]
        assert "lr_find" not in metrics["budget"]["reserved_s"]
        assert _head_lr(tmp_path / "run") == pytest.approx(0.02)


@pytest.mark.parametrize("extra,message", [
    (["optim.find_share=0.1"], "needs budget="),
    (["budget=5m", "optim.find_share=0.1", "optim.lr=find"], "needs budget="),
    (["budget=5m", "optim.find_share=1.5"], r"must be in \(0, 1\]"),
])
def test_bad_find_share_is_one_line(extra: list[str], message: str) -> None:
    with pytest.raises(FineTuneError, match=message):
        check_run_config(compose(extra))


def test_auto_with_a_budget_finds_the_lr_and_advice_json_records_it(
    make_folder: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    import finetune.callbacks.budget_planner as bp

    monkeypatch.setattr(bp, "measure", _fake_timings(1.0))
    monkeypatch.setattr(bp, "clock_elapsed", lambda: 5.0)
    root = make_folder(classes=2, per_class=16)
    out = tmp_path / "run"
    r = cli(["+recipe=auto", "backbone.name=test_resnet", "backbone.pretrained=false", "data=folder",
             f"data.root={root}", "data.image_size=32", "data.batch_size=8", "data.val_fraction=0.25", "data.num_workers=0", "advise.sample_size=24",
             "advise.lr_find_share=0.9", "budget=2m", "budget_replan=false", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    advice = json.loads((out / "advice.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert advice["lr"]["source"] == "lr_find" and advice["lr"]["lr"] == metrics["lr_find"]["lr"] > 0
    assert advice["recipe"] == metrics["advised_recipe"]  # the advice itself is still there
    # Without a budget auto keeps the recipe's LR (no finder: no slower than before).
    out2 = tmp_path / "run2"
    r = cli(["+recipe=auto", "backbone.name=test_resnet", "backbone.pretrained=false", "data=folder",
             f"data.root={root}", "data.image_size=32", "data.batch_size=8", "data.val_fraction=0.25", "data.num_workers=0", "advise.sample_size=24",
             "trainer.max_epochs=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={out2}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    advice = json.loads((out2 / "advice.json").read_text())
    assert "lr_find" not in json.loads((out2 / "metrics.json").read_text())
    assert advice["lr"]["source"] == "recipe" and advice["lr"]["lr"] == _config_lr(out2)


def _config_lr(run_dir: Path) -> float:
    from omegaconf import OmegaConf

    return float(OmegaConf.load(run_dir / "config.yaml").optim.lr)
