"""The one inference path: ``FineTuneModule.predict_step`` run by Lightning's ``Trainer.predict``.

``finetune.predict`` (image files) and ``finetune.evaluate`` (a split of a datamodule) both
call :func:`probabilities`, so the same images give the same numbers in both, on whatever
accelerator Lightning picks, with its device placement, eval mode and inference mode.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from finetune.data.images import load_image
from finetune.errors import FineTuneError

__all__ = ["ImageFiles", "predict_trainer", "probabilities"]


def predict_trainer() -> pl.Trainer:
    """A Trainer for predictions only: one device, nothing logged, saved or drawn."""
    return pl.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the loader's order is the result's order
    )


class _Collect(pl.Callback):
    """Each batch's predictions and the batch's second element (labels, or item indices), on the CPU.

    Collected here rather than returned by ``predict``, so a batch's predictions stay paired
    with its labels or indices whatever the loader does.
    """

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []
        self.tags: list[torch.Tensor] = []

    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.probs.append(outputs.detach().float().cpu())
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            self.tags.append(torch.as_tensor(batch[1]).cpu())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's device banner and loader hints off: the commands' stdout and one-line errors are theirs."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*set_float32_matmul_precision.*")
            # Lightning 2.6 on torch 2.10+ warns about its own use of torch's pytree API.
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def probabilities(
    module: pl.LightningModule, loader: DataLoader, temperature: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities ``(N, C)`` of ``loader``'s batches, in its order, through ``module.predict_step``.

    Batches of views ``(B, V, C, H, W)`` (:mod:`finetune.tta`) give each image's average over its views.

    Args:
        temperature: None: the module's own (calibrated); 1.0: the uncalibrated softmax.

    Returns:
        The probabilities, and the batches' second elements concatenated (labels for ``(x, y)``
        batches, item indices for :class:`ImageFiles`), or None for batches of images alone.
    """
    collect = _Collect()
    own = getattr(module, "temperature", 1.0)
    if temperature is not None:
        module.temperature = temperature
    try:
        with _quiet():
            trainer = predict_trainer()
            trainer.callbacks.append(collect)
            trainer.predict(module, dataloaders=loader, return_predictions=False)
    finally:
        module.temperature = own
    num_classes = int(module.hparams.num_classes)
    probs = torch.cat(collect.probs) if collect.probs else torch.empty(0, num_classes)
    tags = torch.cat(collect.tags) if collect.tags else None
    return probs, tags


class ImageFiles(IterableDataset):
    """Image files through ``transform``, yielded as batches ``(images, indices into paths)`` of readable ones.

    An unreadable file is a :class:`FineTuneError` naming it, or with ``skip`` it is left out
    and listed in :attr:`bad` with why. Batching here (``DataLoader(batch_size=None)``), not in
    the loader, means a batch is never empty; read in the main process, so :attr:`bad` is
    this object's.
    """

    def __init__(self, paths: Sequence[Path], transform: Any, batch_size: int, skip: bool = False) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.batch_size = batch_size
        self.skip = skip
        self.bad: list[tuple[Path, str]] = []

    def _read(self, path: Path) -> torch.Tensor | None:
        try:
            return self.transform(image=load_image(path))["image"]
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on broken files
            why = " ".join(str(e).split())[:160] or type(e).__name__
            if not self.skip:
                raise FineTuneError(f"cannot read image '{path}': {why} (on_bad_image=skip skips such files)") from None
            self.bad.append((path, why))
            return None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.bad = []
        batch: list[tuple[int, torch.Tensor]] = []
        for i, path in enumerate(self.paths):
            x = self._read(path)
            if x is None:
                continue
            batch.append((i, x))
            if len(batch) == self.batch_size:
                yield self._stack(batch)
                batch = []
        if batch:
            yield self._stack(batch)

    @staticmethod
    def _stack(batch: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([x for _, x in batch]), torch.tensor([i for i, _ in batch])

    def loader(self) -> DataLoader:
        """The DataLoader :func:`probabilities` takes."""
        return DataLoader(self, batch_size=None, num_workers=0)
