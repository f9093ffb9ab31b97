"""``python -m finetune.export ckpt=PATH [format=onnx|torchscript] [out=DIR]``: a model that runs without us.

Writes ``model.onnx`` (or ``model.pt``) and ``preprocessing.json`` into ``out`` (default:
``RUN/export`` for ``RUN/checkpoints/x.ckpt``, else ``export/`` beside the checkpoint). The model takes a
preprocessed float32 batch ``(N, 3, H, W)`` (any N) and returns class probabilities with the
checkpoint's temperature folded in: ``softmax(logits / T)``, the numbers ``finetune.predict``
gives. ``preprocessing.json`` says how to get from an image file to that batch, in timm's names
(``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``), with the class names.

Before a file is put in place it is run (onnxruntime, or ``torch.jit.load``) on a batch of one and
one of three, and its probabilities are compared with the checkpoint's; a model that differs by
more than :data:`TOLERANCE` is refused, not written.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import hydra
import torch
from hydra.core.config_store import ConfigStore
from torch import nn

from finetune.checkpoints import Preprocessing, class_names, load_checkpoint, output_dir_of, resolve_preprocessing
from finetune.command import CommandConfig, command_hydra, hold_errors, run_app
from finetune.errors import FineTuneError

__all__ = ["FORMATS", "TOLERANCE", "ExportConfig", "Exported", "Probabilities", "export", "export_module", "main"]

# format -> (file name, packages it needs beyond torch).
FORMATS = {"onnx": ("model.onnx", ("onnx", "onnxscript", "onnxruntime")), "torchscript": ("model.pt", ())}
# The largest difference of any probability between the exported model and the checkpoint that passes.
TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"


@dataclass
class ExportConfig(CommandConfig):
    """``python -m finetune.export`` arguments.

    Attributes:
        ckpt: the checkpoint (``outputs/DATE/TIME/checkpoints/last.ckpt``).
        format: ``onnx`` (onnxruntime, any language) or ``torchscript`` (libtorch; deprecated by PyTorch).
        out: the folder ``model.onnx``/``model.pt`` and ``preprocessing.json`` go to (None: ``RUN/export``,
            else ``export/`` beside the checkpoint).
        dynamo: ``torch.onnx.export``'s exporter: True, torch's default, goes through ``torch.export``;
            False is the older TorchScript-based one, for a model the first cannot capture.
    """

    ckpt: str = ""
    format: str = "onnx"
    out: Optional[str] = None
    dynamo: bool = True
    hydra: Any = field(default_factory=lambda: command_hydra("export"))  # --help: finetune.help


ConfigStore.instance().store(name="export", node=ExportConfig)


class Probabilities(nn.Module):
    """The checkpoint's backbone and head, then ``softmax(logits / temperature)``: what is exported."""

    def __init__(self, backbone: nn.Module, head: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.head(self.backbone(x)) / self.temperature).softmax(-1)


@dataclass(frozen=True)
class Exported:
    """What :func:`export_module` wrote, and how well the written model matches the checkpoint."""

    model: Path
    preprocessing: Path
    max_abs_diff: float
    seconds: float
    lora_layers_merged: int = 0


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise FineTuneError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    missing = [p for p in FORMATS[fmt][1] if importlib.util.find_spec(p) is None]
    if missing:
        raise FineTuneError(f"format={fmt} needs {', '.join(missing)}: pip install 'finetune[export]'")


def _out_dir(out: str | os.PathLike[str] | None, ckpt: str | os.PathLike[str]) -> Path:
    """The output folder, created, and checked writable before minutes go into exporting."""
    path = Path(out).expanduser() if out else output_dir_of(ckpt) / "export"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".finetune-export-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise FineTuneError(f"cannot write to out '{path}': {e.strerror or e}") from None
    return path


def preprocessing_json(prep: Preprocessing, names: Sequence[str], fmt: str, model_file: str,
                       temperature: float, backbone: str) -> dict[str, Any]:
    """``preprocessing.json``: :func:`finetune.data.transforms.eval_transform`'s pipeline, in numbers and words."""
    size = prep.image_size
    resize = int(math.floor(size / prep.crop_pct))
    first = {
        "center": f"resize the short side to {resize} px keeping the aspect ratio "
                  f"(each side: round(side * {resize} / short side))",
        "squash": f"resize to {resize} x {resize} px (the aspect ratio is not kept)",
        "border": f"resize the long side to {resize} px keeping the aspect ratio, pad the short side to {size} px "
                  "(centered) with round(255 * mean)",
    }[prep.crop_mode]
    return {
        "model": model_file,
        "format": fmt,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": [3, size, size],
        "interpolation": prep.interpolation,
        "crop_pct": prep.crop_pct,
        "crop_mode": prep.crop_mode,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "opencv_interpolation": f"INTER_{_cv2_name(prep.interpolation)}",  # training resized with cv2.resize
        "steps": [
            "decode as RGB uint8, height x width x 3 (EXIF orientation applied, alpha over white)",
            f"{first}, with OpenCV's cv2.resize and INTER_{_cv2_name(prep.interpolation)}",
            f"center crop {size} x {size} (top = (height - {size}) // 2, left likewise)",
            "x / 255, then (x - mean) / std per channel, as float32",
            "transpose to 3 x height x width; stack images into a batch N x 3 x height x width",
        ],
        "class_names": list(names),
        "temperature": temperature,
        "backbone": backbone,
        "preprocessing_source": prep.source,
    }


def _cv2_name(interpolation: str) -> str:
    """The name of the OpenCV flag the eval pipeline resizes with (``LINEAR`` for ``bilinear``)."""
    import cv2

    from finetune.data.transforms import INTERPOLATIONS  # albumentations: seconds to import, not for --help

    flag = INTERPOLATIONS.get(interpolation, cv2.INTER_CUBIC)  # the unknown fall back to bicubic there too
    return next(n for n in ("NEAREST", "LINEAR", "CUBIC", "AREA", "LANCZOS4") if getattr(cv2, f"INTER_{n}") == flag)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' notes off: the command's output is its own (its parity line says what matters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        yield


def _write_onnx(model: Probabilities, example: torch.Tensor, path: Path, dynamo: bool) -> None:
    axes: dict[str, Any] = (
        {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},)} if dynamo
        else {"dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}}
    )
    try:
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamo=dynamo, external_data=False, verbose=False, **axes,
        )
    except Exception as e:  # noqa: BLE001 - the exporter's reasons are long; its first line says which op
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        hint = " (dynamo=false tries the TorchScript-based exporter)" if dynamo else ""
        raise FineTuneError(f"torch.onnx.export failed: {first}{hint}") from None


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def _write_torchscript(model: Probabilities, example: torch.Tensor, path: Path) -> None:
    # Traced, not scripted: timm models trace, while many do not script.
    traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(path))


def _run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.jit.load(str(path), map_location="cpu")(x)


def _merge_lora(model: Probabilities, module: Any) -> int:
    """Fold LoRA adapters into a copy of ``model``'s backbone: the file holds plain timm weights, one matmul a layer."""
    if (module.hparams.get("freeze") or {}).get("name") != "lora":
        return 0
    from finetune.lora import merge_lora_layers

    model.backbone = copy.deepcopy(model.backbone)
    return merge_lora_layers(model.backbone)


def export_module(module: Any, prep: Preprocessing, out_dir: Path, fmt: str = "onnx", dynamo: bool = True) -> Exported:
    """Export ``module`` (a FineTuneModule in eval mode) into ``out_dir`` and check it against the module.

    ``module.temperature`` (1.0 where the module has none) is folded into the exported probabilities,
    and a ``freeze=lora`` module's adapters into a copy of its weights (``module`` is left as it is).
    The model file is written under a temporary name and renamed only once it passed the check.
    """
    _check_format(fmt)
    temperature = float(getattr(module, "temperature", 1.0))
    model = Probabilities(module.backbone, module.head, temperature).cpu().eval()
    size = prep.image_size
    gen = torch.Generator().manual_seed(0)
    example, check = (torch.randn(n, 3, size, size, generator=gen) for n in (2, 3))
    with torch.no_grad():
        want = torch.cat([model(check[:1]), model(check)])  # the checkpoint's own numbers, before any merge
    merged = _merge_lora(model, module)
    name = FORMATS[fmt][0]
    final, temp = out_dir / name, out_dir / f".{name}.partial"
    start = time.perf_counter()
    try:
        with _quiet(), torch.no_grad():
            if fmt == "onnx":
                _write_onnx(model, example, temp, dynamo)
            else:
                _write_torchscript(model, example, temp)
        seconds = time.perf_counter() - start
        with _quiet():
            run = _run_onnx if fmt == "onnx" else _run_torchscript
            got = torch.cat([run(temp, check[:1]), run(temp, check)])
        diff = float((got - want).abs().max())
        if not diff <= TOLERANCE:
            raise FineTuneError(f"the exported {fmt} model's probabilities differ from the checkpoint's by {diff:.2g} "
                                f"(over {TOLERANCE:g}); nothing written")
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    json_path = out_dir / "preprocessing.json"
    spec = preprocessing_json(prep, class_names(module), fmt, name, temperature, str(module.hparams.backbone))
    json_path.write_text(json.dumps(spec, indent=2) + "\n")
    return Exported(final, json_path, diff, seconds, merged)


def export(cfg: ExportConfig) -> Exported:
    """The command: export ``cfg.ckpt`` as ``cfg.format`` into ``cfg.out``; prints what it wrote."""
    _check_format(cfg.format)
    module, raw = load_checkpoint(cfg.ckpt)
    out_dir = _out_dir(cfg.out, cfg.ckpt)
    prep = resolve_preprocessing(module, raw, cfg.ckpt)
    result = export_module(module, prep, out_dir, cfg.format, cfg.dynamo)
    print(prep.describe())
    mb = result.model.stat().st_size / 2**20
    runner = "onnxruntime" if cfg.format == "onnx" else "torch.jit.load"
    print(f"exported in {result.seconds:.1f} s; {runner} matches the checkpoint: "
          f"max |difference| of probabilities {result.max_abs_diff:.1e} (batches of 1 and 3)")
    if result.lora_layers_merged:
        print(f"LoRA adapters merged into the weights of {result.lora_layers_merged} layers")
    print(f"wrote {result.model} ({mb:.1f} MB) and {result.preprocessing}")
    return result


@hydra.main(version_base="1.3", config_path=None, config_name="export")
@hold_errors
def _app(cfg: ExportConfig) -> None:
    export(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m finetune.export ckpt=PATH [format=onnx|torchscript] [out=DIR] [dynamo=true]``."""
    run_app(_app, argv, literal_keys=("ckpt", "out"), help_command="export")


if __name__ == "__main__":
    main()
