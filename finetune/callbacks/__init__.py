"""Lightning callbacks that make up a run (``callbacks`` config group, conf/callbacks/)."""

from finetune.callbacks.freeze_schedule import FreezeSchedule
from finetune.callbacks.run_recorder import RunRecorder, best_checkpoint

__all__ = ["FreezeSchedule", "RunRecorder", "best_checkpoint"]
