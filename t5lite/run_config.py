"""A training run's configuration: small frozen dataclasses, each configured by gin, passed explicitly.

    TrainConfig          model_dir, seed, partitioning preset, and the groups below
      DataConfig         what is read: mixture, feature lengths, global batch, prefix LM
      LoopConfig         how long and how: steps, microbatches, logging, non-finite steps, profiling
      LossConfig         label smoothing, z-loss
      PreferenceConfig   preference tuning on pairs (DPO, IPO, SimPO) instead of the LM loss
      EvalConfig         evaluation during training: teacher-forced, inference, early stopping
      CheckpointConfig   saving, keeping, and where the params start from (fine-tuning)

In a gin file (gin/base.gin sets every one):

    DataConfig.batch_size = 16
    LoopConfig.num_train_steps = 600
    EvalConfig.every = 200

The model (t5lite.model.config.TransformerConfig), the optimizer (t5lite.optim.make_optimizer) and
what trains (t5lite.adaptation.make_adaptation) have their own gin configurables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import gin

from t5lite.errors import UserError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """mixture_or_task_name: a registered seqio Task or Mixture (import your task module in the gin
    file); task_feature_lengths: {"inputs": n, "targets": m}; batch_size: the global batch (all hosts);
    prefix_lm: a decoder-only model attends to the inputs of a task bidirectionally; split: the split
    trained on, e.g. 'train[fold=2/5]' (cross-validation, t5lite/data/splits.py); cache_dir: train from the seqio
    caches that `python -m t5lite.data.pipelines cache --output_cache_dir=DIR` wrote (seqio use_cached) instead of
    preprocessing on the fly (evaluation still reads its tasks uncached)."""

    mixture_or_task_name: str = "t5lite_default_span_corruption"
    task_feature_lengths: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"inputs": 128, "targets": 32})
    batch_size: int = 16
    prefix_lm: bool = False
    split: str = "train"
    cache_dir: str | None = None

    def __post_init__(self):
        _check_positive(self, "batch_size")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """num_train_steps: the step to train to (fine-tuning: this many steps after the initial
    checkpoint's). num_microbatches: gradient accumulation; divides batch_size.
    on_nonfinite: a step whose loss or gradients are not finite is never applied; "skip" goes on,
    "stop" saves a checkpoint of the parameters before it and stops with a message.
    profile_steps: "A:B" traces steps A..B to MODEL_DIR/profile. write_host_records (debugging
    multi-host runs): every process appends {"step", "loss", "rows": hashes of its batch rows} to
    MODEL_DIR/host-<process>.jsonl."""

    num_train_steps: int = 1000
    num_microbatches: int = 1
    log_every: int = 10
    on_nonfinite: str = "skip"
    profile_steps: str | None = None
    write_host_records: bool = False

    def __post_init__(self):
        for name in ("num_train_steps", "num_microbatches", "log_every"):
            _check_positive(self, name)
        if self.on_nonfinite not in ("skip", "stop"):
            raise UserError(f"LoopConfig.on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
    label_smoothing: float = 0.0
    z_loss: float = 1e-4


PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo")
# beta where PreferenceConfig.beta is None: TRL's DPO / IPO default, and the SimPO paper's range (2 - 2.5).
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """objective None trains the LM loss (LossConfig); "dpo", "ipo" or "simpo" trains on pairs
    {prompt, chosen, rejected} (t5lite.preference, docs/post-training.md). beta: DPO's / SimPO's
    temperature, IPO's regularisation tau; None: the objective's DEFAULT_BETA. label_smoothing: the
    probability that a pair's label is flipped (conservative DPO; DPO and SimPO only). simpo_gamma:
    SimPO's target reward margin."""

    objective: str | None = None
    beta: float | None = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    def __post_init__(self):
        if self.objective not in (None, *PREFERENCE_OBJECTIVES):
            raise UserError(f"PreferenceConfig.objective must be None (LM training) or one of "
                            f"{PREFERENCE_OBJECTIVES}, got {self.objective!r}.")
        if self.beta is None:
            object.__setattr__(self, "beta", DEFAULT_BETA.get(self.objective, 0.1))
        if not self.beta > 0:
            raise UserError(f"PreferenceConfig.beta must be positive, got {self.beta!r}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"PreferenceConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}.")
        if self.label_smoothing and self.objective == "ipo":
            raise UserError("PreferenceConfig.label_smoothing has no meaning for IPO's squared loss; set it to 0.")

    @property
    def enabled(self) -> bool:
        return self.objective is not None

    @property
    def uses_reference(self) -> bool:
        """DPO and IPO compare with the frozen starting model; SimPO needs none."""
        return self.objective in ("dpo", "ipo")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Every `every` steps and at the end: teacher-forced loss / accuracy / perplexity on the first
    `batches` batches of `split` of each task of `mixture_or_task_name` (None: the training data's).
    Every `infer_every` steps (0: never): the first `infer_examples` examples of each task with seqio
    metric functions are decoded / scored (t5lite.evaluation). early_stopping_metric ("task/metric",
    e.g. "wikitext2_span_corruption/loss"; the teacher-forced accuracy is "token_accuracy" there)
    stops training, with a checkpoint, after `early_stopping_patience` evaluations without
    improvement (mode "min" / "max")."""

    mixture_or_task_name: str | None = None
    split: str = "validation"
    every: int = 200
    batches: int = 8
    infer_every: int = 0
    infer_examples: int = 32
    early_stopping_metric: str | None = None
    early_stopping_patience: int = 3
    early_stopping_mode: str = "min"

    def __post_init__(self):
        for name in ("every", "batches"):
            _check_positive(self, name)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint every `every` steps and at the end; kept: the last `keep`, pinned ones, and with
    `best_metric` (an eval metric averaged over the eval tasks, e.g. "loss") the best by `best_mode`;
    keep=None keeps every checkpoint. checksums: write checkpoints/<step>/checksums.json and verify
    it before restoring. A failed save (a full disk) is retried at the next save; the final one
    every `retry_every_s` seconds until it is written (Ctrl-C gives up).
    initial_checkpoint_path (fine-tuning, when MODEL_DIR has no checkpoint to resume): the params of
    a .../checkpoints/<step> directory, renamed by `initial_checkpoint_rename` ({regex over its
    parameter names: replacement}); steps count on from its step."""

    every: int = 200
    keep: int | None = 3
    best_metric: str | None = None
    best_mode: str = "min"
    initial_checkpoint_path: str | None = None
    initial_checkpoint_rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    checksums: bool = True
    retry_every_s: float = 30.0

    def __post_init__(self):
        _check_positive(self, "every")
        if self.keep is not None:
            _check_positive(self, "keep", hint="None keeps every checkpoint; fewer than 1 would delete the newest")
        if not self.retry_every_s > 0:
            raise UserError(f"CheckpointConfig.retry_every_s must be positive, got {self.retry_every_s!r}.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `python -m t5lite.train` does, except the model, optimizer and adaptation."""

    model_dir: str = gin.REQUIRED
    seed: int = 0
    partitioning_preset: str = "dp"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    preference: PreferenceConfig = dataclasses.field(default_factory=PreferenceConfig)
    evals: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoints: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    @property
    def eval_mixture_or_task_name(self) -> str:
        return self.evals.mixture_or_task_name or self.data.mixture_or_task_name


def _check_positive(config, name: str, hint: str = "") -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or value < 1:
        raise UserError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}"
                        + (f" ({hint})." if hint else "."))


# Bindings of the train() of t5lite before 2026-12-07, and their names now: gin_cli names the new
# one when a gin file or flag uses the old one.
MOVED_BINDINGS = {
    "train.model_dir": "TrainConfig.model_dir",
    "train.seed": "TrainConfig.seed",
    "train.partitioning_preset": "TrainConfig.partitioning_preset",
    "train.mixture_or_task_name": "DataConfig.mixture_or_task_name",
    "train.task_feature_lengths": "DataConfig.task_feature_lengths",
    "train.batch_size": "DataConfig.batch_size",
    "train.prefix_lm": "DataConfig.prefix_lm",
    "train.num_train_steps": "LoopConfig.num_train_steps",
    "train.num_microbatches": "LoopConfig.num_microbatches",
    "train.log_every": "LoopConfig.log_every",
    "train.on_nonfinite": "LoopConfig.on_nonfinite",
    "train.profile_steps": "LoopConfig.profile_steps",
    "train.write_host_records": "LoopConfig.write_host_records",
    "train.label_smoothing": "LossConfig.label_smoothing",
    "train.z_loss": "LossConfig.z_loss",
    "train.eval_mixture_or_task_name": "EvalConfig.mixture_or_task_name",
    "train.eval_split": "EvalConfig.split",
    "train.eval_every": "EvalConfig.every",
    "train.eval_batches": "EvalConfig.batches",
    "train.infer_eval_every": "EvalConfig.infer_every",
    "train.infer_eval_examples": "EvalConfig.infer_examples",
    "train.early_stopping_metric": "EvalConfig.early_stopping_metric",
    "train.early_stopping_patience": "EvalConfig.early_stopping_patience",
    "train.early_stopping_mode": "EvalConfig.early_stopping_mode",
    "train.checkpoint_every": "CheckpointConfig.every",
    "train.keep_checkpoints": "CheckpointConfig.keep",
    "train.checkpoint_best_metric": "CheckpointConfig.best_metric",
    "train.checkpoint_best_mode": "CheckpointConfig.best_mode",
    "train.initial_checkpoint_path": "CheckpointConfig.initial_checkpoint_path",
    "train.initial_checkpoint_rename": "CheckpointConfig.initial_checkpoint_rename",
}
