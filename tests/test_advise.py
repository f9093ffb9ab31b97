"""Advice from size and similarity, `python -m finetune.advise`, and `+recipe=auto` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from finetune.advise import advise, advise_or_fallback, recipe_overrides
from finetune.config import compose
from finetune.errors import FineTuneError
from finetune.train import train


FASHION = Path("/usr/share/datasets/fashion-mnist")
QUICK = ["advise.sample_size=64"]


def test_digits_are_small_and_dissimilar() -> None:
    a = advise(compose(QUICK))
    assert (a["recipe"], a["size"], a["similarity"]) == ("small_dissimilar", "small", "dissimilar")
    m = a["measurements"]
    assert m["train_images"] == 1257 and m["classes"] == 10 and m["per_class_min"] == 121
    assert m["measured_with"] == "tf_efficientnet_lite0" and m["bn_layers"] == 49 and m["sample_images"] == 64
    assert m["bn_divergence"] >= a["thresholds"]["similar_below"]
    assert len(m["bn_divergence_by_stage"]) >= 7 and "1257 training images" in a["reason"]


def test_photos_are_small_and_similar() -> None:
    a = advise(compose(["data=photos", *QUICK]))
    assert a["recipe"] == "small_similar"
    assert a["measurements"]["bn_divergence"] < a["thresholds"]["similar_below"]


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_is_large_and_dissimilar() -> None:
    a = advise(compose(["data=fashion_mnist", *QUICK]))
    assert a["recipe"] == "large_dissimilar" and a["measurements"]["train_images"] == 54000


def test_a_backbone_without_batchnorm_is_measured_with_the_reference_model(tmp_path: Path) -> None:
    import timm

    weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    a = advise(compose(["backbone.name=test_vit", f"backbone.weights={weights}", *QUICK]))
    assert a["measurements"]["measured_with"] == "tf_efficientnet_lite0"
    assert "no BatchNorm" in a["measurements"]["measured_with_why"]
    assert a["recipe"] == "small_dissimilar"


def test_too_few_images_is_an_error_unless_a_fallback_is_allowed(make_folder) -> None:
    root = make_folder(classes=2, per_class=5)
    cfg = compose(["data=folder", f"data.root={root}", "data.image_size=32"])
    with pytest.raises(FineTuneError, match="too few to measure"):
        advise(cfg)
    with pytest.raises(FineTuneError, match="advise.fallback"):
        advise_or_fallback(cfg)
    a = advise_or_fallback(compose(["data=folder", f"data.root={root}", "advise.fallback=small_similar"]))
    assert a["recipe"] == "small_similar" and "advise.fallback" in a["reason"]


def test_recipe_overrides_replace_only_the_recipe() -> None:
    assert recipe_overrides(["+recipe=auto", "data=photos", "trainer.max_epochs=3"], "small_similar") == [
        "data=photos", "trainer.max_epochs=3", "+recipe=small_similar"]


def test_advise_command_prints_json(tmp_path: Path, cli) -> None:
    r = cli(QUICK, tmp_path, module="finetune.advise")
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads(r.stdout)
    assert {"recipe", "size", "similarity", "reason", "measurements", "thresholds"} <= set(a)
    bad = cli(["data=folder", f"data.root={tmp_path}/nope"], tmp_path, module="finetune.advise")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: data root")


def test_auto_recipe_measures_then_trains_with_the_chosen_recipe(tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    r = cli(["+recipe=auto", "backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32",
                 "trainer.max_epochs=1", "trainer.enable_progress_bar=false", *QUICK, f"hydra.run.dir={out}"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    advice = json.loads((out / "advice.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    assert advice["recipe"] == "small_dissimilar" and "advice: small_dissimilar" in r.stdout
    assert m["recipe"] == "auto" and m["advised_recipe"] == "small_dissimilar" and m["epochs"] == 1
    run_cfg = OmegaConf.load(out / "config.yaml")
    # small_dissimilar's own choice (augment=medium, not the default light) and the user's override, both kept.
    assert run_cfg.augment.name == "medium" and "color_jitter" in run_cfg.augment.ops
    assert run_cfg.trainer.max_epochs == 1 and run_cfg.recipe == "small_dissimilar"
    assert "small_dissimilar" in r.stdout.split("finetune summary")[-1]  # the summary names the pick
    # train() itself never resolves auto: that happens before it (follow_advice / the CLI).
    with pytest.raises(FineTuneError, match="follow_advice"):
        train(compose(["+recipe=auto"]), tmp_path / "py")


def test_batchnorm_statistics_merged_over_batches_equal_one_pass() -> None:
    from finetune.similarity import _BNStats

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(24, 4, 8, 8) * 3 + 1.5
    whole = _BNStats(bn)
    with torch.no_grad():
        bn(x)
    whole.close()
    parts = _BNStats(bn)
    with torch.no_grad():
        for chunk in torch.split(x, [5, 11, 8]):
            bn(chunk)
    parts.close()
    n, mean, m2 = parts.stats[""]  # a bare BatchNorm module is named ""
    ref = x.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(mean, ref.mean(1))
    torch.testing.assert_close(m2 / n, ref.var(1, correction=0))
    assert parts.divergence() == pytest.approx(whole.divergence(), rel=1e-6)
