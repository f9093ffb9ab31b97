"""`compile=...`: torch.compile of the backbone, in place, with checkpoints unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune import FineTuneModule
from finetune.config import compose
from finetune.errors import FineTuneError
from finetune.train import train

TINY = ["backbone.name=test_efficientnet", "backbone.pretrained=false", "data.image_size=32",
        "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "augment=none", "seed=3",
        "freeze=lp_ft", "freeze.unfreeze_at_epoch=1",
        # A few batches: the check is that compiled and eager steps agree, not what they learn.
        "+trainer.limit_train_batches=6", "+trainer.limit_val_batches=3", "+trainer.limit_test_batches=3"]


@pytest.mark.slow  # dynamo traces forward and backward twice (before and after the unfreeze): minutes on a CPU
def test_compiled_run_matches_the_eager_run_and_saves_the_same_keys(tmp_path: Path) -> None:
    # aot_eager traces forward and backward like inductor does, without the C++ build; lp_ft
    # unfreezes the backbone after epoch 0, so the compiled graph must follow requires_grad.
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = train(compose([*TINY, "compile=aot_eager"]), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the backbone
    eager = train(compose([*TINY, "compile=false"]), tmp_path / "eager")
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)
    states = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
              for run in ("compiled", "eager")]
    assert list(states[0]["state_dict"]) == list(states[1]["state_dict"])
    assert not any("_orig_mod" in k for k in states[0]["state_dict"])
    assert "compile" not in states[0]["hyper_parameters"]  # a loaded module runs uncompiled
    for name, value in states[1]["state_dict"].items():
        torch.testing.assert_close(states[0]["state_dict"][name], value, rtol=1e-3, atol=1e-4)


def test_compile_setting_is_checked() -> None:
    module = FineTuneModule("test_efficientnet", pretrained=False, compile={"backend": "eager"})
    assert module.compile_kwargs == {"backend": "eager"} and module.backbone._compiled_call_impl is not None
    assert FineTuneModule("test_efficientnet", pretrained=False).backbone._compiled_call_impl is None
    with pytest.raises(FineTuneError, match="compile must be"):
        FineTuneModule("test_efficientnet", pretrained=False, compile=3)  # type: ignore[arg-type]
