"""``wise_ft=true``: WiSE-FT (Wortsman et al. 2022) at the end of a run, between its start and its fine-tuned weights.

The start is the pretrained backbone with the run's linear-probe head, as in LP-FT (Kumar et al. 2022):

- a run with a probe phase (``freeze=lp_ft``, or any strategy whose backbone joins after epoch 0):
  the weights when the first backbone parameter starts training, i.e. the probe that phase trained;
- a run that trains the backbone from epoch 0 has no probe head, and its fresh head is random: the
  curve would run from chance. So at the end of the run a linear probe is fitted the way LP-FT's
  phase would have, on the pretrained backbone's features of the train split (eval pipeline, no
  augmentation; computed once, so ``probe_epochs`` are cheap), from the run's own head
  initialisation, with its loss, LR and weight decay. WiSE-FT's start has a trained head too (the
  zero-shot one), which is what makes its alpha 0 a classifier at all.

The start is saved as ``checkpoints/wise_ft_start.ckpt`` when it is reached (so a resumed run still has
it, and ``python -m finetune.interpolate`` can redraw the curve). At the end of fit every alpha is
scored on val (and test), alpha is chosen on val, and the chosen weights become the run's: the module
holds them, so the run's final validation/test, ``metrics.json`` and calibration (fitted afterwards by
:class:`~finetune.callbacks.CalibrateTemperature`) are those of ``checkpoints/wise_ft.ckpt``;
``last.ckpt`` keeps the fine-tuned weights (alpha 1, and what ``resume=`` continues from). The curve
goes into ``metrics.json`` (``wise_ft``) and ``wise_ft.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader

from finetune.calibration import fit_temperature
from finetune.checkpoint_io import atomic_save, safe_load
from finetune.errors import FineTuneError
from finetune.weight_space import (
    DEFAULT_ALPHAS, check_alphas, lerp_state, loader_probabilities, plot_curve, sweep_alphas, weights_checkpoint,
)

__all__ = ["WiseFT", "fit_probe"]


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def fit_probe(module: Any, loader: DataLoader, epochs: int, batch_size: int, seed: int) -> None:
    """Train ``module.head`` on the frozen backbone's features of ``loader`` (AdamW at the module's LR and decay)."""
    was_training = module.training
    device = next(module.parameters()).device
    module.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for x, y in loader:
            feats.append(module.forward_features(x.to(device)).float())
            labels.append(torch.as_tensor(y).to(device))
    features, targets = torch.cat(feats), torch.cat(labels)
    head = module.head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=module.hparams.lr, weight_decay=module.hparams.weight_decay)
    order = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(targets), generator=order).split(batch_size):
                idx = idx.to(device)
                loss = module.criterion(head(features[idx]), targets[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    module.train(was_training)


class WiseFT(Callback):
    """Interpolate between the run's start (pretrained backbone + probe head) and its end; keep the best on val.

    Args:
        enabled: ``wise_ft`` of the run's config; False: the callback does nothing.
        alphas: the grid (0: the start, 1: the fine-tuned weights).
        probe_epochs: epochs of the probe fitted at the end when the run had no probe phase.
        calibrate: ``calibrate`` of the run: fit the chosen weights' temperature into ``wise_ft.ckpt``.
        evaluate: ``evaluate`` of the run; only ``last`` (the chosen weights are what the run evaluates).
        seed: the probe's data order.
    """

    def __init__(self, enabled: bool = False, alphas: Sequence[float] = DEFAULT_ALPHAS, probe_epochs: int = 10,
                 calibrate: bool = True, evaluate: str = "last", seed: int = 0) -> None:
        self.enabled = enabled
        self.alphas = check_alphas(alphas)
        if probe_epochs < 1:
            raise FineTuneError(f"callbacks.wise_ft.probe_epochs must be >= 1, got {probe_epochs}")
        self.probe_epochs = probe_epochs
        self.calibrate = calibrate
        self.evaluate = evaluate
        self.seed = seed
        self.first_epoch = 0
        self.results: dict[str, Any] = {}

    def _paths(self, trainer: pl.Trainer) -> tuple[Path, Path]:
        ckpts = Path(trainer.default_root_dir) / "checkpoints"
        return ckpts / "wise_ft_start.ckpt", ckpts / "wise_ft.ckpt"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        # Before training: a run whose end cannot be interpolated is refused before the hours it costs.
        if self.evaluate != "last":
            raise FineTuneError("wise_ft=true makes the interpolation the run's weights, from the last epoch's; "
                                f"evaluate={self.evaluate} cannot be combined with it (use evaluate=last)")
        plan = pl_module.freeze_plan
        starts = [s for s in (plan.group_start_epoch(n) for n, _ in pl_module.backbone.named_parameters())
                  if s is not None]
        if not starts:
            raise FineTuneError(f"wise_ft=true: freeze={pl_module.strategy.name} trains no backbone weight, so "
                                "there is nothing to interpolate (WiSE-FT needs a fine-tuned backbone)")
        self.first_epoch = min(starts)
        if self.first_epoch >= (trainer.max_epochs or 0):
            raise FineTuneError(f"wise_ft=true: the backbone starts training at epoch {self.first_epoch}, after the "
                                f"run's {trainer.max_epochs} epochs; nothing would be fine-tuned")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start, _ = self._paths(trainer)
        if self.enabled and trainer.current_epoch == self.first_epoch and not start.exists():
            trainer.save_checkpoint(start, weights_only=True)  # on every rank: Lightning writes it on rank 0

    def _start_state(self, trainer: pl.Trainer, module: Any, end: dict[str, torch.Tensor]
                     ) -> tuple[dict, str, dict]:
        path, _ = self._paths(trainer)
        if not path.is_file():
            raise FineTuneError(f"wise_ft=true: the run's starting point {path} is missing "
                                "(removed after it was saved?)")
        raw = safe_load(path, "checkpoint", mmap=False)
        if self.first_epoch > 0:
            return raw["state_dict"], f"the weights at the start of epoch {self.first_epoch} (after its probe)", raw
        what = f"the pretrained backbone with a linear probe fitted on its train features ({self.probe_epochs} epochs)"
        if (raw.get("weight_averaging") or {}).get("probe"):  # fitted by an earlier end of this run
            return raw["state_dict"], what, raw
        module.load_state_dict(raw["state_dict"])
        images = getattr(trainer.datamodule, "images", trainer.datamodule)
        loader = DataLoader(images.eval_dataset("train"), batch_size=images.batch_size, num_workers=images.num_workers)
        fit_probe(module, loader, self.probe_epochs, images.batch_size, self.seed)
        state = _cpu(module.state_dict())
        module.load_state_dict(end)
        if trainer.is_global_zero:  # the start with its probe, for finetune.interpolate
            atomic_save(weights_checkpoint(raw, state, 1.0, {"method": "wise_ft_start", "probe": what}), path)
        return state, what, raw

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        started = time.perf_counter()
        end = _cpu(pl_module.state_dict())
        start, what, template = self._start_state(trainer, pl_module, end)
        dm = trainer.datamodule
        splits = {"val": dm.val_dataloader(), **({"test": dm.test_dataloader()} if dm.has_test else {})}

        def measure() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            context = trainer.precision_plugin.forward_context()
            return {s: loader_probabilities(pl_module, loader, context) for s, loader in splits.items()}

        curve, chosen, at = sweep_alphas(pl_module, start, end, self.alphas, measure)
        state = lerp_state(start, end, chosen["alpha"])
        pl_module.load_state_dict(state)
        temperature = 1.0
        if self.calibrate:
            probs, labels = at["val"]
            temperature = fit_temperature(probs.double().clamp_min(torch.finfo(torch.float32).tiny).log(), labels)
        start_path, path = self._paths(trainer)
        info = {"method": "wise_ft", "alpha": chosen["alpha"], "start": str(start_path), "end": "checkpoints/last.ckpt"}
        if trainer.is_global_zero:
            atomic_save(weights_checkpoint(template, state, temperature, info), path)
            plot_curve(curve, chosen["alpha"], Path(trainer.default_root_dir) / "wise_ft.png",
                       f"WiSE-FT: start (0) to fine-tuned (1), chosen {chosen['alpha']:g}")
        trainer.strategy.barrier("wise_ft")
        self.results = {
            "start": what, "alphas": self.alphas, "val_acc": [p["val_acc"] for p in curve],
            "val_loss": [p["val_loss"] for p in curve], "test_acc": [p.get("test_acc") for p in curve],
            "chosen_alpha": chosen["alpha"],
            "checkpoint": str(path), "evaluated": "the chosen weights (checkpoints/wise_ft.ckpt); last.ckpt keeps "
            "the fine-tuned ones", "time_s": round(time.perf_counter() - started, 2),
        }
        from finetune.callbacks.run_recorder import RunRecorder

        recorders = [c for c in trainer.callbacks if isinstance(c, RunRecorder)]  # type: ignore[attr-defined]
        if recorders:
            recorders[0].results.update({"wise_ft": self.results, "evaluated": f"wise_ft alpha {chosen['alpha']:g}"})
