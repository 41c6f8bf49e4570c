"""GRPO's batches: completions sampled from the current policy, scored by the rewards, as model features.

RolloutBatches is the train stream of a GRPO run (t5lite.train hands it to the loop as it hands an LM
run its seqio batches). Each next():

    prompts      the next batch of the task's prompts (a seqio stream: its position is checkpointed)
    sample       each prompt G times (GRPOConfig.num_generations; a group's rows adjacent), temperature
                 sampling with the model's KV-cache decoder, on the mesh, from the current train state
    score        prompts and completions as text -> each reward function -> their weighted sum
    rows         t5lite.grpo's batch: (prompt, completion) features, the group advantages, the rewards,
                 and with num_iterations > 1 the sampling policy's per-token log-probs

With num_iterations = mu > 1 a batch is returned mu times (mu updates per generation). Each process
samples and scores its own prompts; a group never spans processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from t5lite import adaptation as adaptation_lib
from t5lite import grpo, partitioning
from t5lite.errors import UserError
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model
from t5lite.run_config import GRPOConfig


def answer_features(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], lengths: Mapping[str, int],
                    *, encoder_decoder: bool, prefix_lm: bool = True) -> dict[str, np.ndarray]:
    """Unpacked model features [rows, ...] int32 of (prompt, answer) token lists, as seqio's converters
    lay them out, with the loss weights and segment ids on every answer token (even a sampled 0).

    encoder_decoder: encoder_input_tokens [rows, inputs] and decoder_* [rows, targets]. Decoder-only:
    decoder_* [rows, inputs + targets] holding prompt + answer, the prompt without loss; prefix_lm adds
    decoder_causal_attention over BOS + prompt (read both ways)."""
    rows = len(prompts)
    if encoder_decoder:
        length = lengths["targets"]
        encoder = np.zeros((rows, lengths["inputs"]), np.int32)
        targets, weights = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            encoder[i, : len(prompt)] = prompt[: lengths["inputs"]]
            answer = list(answer)[:length]
            targets[i, : len(answer)], weights[i, : len(answer)] = answer, 1
        features = {"encoder_input_tokens": encoder}
    else:
        length = lengths["inputs"] + lengths["targets"]
        targets, weights = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
        segments, causal = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            prompt, answer = list(prompt)[: lengths["inputs"]], list(answer)[: lengths["targets"]]
            end = len(prompt) + len(answer)
            targets[i, :end] = prompt + answer
            weights[i, len(prompt):end] = 1
            segments[i, :end] = 1
            causal[i, : len(prompt) + 1] = 1  # BOS and the prompt, as seqio's prefix-LM converter marks them
        features = {"decoder_causal_attention": causal} if prefix_lm else {}
        features["decoder_segment_ids"] = segments
    inputs = np.concatenate([np.zeros((rows, 1), np.int32), targets[:, :-1]], axis=1)
    features.update(decoder_target_tokens=targets, decoder_input_tokens=inputs, decoder_loss_weights=weights)
    if encoder_decoder:
        features["decoder_segment_ids"] = weights.copy()
    return features


def prompt_ids(batch: Mapping[str, np.ndarray], *, encoder_decoder: bool) -> list[list[int]]:
    """The prompts' tokens (EOS included, no padding) of a prompt batch: encoder inputs, or the part of a
    prefix-LM row that decoder_causal_attention marks (after BOS)."""
    if encoder_decoder:
        return [row[row > 0].tolist() for row in batch["encoder_input_tokens"]]
    ends = batch["decoder_causal_attention"].sum(axis=1)
    return [row[1:end].tolist() for row, end in zip(batch["decoder_input_tokens"], ends, strict=True)]


def completion_ids(tokens: np.ndarray, eos_id: int) -> list[list[int]]:
    """Sampled tokens [rows, length] -> each completion up to and including its first EOS (all of it
    if it has none: truncated), as TRL's completion mask keeps them."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return out


def reward_values(reward_fns: Sequence[tuple[str, Callable]], prompts: list[str], completions: list[str]
                  ) -> dict[str, np.ndarray]:
    """{name: rewards [completions] float32} of each reward function; a wrong count or a value that is
    not a finite number stops the run with the function's name."""
    out = {}
    for name, fn in reward_fns:
        values = np.asarray(fn(list(prompts), list(completions)), np.float64)
        if values.shape != (len(completions),) or not np.all(np.isfinite(values)):
            raise UserError(f"Reward {name!r} returned {values.shape} values for {len(completions)} completions, "
                            "or values that are not finite numbers: return one float per completion.")
        out[name] = values.astype(np.float32)
    return out


class RolloutBatches:
    """The train stream of a GRPO run: an iterator of completion batches (see the module docstring)
    whose position is its prompt stream's (save / restore, as checkpoints.CheckpointableIterator).

    prompts: host-local prompt batches ([prompts, ...] features of the run's task; decoder-only: the
    prefix-LM features). decode(ids) -> text. reward_fns: (name, fn) pairs, summed with weights.
    Call follow(state_fn) before the first next(): state_fn() -> the current TrainState."""

    def __init__(self, prompts, *, model: Model, adaptation: adaptation_lib.Adaptation, config: GRPOConfig,
                 reward_fns: Sequence[tuple[str, Callable]], decode: Callable[[list[int]], str],
                 lengths: Mapping[str, int], mesh, rules, seed: int = 0, prefix_lm: bool = True, eos_id: int = 1):
        self.prompts, self.model, self.config, self.reward_fns = prompts, model, config, list(reward_fns)
        self.decode, self.lengths, self.mesh, self.prefix_lm = decode, dict(lengths), mesh, prefix_lm
        self.weights = np.asarray(config.reward_weights or [1.0] * len(self.reward_fns), np.float32)
        self.seed, self.eos_id = seed, eos_id
        self._state_fn: Callable[[], Any] | None = None
        self._last: dict[str, np.ndarray] | None = None
        self._uses_left = 0
        self.decode_config = DecodeConfig(method="sample", max_decode_length=self.lengths["targets"],
                                          temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                          eos_id=eos_id)
        self._rows_spec = partitioning.batch_sharding(mesh).spec

        def sample(state_params, batch, rng):
            params = adaptation.model_params(state_params)
            return model.predict_batch(params, batch, self.decode_config, rng, bidirectional_prompt=prefix_lm)[0]

        def old_logps(state_params, rows):
            return grpo.token_logps(model, adaptation.step_params(state_params), rows, config.temperature)[0]

        rows_sharding = partitioning.batch_sharding(mesh)
        self._sample = jax.jit(partitioning.with_sharding_rules(sample, mesh, rules), out_shardings=rows_sharding)
        self._old_logps = jax.jit(partitioning.with_sharding_rules(old_logps, mesh, rules), out_shardings=rows_sharding)

    def follow(self, state_fn: Callable[[], Any]) -> None:
        """Samples from state_fn()'s params from now on (the train loop's current state)."""
        self._state_fn = state_fn

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._uses_left == 0:
            self._last, self._uses_left = self.generate(self._state_fn()), self.config.num_iterations
        self._uses_left -= 1
        return self._last

    def generate(self, state) -> dict[str, np.ndarray]:
        """A batch of completions [prompts * G rows] sampled from `state` (a TrainState) and scored."""
        g = self.config.num_generations
        prompts = next(self.prompts)
        encoder_decoder = self.model.config.is_encoder_decoder
        keys = ["encoder_input_tokens"] if encoder_decoder else ["decoder_input_tokens", "decoder_causal_attention"]
        repeated = {k: np.repeat(prompts[k], g, axis=0) for k in keys}
        rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step)
        with jax.set_mesh(self.mesh):
            tokens = self._sample(state.params, partitioning.shard_batch(repeated, self.mesh),
                                  partitioning.replicated(np.asarray(rng), self.mesh))
        tokens = np.asarray(multihost_utils.global_array_to_host_local_array(tokens, self.mesh, self._rows_spec))
        completions = completion_ids(tokens, self.eos_id)
        prompt_tokens = [p for p in prompt_ids(prompts, encoder_decoder=encoder_decoder) for _ in range(g)]
        rows = answer_features(prompt_tokens, completions, self.lengths, encoder_decoder=encoder_decoder,
                               prefix_lm=self.prefix_lm)
        if self.config.mask_truncated_completions:
            truncated = np.array([c[-1] != self.eos_id for c in completions])
            rows["decoder_loss_weights"][truncated] = 0
        texts = [[self.decode(ids[:-1] if ids and ids[-1] == self.eos_id else ids) for ids in side]
                 for side in (prompt_tokens, completions)]
        rows.update(self.score(*texts))
        if self.config.num_iterations > 1:  # the sampling policy's log-probs: the old policy of mu updates
            with jax.set_mesh(self.mesh):
                logps = self._old_logps(state.params, partitioning.shard_batch(rows, self.mesh))
            rows["old_logps"] = np.asarray(
                multihost_utils.global_array_to_host_local_array(logps, self.mesh, self._rows_spec))
        return rows

    def score(self, prompts: list[str], completions: list[str]) -> dict[str, np.ndarray]:
        """The reward features of one batch: rewards (weighted sum), group advantages, each group's
        reward std, and per function rewards/<name> when there are several."""
        per_function = reward_values(self.reward_fns, prompts, completions)
        total = sum(w * r for w, r in zip(self.weights, per_function.values(), strict=True)).astype(np.float32)
        advantages, group_std = grpo.group_advantages(total, self.config.num_generations, self.config.scale_rewards)
        out = {"rewards": total, "advantages": advantages, "group_reward_std": group_std}
        if len(per_function) > 1:
            out.update({f"{grpo.REWARD_PREFIX}{name}": r for name, r in per_function.items()})
        return out

    def save(self, prefix: str) -> None:
        self.prompts.save(prefix)

    def restore(self, prefix: str) -> None:
        self.prompts.restore(prefix)
        self._last, self._uses_left = None, 0
