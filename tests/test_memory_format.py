"""``backbone.channels_last``: None chooses channels-last for convolutional backbones only."""

from __future__ import annotations

import pytest
import timm
import torch

from finetune.memory_format import is_convolutional, resolve_channels_last


@pytest.mark.parametrize(("name", "convolutional"),
                         [("test_resnet", True), ("test_efficientnet", True), ("test_vit", False)])
def test_a_patch_embedding_alone_is_not_convolutional(name: str, convolutional: bool) -> None:
    assert is_convolutional(timm.create_model(name, pretrained=False)) is convolutional


@pytest.mark.parametrize("setting", [True, False])
def test_a_given_setting_wins_over_the_network(setting: bool) -> None:
    for name in ("test_resnet", "test_vit"):
        assert resolve_channels_last(setting, timm.create_model(name, pretrained=False)) is setting


@pytest.mark.parametrize(("name", "setting", "expected"),
                         [("test_resnet", None, True), ("test_vit", None, False), ("test_resnet", False, False)])
def test_the_module_runs_in_the_resolved_format(name: str, setting: bool | None, expected: bool) -> None:
    from finetune.module import FineTuneModule

    module = FineTuneModule(name, num_classes=3, pretrained=False, channels_last=setting)
    assert module.channels_last is expected
    weights = [p for p in module.backbone.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) is expected for w in weights)
    # The setting, not its resolution, is saved: a checkpoint resolves it again on the same network.
    assert module.hparams["channels_last"] is setting
    x = torch.rand(2, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        out = module(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_both_formats_compute_the_same_logits() -> None:
    from finetune.module import FineTuneModule

    torch.manual_seed(0)
    a = FineTuneModule("test_efficientnet", num_classes=3, pretrained=False, channels_last=False).eval()
    b = FineTuneModule("test_efficientnet", num_classes=3, pretrained=False, channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)
