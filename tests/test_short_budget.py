"""A short budget steps a full fine-tuning recipe down to fewer trained layers (finetune/short_budget.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from finetune.advise import advise, follow_advice
from finetune.config import compose
from finetune.errors import FineTuneError
from finetune.short_budget import epochs_affordable, short_budget_choice
from finetune.step_rates import StepRates

# 100 training, 50 val, 20 test images; at 100 training and 200 evaluation images/s an epoch takes 1.25 s,
# the test 0.1 s.
DATA = SimpleNamespace(splits={"train": [0] * 100, "val": [0] * 50, "test": [0] * 20})
RATES = StepRates(train=100, eval=200)


def test_epochs_afforded_count_training_and_validation_at_their_own_rates_and_the_test_once() -> None:
    assert epochs_affordable(DATA, RATES, seconds_left=10) == pytest.approx((10 - 0.1) / 1.25)
    assert epochs_affordable(DATA, RATES, seconds_left=0.05) == 0.0  # not even the test pass
    assert epochs_affordable(DATA, RATES.scaled(2), seconds_left=10) == pytest.approx((10 - 0.05) / 0.625)
    # Validation ten times as dear as training (10 training images, 0.1 s; 100 val, 0.5 s): a budgeted run validates
    # every ceil(0.5 / (0.25 x 0.1)) = 20 epochs (finetune.budget.val_interval), so an epoch costs 0.125 s, not 0.6.
    val_heavy = SimpleNamespace(splits={"train": [0] * 10, "val": [0] * 100, "test": [0] * 20})
    assert epochs_affordable(val_heavy, RATES, seconds_left=10) == pytest.approx((10 - 0.1) / 0.125)


def test_full_fine_tuning_steps_down_where_the_budget_cuts_its_schedule_to_few_steps() -> None:
    recipe = compose(["+recipe=small_dissimilar"])  # 25 epochs of freeze=none
    a = compose(["advise.min_schedule_multiple=1"]).advise
    short = short_budget_choice(recipe, DATA, RATES, seconds_left=8, advise=a)  # 6.3 of 25 epochs
    assert short["step_down"] == "top_stages" and short["epochs_affordable"] == 6.3 and short["recipe_epochs"] == 25
    assert short["steps_affordable"] == 12 and short["images_per_s"] == {"train": 100, "eval": 200}  # 2 batches an epoch
    assert ("6.3 of small_dissimilar's 25 epochs, 12 steps (< advise.min_schedule_multiple=1 times the epochs and"
            in short["reason"])
    # Fewer than advise.linear_probe_below_steps (10): the head alone.
    tiny = short_budget_choice(recipe, DATA, RATES, seconds_left=4, advise=a)  # 3.1 epochs, 6 steps
    assert tiny["step_down"] == "head_only" and tiny["steps_affordable"] == 6
    assert "freeze=head_only trains, not none (< advise.linear_probe_below_steps=10" in tiny["reason"]
    never = compose(["advise.linear_probe_below_steps=null"]).advise
    assert short_budget_choice(recipe, DATA, RATES, seconds_left=4, advise=never)["step_down"] == "top_stages"
    # Most of the epochs, few steps: digits at 10 per class under a minute (14 of 25 epochs, 28 steps)
    most = short_budget_choice(recipe, DATA, RATES, seconds_left=17.6, advise=a)  # 14 epochs
    assert most["step_down"] == "top_stages" and most["steps_affordable"] == 28
    just_under = short_budget_choice(recipe, DATA, RATES, seconds_left=31.2, advise=a)  # 24.9 < 25
    assert just_under["step_down"] == "top_stages"
    whole = short_budget_choice(recipe, DATA, RATES, seconds_left=31.4, advise=a)  # 25.04: the recipe's own
    assert whole["step_down"] is None and "1 times the recipe's epochs): freeze=none trains" in whole["reason"]
    # By default full fine-tuning needs twice the recipe's epochs (or 500 steps): 25 epochs step down, 50 do not.
    default = compose([]).advise
    assert short_budget_choice(recipe, DATA, RATES, seconds_left=31.4, advise=default)["step_down"] == "top_stages"
    assert short_budget_choice(recipe, DATA, RATES, seconds_left=62.4, advise=default)["step_down"] == "top_stages"
    twice = short_budget_choice(recipe, DATA, RATES, seconds_left=62.6, advise=default)  # 50.0 epochs, 100 steps
    assert twice["step_down"] is None and "50.0 of small_dissimilar's 25 epochs, 100 steps (>= " \
        "advise.min_schedule_multiple=2 times the recipe's epochs): freeze=none trains" in twice["reason"]
    # Steps alone (null): however many epochs, under advise.min_full_steps (500) steps it steps down.
    steps_alone = compose(["advise.min_schedule_multiple=null"]).advise
    alone = short_budget_choice(recipe, DATA, RATES, seconds_left=62.6, advise=steps_alone)
    assert alone["step_down"] == "top_stages" and "50.0 of small_dissimilar's 25 epochs, 100 steps (< " \
        "advise.min_full_steps=500): freeze=top_stages" in alone["reason"]
    half = compose(["advise.min_schedule_multiple=0.5"]).advise
    assert short_budget_choice(recipe, DATA, RATES, 17.6, half)["step_down"] is None  # 14 >= 12.5
    # Batches of one: 3.12 epochs are 312 steps, enough for full fine-tuning where advise.min_full_steps is 200.
    many_steps = compose(["advise.min_full_steps=200"]).advise
    kept = short_budget_choice(recipe, DATA, RATES, seconds_left=4, advise=many_steps, batch_size=1)
    assert kept["step_down"] is None and kept["steps_affordable"] == 312
    assert "advise.min_full_steps=200" in kept["reason"]
    accumulated = short_budget_choice(recipe, DATA, RATES, 4, many_steps, batch_size=1, accumulate=2)
    assert accumulated["step_down"] == "top_stages"


def test_recipes_that_already_freeze_and_a_null_step_down_keep_their_strategy_unestimated() -> None:
    head_only = short_budget_choice(compose(["+recipe=small_similar"]), DATA, None, 1, compose([]).advise)
    assert head_only["step_down"] is None and head_only["recipe_freeze"] == "head_only"
    assert "epochs_affordable" not in head_only  # nothing to decide, so nothing was timed
    off = compose(["advise.short_budget_freeze=null"]).advise
    assert short_budget_choice(compose(["+recipe=small_dissimilar"]), DATA, None, 1, off)["step_down"] is None
    lora = compose(["advise.short_budget_freeze=lora"]).advise
    assert short_budget_choice(compose(["+recipe=large_dissimilar"]), DATA, RATES, 8, lora)["step_down"] == "lora"
    with pytest.raises(ValueError, match="needs the measured rates"):
        short_budget_choice(compose(["+recipe=small_dissimilar"]), DATA, None, 1, compose([]).advise)


@pytest.mark.parametrize("extra, message", [
    (["advise.min_schedule_multiple=-1"],
     r"advise.min_schedule_multiple must be 0 or more \(null: steps alone\), got -1"),
    (["advise.short_budget_freeze=nothing"], "advise.short_budget_freeze: unknown freeze strategy 'nothing'"),
    (["advise.linear_probe_below_steps=-1"], "advise.linear_probe_below_steps must be 0 or more"),
])
def test_bad_knobs_are_one_line(extra: list[str], message: str) -> None:
    with pytest.raises(FineTuneError, match=message):
        short_budget_choice(compose(["+recipe=small_dissimilar"]), DATA, RATES, 10, compose(extra).advise)


@pytest.fixture
def folder_overrides(make_folder: Callable[..., Path]) -> list[str]:
    # similar_below=0: every data set is dissimilar, so the advice picks a recipe that trains every layer.
    root = make_folder(classes=3, per_class=10, size=32)
    return ["data=folder", f"data.root={root}", "data.image_size=32", "backbone.name=test_resnet",
            "backbone.pretrained=false", "advise.candidates=[]",
            "advise.sample_size=24", "advise.similar_below=0"]


def test_auto_under_a_short_budget_trains_the_step_down_and_says_why(folder_overrides, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.advise as adv

    monkeypatch.setattr(adv, "_measuring_model", lambda cfg: (_tiny(), "test_resnet", "test"))
    # A hundredth of a second affords none of the 25 epochs at any speed this machine has.
    over = ["+recipe=auto", *folder_overrides, "budget=0.01", "advise.min_schedule_multiple=1",
            "advise.linear_probe_below_steps=null"]
    cfg, extra, _ = follow_advice(compose(over), over, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "advice.json").read_text())["budget_strategy"]
    assert cfg.recipe == "small_dissimilar" and cfg.freeze.name == "top_stages" == written["step_down"]
    assert extra["advised_freeze"] == "top_stages" and written["images_per_s"]["train"] > 0
    # The user's freeze= wins over the step-down; the advice still says what it would have done.
    mine = [*over, "freeze=none"]
    cfg, extra, _ = follow_advice(compose(mine), mine, tmp_path / "mine")
    assert cfg.freeze.name == "none" and "advised_freeze" not in extra
    # Multiple 0: any budget is enough; without a budget nothing is estimated.
    roomy = [*folder_overrides, "budget=0.01", "advise.min_schedule_multiple=0"]
    assert advise(compose(roomy))["budget_strategy"]["step_down"] is None
    assert "budget_strategy" not in advise(compose(folder_overrides))
    # By default, no step affordable at all: the head alone.
    assert advise(compose([*folder_overrides, "budget=0.01"]))["budget_strategy"]["step_down"] == "head_only"


def _tiny():
    import timm

    return timm.create_model("test_resnet", pretrained=False).eval()
