"""Cached backbone features: used only when exact, equal to the uncached run, invalidated by new weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune import FineTuneModule, ImageDataModule
from finetune.config import compose
from finetune.errors import FineTuneError
from finetune.features import FeatureDataModule, resolve_cache_features
from finetune.cli import run_job
from finetune.train import train

TINY = ["backbone.name=test_efficientnet", "backbone.pretrained=false", "data.image_size=32",
        "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "freeze=head_only"]


def test_cache_is_used_only_when_the_backbone_is_frozen_and_train_images_are_not_augmented() -> None:
    dm_none = ImageDataModule("digits", image_size=32, augment="none")
    dm_light = ImageDataModule("digits", image_size=32, augment="light")
    probe = FineTuneModule("test_efficientnet", pretrained=False, freeze="head_only")
    full = FineTuneModule("test_efficientnet", pretrained=False, freeze="none")
    lp_ft = FineTuneModule("test_efficientnet", pretrained=False, freeze={"name": "lp_ft", "unfreeze_at_epoch": 1})
    bn = FineTuneModule("test_efficientnet", pretrained=False, freeze={"name": "head_only", "train_bn": True})
    assert resolve_cache_features("auto", probe, dm_none)
    for module, dm in ((probe, dm_light), (full, dm_none), (lp_ft, dm_none), (bn, dm_none)):
        assert not resolve_cache_features("auto", module, dm)
        with pytest.raises(FineTuneError, match="cache_features=true is not possible"):
            resolve_cache_features(True, module, dm)
    assert not resolve_cache_features(False, probe, dm_none)
    with pytest.raises(FineTuneError, match="cache_features must be"):
        resolve_cache_features("sometimes", probe, dm_none)


def test_cached_run_equals_uncached_run(tmp_path: Path) -> None:
    cached = train(compose([*TINY, "augment=none", "cache_features=auto"]), tmp_path / "cached")
    plain = train(compose([*TINY, "augment=none", "cache_features=false"]), tmp_path / "plain")
    assert cached["cached_features"] and not plain["cached_features"]
    for key in ("val_acc", "test_acc"):
        assert cached[key] == pytest.approx(plain[key], abs=1 / 360 + 1e-9), key
    assert cached["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)
    heads = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
             for run in ("cached", "plain")]
    head_keys = [k for k in heads[0] if k.startswith("head.")]
    assert head_keys
    for name in head_keys:
        torch.testing.assert_close(heads[0][name], heads[1][name], rtol=1e-4, atol=1e-5)
    # The backbone in the checkpoint is the untouched one: the cache never changed it.
    backbone_keys = [k for k in heads[0] if k.startswith("backbone.")]
    assert backbone_keys and all(torch.equal(heads[0][k], heads[1][k]) for k in backbone_keys)


def test_new_backbone_weights_invalidate_the_cache() -> None:
    dm = ImageDataModule("digits", image_size=32, augment="none", batch_size=256)
    module = FineTuneModule("test_efficientnet", pretrained=False, freeze="head_only", num_classes=10)
    feats = FeatureDataModule(dm, module)
    first = feats.dataset("val").tensors[0].clone()
    assert feats.dataset("val").tensors[0] is feats.dataset("val").tensors[0]  # served from the cache
    with torch.no_grad():
        next(module.backbone.parameters()).mul_(2.0)
    again = feats.dataset("val").tensors[0]
    assert again.shape == first.shape and not torch.allclose(again, first)
    with torch.no_grad():
        images, _ = next(iter(dm.val_dataloader()))
        module.eval()
        torch.testing.assert_close(module.backbone(images), again[: len(images)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [["freeze=none"], ["augment=none"]], ids=["full", "cached"])
def test_bf16_mixed_precision_trains_on_cpu(tmp_path: Path, extra: list[str]) -> None:
    m = train(compose([*TINY, "trainer.max_epochs=1", "trainer.precision=bf16-mixed", *extra]), tmp_path / "bf16")
    assert m["cached_features"] == (extra == ["augment=none"])
    assert m["precision"] == "bf16-mixed" and "precision_asked" not in m
    # The same run in float32: bf16 autocast must train and score the same model within its rounding.
    ref = train(compose([*TINY, "trainer.max_epochs=1", *extra]), tmp_path / "fp32")
    assert ref["precision"] == "32-true"
    assert m["val_loss"] == pytest.approx(ref["val_loss"], rel=0.05)
    assert m["val_acc"] == pytest.approx(ref["val_acc"], abs=0.05)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, 16-mixed is what Lightning trains with")
def test_fp16_asked_on_a_cpu_is_reported_as_what_lightning_trained_with(tmp_path: Path, capsys) -> None:
    m = train(compose([*TINY, "trainer.max_epochs=1", "trainer.precision=16-mixed", "augment=none"]), tmp_path)
    assert (m["precision"], m["precision_asked"]) == ("bf16-mixed", "16-mixed")
    assert "trainer.precision=16-mixed was asked; Lightning trained with bf16-mixed on cpu" in capsys.readouterr().out


def test_cached_features_keep_the_weighted_sampler() -> None:
    dm = ImageDataModule("digits", image_size=32, augment="none", sampler="weighted", seed=3)
    module = FineTuneModule("test_efficientnet", pretrained=False, freeze="head_only", num_classes=10)
    loader = FeatureDataModule(dm, module).train_dataloader()
    assert loader.sampler.weights is not None  # draws weighted by class, with replacement
    assert list(loader.sampler) == list(dm.train_dataloader().sampler)  # the same seeded draws
    drawn = torch.bincount(torch.as_tensor(dm.data.splits["train"].labels)[list(loader.sampler)], minlength=10)
    assert drawn.min() > 0.7 * drawn.float().mean()  # every class about equally often


PHOTOS = ["data=photos", "data.per_class=12", "data.image_size=64", "trainer.enable_progress_bar=false"]


def test_auto_trains_on_the_features_its_advice_measured(tmp_path: Path) -> None:
    overrides = ["+recipe=auto", *PHOTOS, "trainer.max_epochs=2"]
    m = run_job(overrides, tmp_path)
    assert m["advised_recipe"] == "small_similar" and m["cached_features"]
    assert m["features_reused"] == m["split_sizes"]["train"] == 30  # no train image ran through the backbone twice


@pytest.mark.parametrize("sample_size", [256, 20], ids=["whole-split", "part"])
def test_reused_features_equal_extracted_ones(sample_size: int) -> None:
    from finetune.advise import advise
    from finetune.builders import build_datamodule, build_module

    # One backbone: ranked candidates would hand back the chosen candidate's features (another model's).
    cfg = compose([*PHOTOS, "freeze=head_only", "augment=none", f"advise.sample_size={sample_size}", "advise.candidates=[]"])
    measured: list = []
    advise(cfg, measured)
    assert len(measured) == 1 and len(measured[0].indices) == min(sample_size, 30)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    reused = FeatureDataModule(dm, module, precomputed=measured)
    fresh = FeatureDataModule(build_datamodule(cfg), module)
    assert reused.dataset("train").tensors[0].shape == fresh.dataset("train").tensors[0].shape
    torch.testing.assert_close(reused.dataset("train").tensors[0], fresh.dataset("train").tensors[0],
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(reused.dataset("train").tensors[1], fresh.dataset("train").tensors[1])
    assert reused.reused_features == len(measured[0].indices) and fresh.reused_features == 0


def test_features_of_other_images_or_weights_are_not_reused() -> None:
    from finetune.advise import advise
    from finetune.builders import build_datamodule, build_module

    cfg = compose([*PHOTOS, "freeze=head_only", "augment=none", "advise.candidates=[]"])
    measured: list = []
    advise(cfg, measured)
    other_split = compose([*PHOTOS, "freeze=head_only", "augment=none", "advise.candidates=[]", "seed=7"])
    dm = build_datamodule(other_split)
    feats = FeatureDataModule(dm, build_module(cfg, dm), precomputed=measured)
    feats.dataset("train")
    assert feats.reused_features == 0
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    with torch.no_grad():
        next(module.backbone.parameters()).add_(0.01)
    feats = FeatureDataModule(dm, module, precomputed=measured)
    feats.dataset("train")
    assert feats.reused_features == 0
