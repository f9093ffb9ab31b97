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

# 100 training, 50 val, 20 test images: an epoch is 3 x 100 + 50 = 350 forward passes, the test pass 20.
DATA = SimpleNamespace(splits={"train": [0] * 100, "val": [0] * 50, "test": [0] * 20})


def test_epochs_afforded_count_three_passes_per_training_image_and_the_test_once() -> None:
    assert epochs_affordable(DATA, images_per_s=100, seconds_left=10) == pytest.approx((1000 - 20) / 350)
    assert epochs_affordable(DATA, images_per_s=100, seconds_left=0.1) == 0.0  # not even the test pass


def test_full_fine_tuning_steps_down_where_the_budget_cuts_its_schedule_to_few_steps() -> None:
    recipe, a = compose(["+recipe=small_dissimilar"]), compose([]).advise  # 25 epochs of freeze=none; share 1
    short = short_budget_choice(recipe, DATA, images_per_s=100, seconds_left=10, advise=a)  # 2.8 of 25 epochs
    assert short["step_down"] == "top_stages" and short["epochs_affordable"] == 2.8 and short["recipe_epochs"] == 25
    assert short["steps_affordable"] == 5  # 2 batches of 64 an epoch
    assert ("2.8 of small_dissimilar's 25 epochs, 5 steps (< advise.min_schedule_share=1 of the epochs and"
            in short["reason"])
    # Most of the epochs, few steps: digits at 10 per class under a minute (14 of 25 epochs, 28 steps)
    most = short_budget_choice(recipe, DATA, images_per_s=100, seconds_left=50, advise=a)  # 14.2 epochs
    assert most["step_down"] == "top_stages" and most["steps_affordable"] == 28
    just_under = short_budget_choice(recipe, DATA, images_per_s=100, seconds_left=87, advise=a)  # 24.8 < 25
    assert just_under["step_down"] == "top_stages"
    whole = short_budget_choice(recipe, DATA, images_per_s=100, seconds_left=90, advise=a)  # 25.7: the recipe's own
    assert whole["step_down"] is None and "the recipe's schedule): freeze=none trains" in whole["reason"]
    half = compose(["advise.min_schedule_share=0.5"]).advise
    assert short_budget_choice(recipe, DATA, 100, 50, half)["step_down"] is None  # 14.2 >= 12.5
    # Batches of one: 2.8 epochs are 280 steps, enough for full fine-tuning where advise.min_full_steps is 200.
    many_steps = compose(["advise.min_full_steps=200"]).advise
    kept = short_budget_choice(recipe, DATA, images_per_s=100, seconds_left=10, advise=many_steps, batch_size=1)
    assert kept["step_down"] is None and kept["steps_affordable"] == 280 and "advise.min_full_steps=200" in kept["reason"]
    assert short_budget_choice(recipe, DATA, 100, 10, many_steps, batch_size=1, accumulate=2)["step_down"] == "top_stages"


def test_recipes_that_already_freeze_and_a_null_step_down_keep_their_strategy() -> None:
    head_only = short_budget_choice(compose(["+recipe=small_similar"]), DATA, 100, 1, compose([]).advise)
    assert head_only["step_down"] is None and head_only["recipe_freeze"] == "head_only"
    off = compose(["advise.short_budget_freeze=null"]).advise
    assert short_budget_choice(compose(["+recipe=small_dissimilar"]), DATA, 100, 1, off)["step_down"] is None
    lora = compose(["advise.short_budget_freeze=lora"]).advise
    assert short_budget_choice(compose(["+recipe=large_dissimilar"]), DATA, 100, 1, lora)["step_down"] == "lora"


@pytest.mark.parametrize("extra, message", [
    (["advise.min_schedule_share=1.5"], "advise.min_schedule_share must be between 0 and 1, got 1.5"),
    (["advise.short_budget_freeze=nothing"], "advise.short_budget_freeze: unknown freeze strategy 'nothing'"),
])
def test_bad_knobs_are_one_line(extra: list[str], message: str) -> None:
    with pytest.raises(FineTuneError, match=message):
        short_budget_choice(compose(["+recipe=small_dissimilar"]), DATA, 100, 10, compose(extra).advise)


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
    over = ["+recipe=auto", *folder_overrides, "budget=0.01", "advise.min_schedule_share=1"]
    cfg, extra, _ = follow_advice(compose(over), over, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "advice.json").read_text())["budget_strategy"]
    assert cfg.recipe == "small_dissimilar" and cfg.freeze.name == "top_stages" == written["step_down"]
    assert extra["advised_freeze"] == "top_stages" and written["images_per_s"] > 0
    # The user's freeze= wins over the step-down; the advice still says what it would have done.
    mine = [*over, "freeze=none"]
    cfg, extra, _ = follow_advice(compose(mine), mine, tmp_path / "mine")
    assert cfg.freeze.name == "none" and "advised_freeze" not in extra
    # Share 0: any budget is enough; without a budget nothing is estimated.
    roomy = [*folder_overrides, "budget=0.01", "advise.min_schedule_share=0"]
    assert advise(compose(roomy))["budget_strategy"]["step_down"] is None
    assert "budget_strategy" not in advise(compose(folder_overrides))


def _tiny():
    import timm

    return timm.create_model("test_resnet", pretrained=False).eval()
