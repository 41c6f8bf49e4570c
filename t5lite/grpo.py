"""GRPO (group-relative policy optimisation; DeepSeekMath, TRL's GRPOTrainer): the advantages of a group
of completions and the clipped policy-gradient loss SUMS that the ONE train step (t5lite.trainer)
accumulates and divides once by the global normalizer of the loss type.

Each prompt is sampled G times (t5lite.rollouts); with r_i the reward of completion i of a group:

    advantage  A_i = (r_i - mean(r)) / (std(r) + 1e-4)     scale_rewards "group" (TRL's default; std with
                                                           Bessel's correction), "batch": the std of all
                                                           rewards, "none": A_i = r_i - mean(r)
    ratio      rho_t = exp(log pi(y_t) - log pi_old(y_t))  pi_old: the sampling policy (mu = 1: rho = 1, only
                                                           its gradient counts)
    token loss l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + beta k3_t,
               k3_t = exp(ref_t - pi_t) - (ref_t - pi_t) - 1     (log-probabilities of the token y_t)
    loss       "dapo"    sum over the tokens of the batch / their number             (TRL's default)
               "grpo"    per completion the mean over its tokens, then the mean over completions
               "dr_grpo" sum over the tokens / (completions * max completion length)

log pi is of logits / temperature, as TRL computes it. tests/test_grpo.py pins the advantages, the loss
and its gradient to TRL 1.16's GRPOTrainer._compute_loss. Logged with TRL's names (METRICS).

A batch row is one completion: the model features of (prompt, completion), decoder_loss_weights its
completion mask (up to and including EOS), and float features "advantages", "rewards" [rows] (and
"rewards/<name>" per reward function when there are several), "group_reward_std" [rows], and with
num_iterations > 1 "old_logps" [rows, length]. The core imports no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5lite import adaptation as adaptation_lib
from t5lite.model.models import Model, cross_entropy_with_z_loss
from t5lite.run_config import GRPOConfig

Array = jax.Array
ADVANTAGE_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
NORMALIZER = "loss_normalizer"  # the metric sum the train step divides the loss sum by
REWARD_PREFIX = "rewards/"  # per-function reward features and metrics ("rewards/<name>/mean")
TOKEN_MEANS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
COMPLETION_MEANS = ("reward", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio")


def group_advantages(rewards: np.ndarray, num_generations: int, scale_rewards: str = "group"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(advantages [rows], each row's group reward std [rows]) of rewards [rows], rows = groups * G with
    a group's completions adjacent. The std is Bessel-corrected (torch's, as TRL's nanstd)."""
    rewards = np.asarray(rewards, np.float64)
    grouped = rewards.reshape(-1, num_generations)
    mean = np.repeat(grouped.mean(axis=1), num_generations)
    group_std = np.repeat(grouped.std(axis=1, ddof=1), num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std(ddof=1) + ADVANTAGE_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards {scale_rewards!r}")
    return advantages.astype(np.float32), group_std.astype(np.float32)


def token_logps(model: Model, params, rows: Mapping[str, Array], temperature: float,
                dropout_rng: Array | None = None) -> tuple[Array, Array]:
    """(log p of each target token under logits / temperature, the entropy of that distribution), each
    [rows, length]."""
    logits = model.logits(params, rows, dropout_rng=dropout_rng) / temperature
    _, _, nll = cross_entropy_with_z_loss(logits, rows["decoder_target_tokens"])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return -nll, entropy


def token_losses(config: GRPOConfig, logps: Array, old_logps: Array, advantages: Array,
                 reference_logps: Array | None) -> tuple[Array, dict[str, Array]]:
    """Per-token losses [rows, length] and per-token metric values (kl, clipped flags) from the
    policy's, the sampling policy's and the reference's (None when beta is 0) log-probs [rows, length]
    and the advantages [rows]."""
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - config.epsilon, 1.0 + config.epsilon_high)
    a = advantages[:, None]
    losses = -jnp.minimum(ratio * a, clipped * a)
    low = (ratio < 1.0 - config.epsilon) & (a < 0)
    high = (ratio > 1.0 + config.epsilon_high) & (a > 0)
    values = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}
    if reference_logps is not None:
        delta = reference_logps - logps
        kl = jnp.exp(delta) - delta - 1.0
        losses = losses + config.beta * kl
        values["kl"] = kl
    return losses, {k: v.astype(jnp.float32) for k, v in values.items()}


def reduce_losses(config: GRPOConfig, losses: Array, mask: Array) -> tuple[Array, Array]:
    """(loss sum, normalizer) of token losses [rows, length] under a completion mask: the loss of the
    global batch is the sum of the loss sums over its parts divided by the sum of their normalizers."""
    num_tokens = jnp.sum(mask, axis=1)
    rows = jnp.asarray(mask.shape[0], jnp.float32)
    if config.loss_type == "grpo":
        return jnp.sum(jnp.sum(losses * mask, axis=1) / jnp.maximum(num_tokens, 1.0)), rows
    if config.loss_type == "dr_grpo":
        return jnp.sum(losses * mask) / mask.shape[1], rows
    return jnp.sum(losses * mask), jnp.sum(num_tokens)  # dapo


def loss_sums(model: Model, params, batch: Mapping[str, Array], *, config: GRPOConfig, reference_params=None,
              dropout_rng: Array | None = None, eos_id: int = 1) -> tuple[Array, dict[str, Array]]:
    """(loss sum, metric sums) of a batch of completions; normalize_sums divides by the global sums.
    The sampling policy's and the reference's log-probs are constants: never differentiated."""
    mask = batch["decoder_loss_weights"].astype(jnp.float32)
    logps, entropy = token_logps(model, params, batch, config.temperature, dropout_rng)
    old_logps = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
    reference_logps = None
    if config.beta:
        reference_logps = jax.lax.stop_gradient(token_logps(model, reference_params, batch, config.temperature)[0])
    losses, values = token_losses(config, logps, old_logps, batch["advantages"], reference_logps)
    loss_sum, normalizer = reduce_losses(config, losses, mask)
    rewards = batch["rewards"]
    targets = batch["decoder_target_tokens"]
    sums = {
        "loss": loss_sum,
        NORMALIZER: normalizer,
        **{k: jnp.sum(v * mask) for k, v in values.items()},
        "entropy": jnp.sum(jax.lax.stop_gradient(entropy) * mask),
        "reward": jnp.sum(rewards),
        "reward_squares": jnp.sum(jnp.square(rewards)),
        "frac_reward_zero_std": jnp.sum((batch["group_reward_std"] <= 1e-8).astype(jnp.float32)),  # TRL's isclose
        "completions/mean_length": jnp.sum(_completion_lengths(targets, eos_id)),
        "completions/clipped_ratio": jnp.sum(1.0 - jnp.any(targets == eos_id, axis=1).astype(jnp.float32)),
        "num_completions": jnp.asarray(mask.shape[0], jnp.float32),
        "num_tokens": jnp.sum(mask),
        **{f"{k}/mean": jnp.sum(v) for k, v in batch.items() if k.startswith(REWARD_PREFIX)},
    }
    return loss_sum, sums


def _completion_lengths(targets: Array, eos_id: int) -> Array:
    """Tokens of each completion [rows], EOS included (as TRL counts them): up to the first EOS, else all."""
    positions = jnp.arange(targets.shape[1])[None]
    first_eos = jnp.min(jnp.where(targets == eos_id, positions, targets.shape[1] - 1), axis=1)
    return (first_eos + 1).astype(jnp.float32)


def normalize_sums(sums: Mapping[str, Array]) -> dict[str, Array]:
    """Metric sums of a global batch -> the logged figures (TRL's names): loss; per-token means of kl,
    entropy, clip ratios; per-completion means of the rewards, lengths, the truncated fraction, the
    fraction of groups whose rewards are all equal; the std of the rewards; the counts."""
    tokens = jnp.maximum(sums["num_tokens"], 1.0)
    n = jnp.maximum(sums["num_completions"], 1.0)
    out = {"loss": sums["loss"] / jnp.maximum(sums[NORMALIZER], 1.0)}
    out.update({k: sums[k] / tokens for k in TOKEN_MEANS if k in sums})
    out.update({k: sums[k] / n for k in (*COMPLETION_MEANS, *(k for k in sums if k.startswith(REWARD_PREFIX)))})
    variance = (sums["reward_squares"] - jnp.square(sums["reward"]) / n) / jnp.maximum(n - 1.0, 1.0)
    out["reward_std"] = jnp.sqrt(jnp.maximum(variance, 0.0))
    out["num_completions"], out["num_tokens"] = sums["num_completions"], sums["num_tokens"]
    return out


def keeps_reference_copy(config: GRPOConfig, adaptation: Any) -> bool:
    """Whether the train state must hold a frozen copy of the starting params: a KL term without LoRA
    (with LoRA the frozen base is the reference)."""
    return config.enabled and config.beta != 0 and not isinstance(adaptation, adaptation_lib.LoraAdaptation)
