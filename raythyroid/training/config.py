"""What a training run is asked to do: its flags, as one frozen record."""
from __future__ import annotations

from dataclasses import asdict, dataclass


OPTIMIZERS = ("adamw", "sgd")

SCHEDULES = ("poly", "cosine")

PRECISIONS = ("auto", "bf16", "fp32")

# with only --time-limit the clock ends training (and drives the learning-rate schedule)
TIME_LIMITED_EPOCHS = 10_000


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 8  # per worker
    lr: float | None = None  # default: 1e-3 for AdamW, 1e-2 for SGD
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "poly"
    loss: str = "dice-ce"  # losses.LOSSES; weighted-ce is the paper's
    base: int = 16
    augment: str = "strong"  # augment.PRESETS
    precision: str = "auto"
    seed: int = 0
    time_limit_min: float | None = None
    # weights validated, kept and shipped are an exponential moving average of the trained ones
    # (0 = the trained weights themselves); it smooths the noise of small batches
    ema: float = 0.0
    deep_supervision: int = 0  # extra losses at 1/2, 1/4, ... resolution (model.UNetConfig)
    # a model (folder, s3:// or bundled name) whose weights the run starts from, not random ones
    init: str | None = None
    # whether the inference chosen on validation may use TTA (distill's one-pass students: not
    # unless asked)
    allow_tta: bool = True
    # with a teacher's soft targets in the data (distill): their share of the loss, and the
    # temperature both distributions are softened by (losses.distilled)
    soft_weight: float = 0.5
    temperature: float = 1.0

    @property
    def architecture(self):
        from .. import model

        return model.UNetConfig(base=self.base, deep_supervision=self.deep_supervision)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.optimizer == "adamw" else 1e-2

    def to_dict(self) -> dict:
        return asdict(self)
