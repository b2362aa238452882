"""Training a U-Net on Ray Train: the library train, cv and distill share (nnU-Net's
`training/` stage). Pipelines use it through the names below; the modules are its rooms:

  config       TrainConfig, the flags of a run
  data         prepared shards -> decoded Ray datasets
  loop         the worker side: epochs, validation, checkpoints, the end of training
  validation   a split scored across workers; the inference chosen on validation
  checkpoints  what a checkpoint holds, resuming, the model folder from the final state
  driver       Ray Train started, progress relayed, the model written
"""
from .checkpoints import (CHECKPOINT_DIR, STATE_FILE, TrainState, check_resume, check_same_data,
                          finished_state, initial_weights, recorded_checkpoints, save_model)
from .config import OPTIMIZERS, PRECISIONS, SCHEDULES, TIME_LIMITED_EPOCHS, TrainConfig
from .data import FULL_COLUMNS, deal_folds, decode_block, load_split, read_shards
from .driver import TrainingRelay, fit, steps_per_epoch, train_and_save
from .loop import follow_threads
from .validation import INFERENCE_KEEP_LARGEST, INFERENCE_THRESHOLDS, choose_inference, evaluate

__all__ = ["CHECKPOINT_DIR", "FULL_COLUMNS", "INFERENCE_KEEP_LARGEST", "INFERENCE_THRESHOLDS",
           "OPTIMIZERS", "PRECISIONS", "SCHEDULES", "STATE_FILE", "TIME_LIMITED_EPOCHS",
           "TrainConfig", "TrainState", "TrainingRelay", "check_resume", "check_same_data",
           "choose_inference", "deal_folds", "decode_block", "evaluate", "finished_state", "fit",
           "follow_threads", "initial_weights", "load_split", "read_shards", "recorded_checkpoints", "save_model",
           "steps_per_epoch", "train_and_save"]
