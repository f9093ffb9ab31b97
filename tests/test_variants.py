"""+variant=NAME: one axis for strategies and the weight-space knobs, and +recipe=compare_all sweeping it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.config import compose
from finetune.strategies import STRATEGIES
from finetune.variants import VARIANTS, compared_variants

TINY = ["backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_sets_its_strategy_and_only_its_own_knob(name: str) -> None:
    strategy, settings = VARIANTS[name]
    if strategy not in STRATEGIES:
        pytest.skip(f"freeze={strategy} is not registered here")
    cfg = compose(["+variant=" + name])
    plain = compose([f"freeze={strategy}"])
    assert cfg.variant == name and cfg.freeze.name == strategy
    # Everything else is the plain strategy's config, changed only where the variant says
    # (wise_ft=true also turns on its callback, which the callbacks group derives from it).
    diff = {k for k in plain if OmegaConf.select(cfg, k) != OmegaConf.select(plain, k)}
    assert diff - {"callbacks"} == {"variant", *settings}
    assert ("callbacks" in diff) == (name == "wise_ft")


def test_a_variants_strategy_keeps_its_own_options_on_the_command_line() -> None:
    cfg = compose(["+variant=lp_ft", "freeze.unfreeze_at_epoch=3"])
    assert cfg.freeze.name == "lp_ft" and cfg.freeze.unfreeze_at_epoch == 3


def test_compare_all_sweeps_every_variant_whose_strategy_is_compared() -> None:
    names = compared_variants().split(",")
    assert {"none", "head_only", "bitfit", "norm", "lp_ft", "l2sp", "ema", "wise_ft"} <= set(names)
    assert ("lora" in names) == STRATEGIES["lora"].compared if "lora" in STRATEGIES else "lora" not in names
    assert compose(["+recipe=compare_all"]).recipe == "compare_all"


def test_a_variant_sweep_reports_one_row_per_variant_with_its_setting_applied(tmp_path: Path, cli) -> None:
    sweep = tmp_path / "sweep"
    r = cli(["--multirun", "+variant=head_only,l2sp", *TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    with (sweep / "comparison.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["variant"], row["status"]) for row in rows] == [("head_only", "ok"), ("l2sp", "ok")]
    trained = [OmegaConf.load(sweep / row["run"] / "config.yaml") for row in rows]
    assert [(c.freeze.name, c.optim.l2sp) for c in trained] == [("head_only", 0.0), ("none", 0.01)]
    metrics = [json.loads((sweep / row["run"] / "metrics.json").read_text()) for row in rows]
    assert metrics[0]["trainable_params"] < metrics[1]["trainable_params"]
