"""Eval preprocessing from timm's pretrained config: backbone_data_config without a model, and crop_mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import ImageDataModule
from finetune.data.transforms import eval_transform
from finetune.errors import FineTuneError



@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet50", "vit_small_patch16_224", "resnet50.tv_in1k",
                                  "test_resnet", "test_efficientnet", "test_vit"])
def test_backbone_data_config_equals_the_built_models(name: str) -> None:
    import timm

    from finetune.data import backbone_data_config

    model = timm.create_model(name, pretrained=False, num_classes=0)
    assert backbone_data_config(name) == timm.data.resolve_model_data_config(model)


def test_backbone_data_config_needs_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    from finetune.data import backbone_data_config

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("built a model"))
    assert backbone_data_config("resnet50.tv_in1k")["crop_pct"] == 0.875  # the tag's, not resnet50's default 0.95
    assert backbone_data_config("tf_efficientnetv2_m")["crop_mode"] == "squash"
    with pytest.raises(FineTuneError, match="unknown backbone 'resnet5000'"):
        backbone_data_config("resnet5000")
    with pytest.raises(FineTuneError, match=r"backbone 'resnet50.no_such_tag'.*Invalid pretrained tag"):
        backbone_data_config("resnet50.no_such_tag")


def _gradient(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    channels = [xx * 255 / (w - 1), yy * 255 / (h - 1), (xx + yy) * 255 / (w + h - 2)]
    return np.stack(channels, -1).round().astype(np.uint8)


def test_lite0_eval_pipeline_is_unchanged() -> None:
    """crop_mode center (lite0's) is the pipeline from before crop modes, byte for byte."""
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    dm = ImageDataModule("digits", backbone="tf_efficientnet_lite0", image_size=224)
    assert dm.data_config == {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                              "crop_pct": 0.875, "crop_mode": "center"}
    before = A.Compose([A.SmallestMaxSize(max_size=256, interpolation=cv2.INTER_CUBIC), A.CenterCrop(224, 224),
                        A.Normalize(mean=(0.5,) * 3, std=(0.5,) * 3, max_pixel_value=255.0), ToTensorV2()])
    image = np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    assert torch.equal(dm._eval_transform()(image=image)["image"], before(image=image)["image"])


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_crop_modes_follow_timm(crop_pct: float) -> None:
    """On a non-square image each mode gives timm's own eval transform of that mode (up to resampling)."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    image = _gradient(60, 100)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)
    for mode in ("center", "squash", "border"):
        ours = eval_transform(32, mean, std, crop_pct, "bilinear", crop_mode=mode)(image=image)["image"]
        assert ours.shape == (3, 32, 32)
        for timm_mode in ("center", "squash", "border"):
            theirs = transforms_imagenet_eval(32, crop_pct=crop_pct, crop_mode=timm_mode, interpolation="bilinear",
                                              mean=mean, std=std)(Image.fromarray(image))
            diff = float((ours - theirs).abs().max())
            assert diff < 0.05 if timm_mode == mode else diff > 0.5, (mode, timm_mode, diff)


def test_squash_keeps_the_whole_of_a_wide_image() -> None:
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :10] = 255  # a white bar at the left edge, outside any center crop of a wide image
    squash = eval_transform(32, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0, crop_mode="squash")(image=image)["image"]
    center = eval_transform(32, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0, crop_mode="center")(image=image)["image"]
    assert squash[:, :, :3].min() > 0.9 and squash[:, :, 6:].max() < -0.9  # 10/80 of 32 columns stay white
    assert center.max() < -0.9
    border = eval_transform(32, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0, crop_mode="border")(image=image)["image"]
    assert border[:, :8].abs().max() < 0.01 and border[:, 8:24, :3].min() > 0.9  # mean-color pad, bar kept
    with pytest.raises(FineTuneError, match="unknown crop_mode 'zoom'"):
        eval_transform(32, (0.5,) * 3, (0.5,) * 3, crop_mode="zoom")


def test_datamodule_uses_the_backbones_crop_mode() -> None:
    dm = ImageDataModule("digits", backbone="tf_efficientnetv2_m", image_size=32)
    assert dm.crop_mode == "squash" and dm.data_config["crop_mode"] == "squash"
    wide = _gradient(40, 80)
    expected = eval_transform(32, dm.mean, dm.std, dm.crop_pct, dm.interpolation, "squash")(image=wide)["image"]
    assert torch.equal(dm._eval_transform()(image=wide)["image"], expected)
