"""``finetune.export``: ONNX and TorchScript files that give the checkpoint's probabilities, run without us.

The ONNX model is run by docs/deploy.md's snippet itself, in a process where ``finetune`` and ``torch``
cannot be imported, on image files preprocessed from ``preprocessing.json`` alone; its probabilities are
compared with ``finetune.predict``'s on the same files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import export as export_mod
from finetune.checkpoints import load_checkpoint, resolve_preprocessing
from finetune.export import ExportConfig, export, export_module, main
from finetune.predict import image_probabilities

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")  # our own loads
DOC = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"
# A crop that resizes (short side 32 / 0.8 = 40), crops, and normalizes per channel.
DATA_CONFIG = {"image_size": 32, "crop_pct": 0.8, "interpolation": "bicubic", "crop_mode": "center",
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def make_checkpoint(path: Path, backbone: str, names: list[str], data_config: dict, freeze: str | dict = "none",
                    edit: Any = None) -> Path:
    """A finetune checkpoint of an untrained tiny model with ``names`` and the run's preprocessing ``data_config``
    (``edit``: called on the module before it is saved)."""
    import pytorch_lightning as pl

    from finetune.module import FineTuneModule

    torch.manual_seed(0)
    module = FineTuneModule(backbone=backbone, num_classes=len(names), pretrained=False, class_names=names,
                            freeze=freeze)
    module.hparams["data_config"] = dict(data_config)
    if edit is not None:
        edit(module)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test_resnet checkpoint in a run directory (RUN/checkpoints/last.ckpt), 4 named classes."""
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "last.ckpt"
    return make_checkpoint(path, "test_resnet", ["ant", "bee", "cat", "dog"], DATA_CONFIG)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Image files of several shapes and formats: wide, tall, smaller than the crop, JPEG, grayscale."""
    base = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w, ext, mode) in enumerate([(30, 48, "png", "RGB"), (61, 37, "png", "RGB"), (20, 20, "png", "RGB"),
                                           (80, 64, "jpg", "RGB"), (45, 45, "png", "L"), (33, 90, "jpg", "RGB")]):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 40.0 * i)], -1)
        arr = np.clip(smooth + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        path = base / f"img{i}.{ext}"
        Image.fromarray(arr).convert(mode).save(path)
        out.append(path)
    return out


def _reference(ckpt: Path, paths: list[Path]) -> np.ndarray:
    """``finetune.predict``'s probabilities of ``paths`` (the package's own preprocessing and inference)."""
    module, raw = load_checkpoint(ckpt)
    readable, probs, _ = image_probabilities(module, paths, resolve_preprocessing(module, raw, ckpt))
    assert readable == paths
    return probs.numpy()


def _snippet() -> str:
    text = DOC.read_text()
    marker = text.index("<!-- deploy-snippet")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)  # type: ignore[union-attr]


# Neither finetune nor torch can be imported by the snippet: it runs as on a machine without them.
_BLOCK = "import sys\nfor _name in ('finetune', 'torch', 'timm', 'albumentations'):\n    sys.modules[_name] = None\n"
_SAVE = "\nnp.save(__import__('os').environ['PROBS_OUT'], probs)\n"


def _run_snippet(folder: Path, paths: list[Path], out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + _snippet() + _SAVE, str(folder), *map(str, paths)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PROBS_OUT": str(out)},
    )


def test_the_docs_onnx_snippet_without_finetune_or_torch_gives_predicts_probabilities(
        ckpt: Path, images: list[Path], tmp_path: Path) -> None:
    result = export(ExportConfig(ckpt=str(ckpt), format="onnx"))
    folder = ckpt.parent.parent / "export"  # the default: beside the checkpoint's run directory
    assert result.model == folder / "model.onnx" and result.max_abs_diff <= 1e-4
    spec = json.loads((folder / "preprocessing.json").read_text())
    assert spec["input_size"] == [3, 32, 32] and spec["crop_pct"] == 0.8 and spec["mean"] == DATA_CONFIG["mean"]
    assert spec["class_names"] == ["ant", "bee", "cat", "dog"] and spec["model"] == "model.onnx"

    r = _run_snippet(folder, images, tmp_path / "probs.npy")
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = np.load(tmp_path / "probs.npy"), _reference(ckpt, images)
    assert got.shape == (len(images), 4)
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()
    # The snippet printed one line per image with the checkpoint's class name of its top-1.
    lines = r.stdout.strip().splitlines()
    assert [ln.split("\t")[1] for ln in lines] == [spec["class_names"][i] for i in want.argmax(1)]


class _TorchScriptSession:
    """onnxruntime's ``InferenceSession`` as the snippet uses it, running a TorchScript file."""

    def __init__(self, path: str, providers: list[str] | None = None) -> None:
        self.model = torch.jit.load(path)

    def run(self, outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feeds.values()
        with torch.no_grad():  # traced on a batch of 2, run on 6
            return [self.model(torch.from_numpy(x)).numpy()]


def test_torchscript_gives_predicts_probabilities(ckpt: Path, images: list[Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    export(ExportConfig(ckpt=str(ckpt), format="torchscript", out=str(tmp_path / "ts")))
    assert json.loads((tmp_path / "ts" / "preprocessing.json").read_text())["model"] == "model.pt"
    # The doc's snippet as it is, its onnxruntime session running model.pt.
    monkeypatch.setitem(sys.modules, "onnxruntime", type(sys)("onnxruntime"))
    sys.modules["onnxruntime"].InferenceSession = _TorchScriptSession  # type: ignore[attr-defined]
    monkeypatch.setattr(sys, "argv", ["classify.py", str(tmp_path / "ts"), *map(str, images)])
    namespace: dict = {"__name__": "classify"}
    exec(_snippet(), namespace)
    got, want = namespace["probs"], _reference(ckpt, images)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("fmt, dynamo", [("onnx", True), ("onnx", False), ("torchscript", True)])
def test_the_temperature_is_folded_into_the_exported_probabilities(ckpt: Path, tmp_path: Path, fmt: str,
                                                                   dynamo: bool) -> None:
    module, raw = load_checkpoint(ckpt)
    module.temperature = 3.0
    prep = resolve_preprocessing(module, raw, ckpt)
    result = export_module(module, prep, tmp_path, fmt, dynamo)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = module(x)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(result.model), providers=["CPUExecutionProvider"])
        assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch axis
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    else:
        got = torch.jit.load(str(result.model))(x)
    assert torch.allclose(got, (logits / 3.0).softmax(-1), atol=1e-5)
    assert (got - logits.softmax(-1)).abs().max() > 1e-3  # T changes them: the check above is not vacuous
    assert json.loads(result.preprocessing.read_text())["temperature"] == 3.0


def _train_adapters(module: Any) -> None:
    with torch.no_grad():  # peft starts lora_B at zero (adapters that change nothing): as if trained
        for name, p in module.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_a_lora_checkpoint_exports_its_merged_weights(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", "test_vit", ["a", "b", "c"], DATA_CONFIG,
                           freeze={"name": "lora"}, edit=_train_adapters)
    result = export(ExportConfig(ckpt=str(ckpt)))
    assert result.lora_layers_merged > 0
    names = [t.name for t in onnx.load(str(result.model)).graph.initializer]
    assert not [n for n in names if "lora" in n.lower()] and any("qkv" in n for n in names)

    module, _ = load_checkpoint(ckpt)  # the adapters, unmerged: the exported file must give its numbers
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = module(x).softmax(-1)
        for name, p in module.backbone.named_parameters():
            if "lora_B" in name:
                p.zero_()
        without_adapters = module(x).softmax(-1)
    got = torch.from_numpy(ort.InferenceSession(str(result.model)).run(None, {"image": x.numpy()})[0])
    assert (got - want).abs().max() < 1e-4
    assert (want - without_adapters).abs().max() > 1e-3  # the adapters matter: the merge is not vacuous


def test_a_model_that_fails_the_parity_check_is_not_written(ckpt: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.errors import FineTuneError

    monkeypatch.setattr(export_mod, "TOLERANCE", -1.0)  # any difference, even 0, fails
    module, raw = load_checkpoint(ckpt)
    with pytest.raises(FineTuneError, match="differ from the checkpoint's"):
        export_module(module, resolve_preprocessing(module, raw, ckpt), tmp_path, "torchscript")
    assert list(tmp_path.iterdir()) == []


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def test_bad_input_is_one_error_line_exit_2(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.ckpt"
    err = _error([f"ckpt={missing}"], capsys)
    assert "does not exist" in err and str(missing) in err
    assert "unknown format 'tflite'" in _error([f"ckpt={ckpt}", "format=tflite"], capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = _error([f"ckpt={ckpt}", f"out={blocker / 'sub'}"], capsys)
    assert "cannot write to out" in err and str(blocker / "sub") in err
    assert "ckpt is not set" in _error([], capsys)


def test_a_missing_extra_is_named(ckpt: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_mod.importlib.util.find_spec
    monkeypatch.setattr(export_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    err = _error([f"ckpt={ckpt}"], capsys)
    assert "onnxruntime" in err and "finetune[export]" in err
