"""Lightning callbacks that make up a run (``callbacks`` config group, conf/callbacks/)."""

from finetune.callbacks.calibrate import CalibrateTemperature
from finetune.callbacks.ema import EMA
from finetune.callbacks.epoch_line import EpochLine
from finetune.callbacks.epoch_seed import SeedEachEpoch
from finetune.callbacks.freeze_schedule import FreezeSchedule
from finetune.callbacks.run_recorder import RunRecorder, best_checkpoint

__all__ = ["EMA", "CalibrateTemperature", "EpochLine", "FreezeSchedule", "RunRecorder", "SeedEachEpoch", "best_checkpoint"]
