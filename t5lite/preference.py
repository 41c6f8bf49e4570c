"""Preference tuning on pairs (prompt, chosen, rejected): the DPO, IPO and SimPO losses, and the loss
SUMS of a batch of pairs that the ONE train step (t5lite.trainer) accumulates and divides once by the
number of pairs of the global batch.

With pi the policy, ref the frozen starting model, log p(y|x) summed over the answer's tokens, |y| its
number of tokens, and per pair (chosen c, rejected r):

    DPO    h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
           loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     (eps: label smoothing)
    IPO    h = (log pi(c) - log ref(c)) / |c| - (log pi(r) - log ref(r)) / |r|
           loss = (h - 1 / (2 beta))^2
    SimPO  h = log pi(c) / |c| - log pi(r) / |r| - gamma / beta                 (no reference)
           loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

Rewards (logged): beta (log pi - log ref) for DPO and IPO, beta log pi / |y| for SimPO, as TRL logs them
(DPOTrainer; CPOTrainer with loss_type="simpo"). tests/test_preference.py pins the losses and their
gradients to TRL's code.

A batch of B pairs holds the prompt features once and each answer's decoder features under a
"chosen_" / "rejected_" prefix, so a pair is one row and stays whole under data-parallel sharding and
microbatching (t5lite.data.pairs builds it). The core imports no TensorFlow: the prefixes are spelled
here and there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from t5lite import adaptation as adaptation_lib
from t5lite.model.models import Model, cross_entropy_with_z_loss
from t5lite.run_config import PreferenceConfig

Array = jax.Array
SIDES = ("chosen", "rejected")  # feature prefixes of a pair batch (as t5lite.data.pairs.SIDES)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def pair_losses(config: PreferenceConfig, logps: Array, reference_logps: Array | None, num_tokens: Array
                ) -> tuple[Array, Array]:
    """Per-pair losses [pairs] and rewards [pairs, 2] (chosen, rejected).

    logps, reference_logps: summed answer log-probabilities [pairs, 2] under the policy and the
    reference (None for SimPO); num_tokens: the answers' token counts [pairs, 2]."""
    beta = config.beta
    lengths = jnp.maximum(num_tokens, 1.0)  # as TRL: an empty answer divides by 1
    if config.objective == "simpo":
        average = logps / lengths
        logits = average[:, 0] - average[:, 1] - config.simpo_gamma / beta
        rewards = beta * jax.lax.stop_gradient(average)
    else:
        logratios = logps - reference_logps
        rewards = beta * jax.lax.stop_gradient(logratios)
        if config.objective == "ipo":
            # TRL averages IPO's log-ratios over the answer's tokens (confirmed with the IPO authors).
            average = logratios / lengths
            return jnp.square(average[:, 0] - average[:, 1] - 1.0 / (2.0 * beta)), rewards
        logits = logratios[:, 0] - logratios[:, 1]
    eps = config.label_smoothing
    losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * logits) - eps * jax.nn.log_sigmoid(-beta * logits)
    return losses, rewards


def paired_rows(batch: Mapping[str, Array]) -> dict[str, Array]:
    """A pair batch [pairs, ...] -> model features: the answers' [2 * pairs, ...], row 2i pair i's chosen
    answer, row 2i+1 its rejected one; the prompt's (an encoder-decoder's encoder features) stay
    [pairs, ...]: the encoder reads each prompt once and the decoder's rows 2i and 2i+1 both read its
    output (network.EncoderDecoder). Interleaving keeps both rows of a pair on the device that holds the
    pair: no data moves between devices."""
    rows = {}
    for name in [k[len("chosen_"):] for k in batch if k.startswith("chosen_")]:
        both = jnp.stack([batch[f"{side}_{name}"] for side in SIDES], axis=1)
        rows[name] = both.reshape((-1,) + both.shape[2:])
    for name, value in batch.items():
        if not name.startswith(tuple(f"{side}_" for side in SIDES)):
            rows[name] = value
    return rows


def answer_logps(model: Model, params, rows: Mapping[str, Array], dropout_rng: Array | None = None
                 ) -> tuple[Array, Array]:
    """(summed log p of each answer's tokens, their number), each [pairs, 2], from paired_rows features."""
    logits = model.logits(params, rows, dropout_rng=dropout_rng)
    _, _, nll = cross_entropy_with_z_loss(logits, rows["decoder_target_tokens"])
    weights = rows["decoder_loss_weights"].astype(jnp.float32)
    return -jnp.sum(nll * weights, axis=1).reshape(-1, 2), jnp.sum(weights, axis=1).reshape(-1, 2)


def loss_sums(model: Model, params, batch: Mapping[str, Array], *, config: PreferenceConfig, reference_params=None,
              dropout_rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """(sum of the pairs' losses, metric sums) of a batch of pairs; divide by sums["num_pairs"] of the
    global batch (normalize_sums). A pair without tokens in either answer (an eval batch's padding row)
    adds nothing. The reference's log-probabilities are constants: never differentiated."""
    rows = paired_rows(batch)
    logps, num_tokens = answer_logps(model, params, rows, dropout_rng)
    reference_logps = None
    if config.uses_reference:
        reference_logps = jax.lax.stop_gradient(answer_logps(model, reference_params, rows)[0])
    losses, rewards = pair_losses(config, logps, reference_logps, num_tokens)
    valid = jnp.all(num_tokens > 0, axis=1).astype(jnp.float32)
    logps = jax.lax.stop_gradient(logps)

    def total(x):
        return jnp.sum(x * valid)

    loss_sum = total(losses)
    sums = {
        "loss": loss_sum,
        "rewards/chosen": total(rewards[:, 0]),
        "rewards/rejected": total(rewards[:, 1]),
        "rewards/accuracies": total((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32)),
        "rewards/margins": total(rewards[:, 0] - rewards[:, 1]),
        "logps/chosen": total(logps[:, 0]),
        "logps/rejected": total(logps[:, 1]),
        "num_pairs": jnp.sum(valid),
        "num_tokens": jnp.sum(num_tokens * valid[:, None]),
    }
    return loss_sum, sums


def normalize_sums(sums: Mapping[str, Array]) -> dict[str, Array]:
    """Pair sums -> means over the pairs: loss and METRICS; num_pairs and num_tokens as they are."""
    n = jnp.maximum(sums["num_pairs"], 1.0)
    means = {k: sums[k] / n for k in ("loss", *METRICS)}
    return {**means, "num_pairs": sums["num_pairs"], "num_tokens": sums["num_tokens"]}


def reference_params(adaptation: adaptation_lib.Adaptation, state_params, reference=None):
    """The reference model's params: with LoRA the frozen base (no second copy; a quantized base stays
    quantized, Model.logits dequantizes it layer by layer), else `reference`, the copy of the starting
    params a train state keeps (trainer.PreferenceTrainState)."""
    if isinstance(adaptation, adaptation_lib.LoraAdaptation):
        return state_params["base"]
    return reference


def keeps_reference_copy(config: PreferenceConfig, adaptation: Any) -> bool:
    """Whether the train state must hold a frozen copy of the starting params: DPO / IPO without LoRA."""
    return config.uses_reference and not isinstance(adaptation, adaptation_lib.LoraAdaptation)
