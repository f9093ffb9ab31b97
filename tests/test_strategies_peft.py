"""Parameter-efficient strategies: bitfit, norm, lora (peft): what trains, checkpoints, merging, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune import FineTuneModule
from finetune.errors import FineTuneError
from finetune.lora import merge_adapters
from finetune.strategies import get_strategy

pytest.importorskip("peft")

VIT_BLOCKS = 6  # test_vit's depth


def _module(backbone: str, freeze, **kw) -> FineTuneModule:
    return FineTuneModule(backbone, num_classes=3, pretrained=False, freeze=freeze, **kw)


def _trainable(m: FineTuneModule) -> set[str]:
    return {n for n, p in m.backbone.named_parameters() if p.requires_grad}


def _head_trains(m: FineTuneModule) -> bool:
    return all(p.requires_grad for p in m.head.parameters())


@pytest.mark.parametrize("backbone", ["test_vit", "test_efficientnet"])
def test_bitfit_trains_exactly_the_biases_and_the_head(backbone: str) -> None:
    m = _module(backbone, "bitfit")
    biases = {f"{mn}.bias" if mn else "bias" for mn, mod in m.backbone.named_modules()
              if isinstance(getattr(mod, "bias", None), nn.Parameter)}
    assert _trainable(m) == biases and _head_trains(m)
    assert len(biases) > 10


@pytest.mark.parametrize("backbone, norm", [("test_vit", nn.LayerNorm), ("test_efficientnet", nn.BatchNorm2d)])
def test_norm_trains_exactly_the_norm_affine_parameters_and_the_head(backbone: str, norm: type) -> None:
    m = _module(backbone, "norm")
    expected = {f"{mn}.{pn}" for mn, mod in m.backbone.named_modules() if isinstance(mod, norm)
                for pn in ("weight", "bias")}
    assert _trainable(m) == expected and _head_trains(m)
    assert len(expected) > 10


def test_lora_on_vit_adapts_the_fused_qkv_proj_and_mlp() -> None:
    m = _module("test_vit", "lora")
    expected = {f"blocks.{i}.{layer}.lora_{ab}.default.weight" for i in range(VIT_BLOCKS)
                for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2") for ab in "AB"}
    assert _trainable(m) == expected and _head_trains(m)
    # r * (in + out) per adapted linear: the count peft's A (r x in) and B (out x r) hold.
    plain = _module("test_vit", "none").backbone
    linears = [mod for mod in plain.modules() if isinstance(mod, nn.Linear)]
    head = sum(p.numel() for p in m.head.parameters())
    assert m.trainable_params() == head + sum(8 * (lin.in_features + lin.out_features) for lin in linears)


def test_lora_on_efficientnet_adapts_only_the_pointwise_convolutions() -> None:
    m = _module("test_efficientnet", "lora")
    adapted = {n.split(".lora_")[0] for n in _trainable(m)}
    plain = _module("test_efficientnet", "none").backbone
    pointwise = {n for n, mod in plain.named_modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1)}
    assert adapted == pointwise
    assert {"blocks.3.0.conv_pw", "blocks.3.0.conv_pwl", "conv_head"} <= adapted
    assert "blocks.3.0.conv_dw" not in adapted and "conv_stem" not in adapted
    assert _head_trains(m)


def test_lora_target_modules_and_top_stages() -> None:
    m = _module("test_vit", {"name": "lora", "target_modules": ["qkv"], "n": 1, "r": 2})
    assert _trainable(m) == {f"blocks.{VIT_BLOCKS - 1}.attn.qkv.lora_{ab}.default.weight" for ab in "AB"}
    assert m.backbone.blocks[VIT_BLOCKS - 1].attn.qkv.lora_A["default"].weight.shape[0] == 2


def test_unfreeze_at_epoch_probes_first_then_trains_the_kind() -> None:
    m = _module("test_vit", {"name": "bitfit", "unfreeze_at_epoch": 2})
    assert m.strategy.is_dynamic
    assert _trainable(m) == set()
    m.apply_freeze(2)
    assert _trainable(m) and all(n.endswith(".bias") for n in _trainable(m))


def _images(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3), batch_size=4)


def _fit(m: FineTuneModule, epochs: int = 1, ckpt: str | None = None, save_to: Path | None = None) -> pl.Trainer:
    every_epoch = [pl.callbacks.ModelCheckpoint(save_to, save_top_k=-1)] if save_to else []
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=bool(save_to),
                         callbacks=every_epoch, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, _images(), ckpt_path=ckpt)
    return trainer


@pytest.mark.parametrize("backbone", ["test_vit", "test_efficientnet"])
def test_lora_checkpoint_round_trip_and_merge(backbone: str, tmp_path: Path) -> None:
    pl.seed_everything(0)
    m = _module(backbone, {"name": "lora", "lora_alpha": 16})
    _fit(m).save_checkpoint(tmp_path / "lora.ckpt")
    assert any(p.abs().sum() > 0 for n, p in m.backbone.named_parameters() if "lora_B" in n)  # adapters trained

    loaded = FineTuneModule.load_from_checkpoint(tmp_path / "lora.ckpt").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = m.eval()(x)
        assert torch.equal(loaded(x), expected)  # adapters and the new head both came back
        base = {n: p.clone() for n, p in loaded.backbone.named_parameters() if ".base_layer." in n}
        assert merge_adapters(loaded)
        merged = loaded(x)
    assert torch.allclose(merged, expected, atol=1e-5, rtol=1e-4)
    names = {n for n, _ in loaded.backbone.named_parameters()}
    assert names == {n for n, _ in _module(backbone, "none").backbone.named_parameters()}  # the plain timm names
    changed = [n for n, p in base.items() if not torch.equal(p, loaded.backbone.get_parameter(n.replace(".base_layer", "")))]
    assert changed  # the adapters' update went into the weights
    assert loaded.hparams["freeze"]["name"] == "none" and loaded.hparams["lora_merged"]["lora_alpha"] == 16
    assert not merge_adapters(loaded)  # nothing left to merge


def test_lora_resume_continues_identically(tmp_path: Path) -> None:
    pl.seed_everything(0)
    straight = _module("test_vit", "lora")
    _fit(straight, epochs=2, save_to=tmp_path)
    resumed = _module("test_vit", "lora")  # other random adapters and head: the checkpoint must restore them
    _fit(resumed, epochs=2, ckpt=str(tmp_path / "epoch=0-step=2.ckpt"))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("spec, message", [
    ({"name": "lora", "r": 0}, "freeze.r must be >= 1, got 0"),
    ({"name": "lora", "lora_dropout": 1.0}, "freeze.lora_dropout must be in [0, 1), got 1.0"),
    ({"name": "lora", "target_modules": []}, "freeze.target_modules is empty; null adapts every linear and 1x1 conv"),
    ({"name": "bitfit", "n": 0}, "freeze.n must be >= 1 or null (every stage), got 0"),
    ({"name": "norm", "unfreeze_at_epoch": -1}, "freeze.unfreeze_at_epoch must be >= 0, got -1"),
])
def test_bad_values_are_one_line_errors(spec: dict, message: str) -> None:
    with pytest.raises(FineTuneError) as e:
        get_strategy(spec)
    assert str(e.value) == message


def test_gradual_is_refused_with_lora() -> None:
    with pytest.raises(FineTuneError, match=r"^freeze=lora has no option\(s\) \['every_n_epochs'\]"):
        get_strategy({"name": "lora", "every_n_epochs": 1})


@pytest.mark.parametrize("targets, message", [
    (["nope"], "freeze.target_modules: 'nope' names no module of the backbone; it has e.g. fc1, fc2, proj, qkv"),
    (["norm1"], "freeze=lora: Target module"),  # a LayerNorm: peft's own refusal, first line only
])
def test_lora_targets_it_cannot_adapt_are_one_line_errors(targets: list[str], message: str) -> None:
    with pytest.raises(FineTuneError) as e:
        _module("test_vit", {"name": "lora", "target_modules": targets})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_stages_lists_the_new_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.stages import main

    main(["freeze=lora", "backbone.name=test_vit", "backbone.pretrained=false", "freeze.target_modules=[qkv]"])
    out = capsys.readouterr().out
    qkv = VIT_BLOCKS * 8 * (64 + 192)  # r * (in + out) of each block's fused qkv
    assert f"  lora r=8 target_modules=['qkv']: {qkv:,} (" in out
    assert "  bitfit: " in out and "  norm: " in out and "train (part)" in out
    with pytest.raises(SystemExit) as exc:
        main(["backbone.name=test_vit", "freeze.target_modules=[nope]"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: freeze.target_modules: 'nope' names no module")
