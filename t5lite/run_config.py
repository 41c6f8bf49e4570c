"""A training run's configuration: small frozen dataclasses, each configured by gin, passed explicitly.

    TrainConfig          model_dir, seed, partitioning preset, and the groups below
      DataConfig         what is read: mixture, feature lengths, global batch, prefix LM
      LoopConfig         how long and how: steps, microbatches, logging, non-finite steps, profiling
      LossConfig         label smoothing, z-loss
      PreferenceConfig   preference tuning on pairs (DPO, IPO, SimPO) instead of the LM loss
      GRPOConfig         RL from a reward (GRPO) on sampled completions instead of the LM loss
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


GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo")  # TRL 1.16's names; "dapo" is its default
GRPO_SCALE_REWARDS = ("group", "batch", "none")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO (t5lite.grpo, docs/post-training.md): enabled trains on completions sampled from the policy
    and scored by `rewards` instead of the LM loss; the task gives the prompts. Names and defaults are
    TRL 1.16's GRPOConfig. DataConfig.batch_size counts completions: batch_size / num_generations prompts
    per step, each sampled num_generations times; TASK_FEATURE_LENGTHS["targets"] is the most tokens a
    completion has (TRL's max_completion_length).

    rewards: reward functions, each a registered name (t5lite.rewards) or "module:function", called as
      f(prompts: list[str], completions: list[str]) -> list[float]; summed with reward_weights (None: 1 each).
    temperature, top_k, top_p: sampling (the log-probabilities of the loss are those of logits / temperature).
    beta: weight of the k3 KL estimate to the reference (the starting model); 0 needs no reference.
    epsilon, epsilon_high: the ratio is clipped to [1 - epsilon, 1 + epsilon_high] (None: epsilon).
    num_iterations: updates per batch of completions (mu); above 1 the batch is reused, its
      log-probabilities under the sampling policy kept as the old policy's.
    scale_rewards: advantages divided by the std of the group, of the batch, or not at all ("none").
    loss_type: "dapo" (token losses / tokens of the global batch), "grpo" (mean per completion, then
      over completions), "dr_grpo" (token losses / (completions * max completion length)).
    mask_truncated_completions: completions without EOS get no loss (DAPO)."""

    enabled: bool = False
    rewards: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] | None = None
    num_generations: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    scale_rewards: str = "group"
    loss_type: str = "dapo"
    mask_truncated_completions: bool = False

    def __post_init__(self):
        object.__setattr__(self, "rewards", tuple(self.rewards))
        if self.reward_weights is not None:
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon)
        for name in ("num_generations", "num_iterations"):
            _check_positive(self, name)
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise UserError(f"GRPOConfig.loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}.")
        if self.scale_rewards not in GRPO_SCALE_REWARDS:
            raise UserError(f"GRPOConfig.scale_rewards must be one of {GRPO_SCALE_REWARDS}, got "
                            f"{self.scale_rewards!r}.")
        if not (self.temperature > 0 and self.top_k >= 0 and 0 < self.top_p <= 1):
            raise UserError(f"GRPOConfig samples: need temperature > 0, top_k >= 0, 0 < top_p <= 1; got "
                            f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}.")
        if self.beta < 0 or self.epsilon < 0 or self.epsilon_high < 0:
            raise UserError(f"GRPOConfig.beta, epsilon and epsilon_high must be >= 0, got {self.beta}, "
                            f"{self.epsilon}, {self.epsilon_high}.")
        if self.enabled and self.num_generations < 2:
            raise UserError("GRPOConfig.num_generations must be at least 2: the advantages compare the "
                            "completions of one prompt.")
        if self.enabled and not self.rewards:
            raise UserError("GRPOConfig.rewards is empty: name a reward, e.g. GRPOConfig.rewards = "
                            "['arithmetic_exact'] or ['my_module:my_reward'] (t5lite/rewards.py).")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise UserError(f"GRPOConfig.reward_weights has {len(self.reward_weights)} weights for "
                            f"{len(self.rewards)} rewards {list(self.rewards)}.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Every `every` steps and at the end: teacher-forced loss / accuracy / perplexity on the first
    `batches` batches of `split` of each task of `mixture_or_task_name` (None: the training data's).
    Every `infer_every` steps and at the end (0: never): the first `infer_examples` examples of each task with seqio
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
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    evals: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoints: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.preference.enabled and self.grpo.enabled:
            raise UserError("PreferenceConfig.objective and GRPOConfig.enabled are both set: a run trains on "
                            "pairs or on sampled completions, not both.")

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
