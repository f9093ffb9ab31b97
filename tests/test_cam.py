"""Grad-CAM (``finetune.evaluate ... cam=true``): overlays of the mistakes and a few correct images per class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image
from test_export import make_checkpoint
from finetune import cam as cam_mod
from finetune.cam import MAX_WRONG, grad_cams, select_images, target_layer
from finetune.errors import FineTuneError
from finetune.evaluate import EvaluateConfig, evaluate

CLASSES = ["class_0", "class_1", "class_2"]
SIZE = 64  # the checkpoint's input size (2 x 2 cells at ResNet's last stage); the 24 px images are resized first


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cam_images")
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c, name in enumerate(CLASSES):
            for i in range(5):
                write_image(base / split / name / f"{i}.png", rng, color=c)
    return base


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_evaluate_cam_writes_overlays_of_the_input_size_and_a_contact_sheet(root: Path, tmp_path: Path,
                                                                             backbone: str) -> None:
    data_config = {"image_size": SIZE, "crop_pct": 1.0, "interpolation": "bilinear"}
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", backbone, CLASSES, data_config)
    cfg = EvaluateConfig(ckpt=str(ckpt), cam=True, cam_per_class=2)
    result = evaluate(cfg, ["data=folder", f"data.root={root}", "data.num_workers=0"])
    cam_dir = tmp_path / "run" / "cam"
    assert result["cam"]["dir"] == str(cam_dir)
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text())["cam"] == result["cam"]

    confusion = np.asarray(result["confusion_matrix"])
    wrong = sorted((cam_dir / "wrong").glob("*.png"))
    assert len(wrong) == min(MAX_WRONG, int(confusion.sum() - np.trace(confusion))) == result["cam"]["misclassified"]
    for c, name in enumerate(CLASSES):  # up to 2 correct per class, as many as the class has
        drawn = list((cam_dir / "right").glob(f"*_{name}.png"))
        assert len(drawn) == min(2, int(confusion[c, c])), (name, drawn)
    files = wrong + sorted((cam_dir / "right").glob("*.png"))
    assert files, "nothing was drawn"
    for path in files:
        with Image.open(path) as img:
            assert img.size == (SIZE, SIZE) and img.mode == "RGB", path
    with Image.open(cam_dir / "contact_sheet.png") as sheet:
        assert sheet.width > 2 * SIZE and sheet.height > SIZE
    assert result["cam"]["contact_sheet"] == str(cam_dir / "contact_sheet.png")


@pytest.mark.parametrize("backbone, layer", [("test_resnet", "layer4"), ("test_efficientnet", "blocks.4"),
                                             ("test_vit", "blocks.5.norm1")])
def test_the_maps_come_from_the_last_stage_and_are_not_empty(backbone: str, layer: str) -> None:
    """A ViT read at its last block's output (class-token pooling) gives all-zero maps: this fails then."""
    from finetune.module import FineTuneModule

    torch.manual_seed(0)
    module = FineTuneModule(backbone=backbone, num_classes=3, pretrained=False).eval()
    assert target_layer(module.backbone)[1] == layer
    size = 128  # 4 x 4 cells at a convnet's last stage (reduction 32), 8 x 8 ViT patches
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    maps = grad_cams(module, x, [0, 1, 2, 0])
    assert maps.shape == (4, size, size)
    assert maps.min() >= 0 and maps.max() <= 1
    assert maps.reshape(4, -1).std(1).max() > 0.05  # a spatial map, not a constant


def test_a_frozen_backbone_still_gets_maps() -> None:
    from finetune.module import FineTuneModule

    torch.manual_seed(0)
    module = FineTuneModule(backbone="test_resnet", num_classes=3, pretrained=False, freeze="head_only").eval()
    assert not any(p.requires_grad for p in module.backbone.parameters())
    maps = grad_cams(module, torch.randn(2, 3, 128, 128), [0, 1])
    assert maps.reshape(2, -1).std(1).max() > 0.05


def test_selection_is_every_mistake_most_confident_first_then_the_best_correct_per_class() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.7, 0.3]])
    labels = torch.tensor([0, 0, 1, 1, 0, 0])
    chosen = select_images(probs, labels, per_class=1)
    assert [c.index for c in chosen] == [1, 2, 4, 0, 3]
    assert [c.wrong for c in chosen] == [True, True, True, False, False]
    assert chosen[0].pred == 1 and chosen[0].prob == pytest.approx(0.8)


def test_without_the_library_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = cam_mod.importlib.util.find_spec
    monkeypatch.setattr(cam_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytorch_grad_cam" else real(name, *a))
    with pytest.raises(FineTuneError, match=r"finetune\[explain\]"):
        cam_mod.write_cams(None, None, None, torch.zeros(1, 2), torch.zeros(1), ["a", "b"], tmp_path)
