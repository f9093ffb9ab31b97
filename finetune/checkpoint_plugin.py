"""Lightning's checkpoint IO with :func:`finetune.checkpoint_io.atomic_save`: a crash never leaves a partial checkpoint."""

from __future__ import annotations

from typing import Any, Optional

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from finetune.checkpoint_io import atomic_save, os_error_text
from finetune.errors import FineTuneError

__all__ = ["AtomicCheckpointIO"]


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`atomic_save` for local paths.

    Pass it to the trainer: ``pl.Trainer(plugins=[AtomicCheckpointIO()])``. Remote (fsspec)
    paths keep Lightning's own writer; loading is Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local = str(path)[len("file://"):] if str(path).startswith("file://") else path
        atomic_save(checkpoint, local)

    def remove_checkpoint(self, path: Any) -> None:
        try:
            super().remove_checkpoint(path)
        except OSError as e:
            raise FineTuneError(f"cannot remove checkpoint '{path}': {os_error_text(e)}") from None
