"""GRPO: the advantages and the loss on a hand-worked group and against TRL 1.16's GRPOTrainer, group
sampling, the reference model (LoRA base or a frozen copy), microbatches, mu > 1, the rewards, the
arithmetic task, and an end-to-end run of gin/runs/grpo.gin whose reward rises."""

import collections
import functools
import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite import adaptation as adaptation_lib
from t5lite import grpo, partitioning, rewards, rollouts, trainer
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model
from t5lite.run_config import GRPOConfig, LossConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 8, "targets": 4}
ENC_DEC = TransformerConfig(vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                            num_encoder_layers=1, num_decoder_layers=1)
G = 4


# --- Advantages and loss, by hand ------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards_ = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    advantages, group_std = grpo.group_advantages(rewards_, 4, "group")
    # Group 1: mean 0.5, std (Bessel) sqrt((4 * 0.25) / 3) = 0.57735; (r - 0.5) / (0.57735 + 1e-4) = +-0.865875.
    # Group 2: every reward equal: std 0, advantage 0 (it teaches nothing).
    np.testing.assert_allclose(advantages, [0.865875, -0.865875, -0.865875, 0.865875, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(group_std, [0.57735] * 4 + [0.0] * 4, atol=1e-5)
    # "none" (Dr. GRPO): r - mean. "batch": divided by the std of all 8 rewards, sqrt(5.5 / 7) = 0.886405.
    np.testing.assert_allclose(grpo.group_advantages(rewards_, 4, "none")[0], [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    np.testing.assert_allclose(grpo.group_advantages(rewards_, 4, "batch")[0],
                               [0.564012, -0.564012, -0.564012, 0.564012, 0, 0, 0, 0], atol=1e-6)


# Two completions of one prompt, advantages +1 and -1, eps 0.2, beta 0.1. Completion 0 has 2 tokens,
# completion 1 one (its second position is padding). Per token (log-probs as probabilities):
#   c0 t0: pi .5, old .4 -> ratio 1.25, clipped 1.2: -min(1.25, 1.2) = -1.2 (clipped: no gradient); ref = pi, k3 0
#   c0 t1: pi .25, old .25 -> ratio 1: -1; ref .5: k3 = exp(log 2) - log 2 - 1 = 0.306853, + 0.1 * k3 -> -0.969315
#          gradient w.r.t. log pi: -A ratio + beta (1 - exp(ref - pi)) = -1 + 0.1 * (1 - 2) = -1.1
#   c1 t0: pi .2, old .2 / .75 -> ratio .75, clipped .8: -min(-.75, -.8) = .8 (clipped: no gradient); ref = pi
# Token sum -1.369315 over 3 tokens; clipped low 1 token (ratio < .8, A < 0), high 1 token (ratio > 1.2, A > 0).
HAND = {"logps": np.log([[0.5, 0.25], [0.2, 1.0]]), "old": np.log([[0.4, 0.25], [0.2 / 0.75, 1.0]]),
        "ref": np.log([[0.5, 0.5], [0.2, 1.0]]), "advantages": np.array([1.0, -1.0]),
        "mask": np.array([[1, 1], [1, 0]])}
HAND_LOSS = {"dapo": -1.369315 / 3,                   # / tokens of the batch
             "grpo": (-2.169315 / 2 + 0.8 / 1) / 2,   # mean per completion, then over completions
             "dr_grpo": -1.369315 / (2 * 2)}          # / (completions * max completion length)
HAND_GRAD = {"dapo": -1.1 / 3, "grpo": -1.1 / 2 / 2, "dr_grpo": -1.1 / 4}  # d loss / d log pi(c0 t1); else 0


def _ours(config: GRPOConfig, logps, old, ref, advantages, mask):
    """(loss, its gradient w.r.t. the per-token log-probs, normalized metrics) from t5lite.grpo."""
    mask = jnp.asarray(mask, jnp.float32)

    def loss(lp):
        losses, values = grpo.token_losses(config, lp, jnp.asarray(old), jnp.asarray(advantages),
                                           jnp.asarray(ref) if config.beta else None)
        total, normalizer = grpo.reduce_losses(config, losses, mask)
        return total / normalizer, {k: jnp.sum(v * mask) / jnp.sum(mask) for k, v in values.items()}

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logps, jnp.float32))
    return float(value), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_loss_and_gradient_on_a_hand_worked_group(loss_type):
    config = GRPOConfig(beta=0.1, epsilon=0.2, loss_type=loss_type)
    value, grad, metrics = _ours(config, HAND["logps"], HAND["old"], HAND["ref"], HAND["advantages"], HAND["mask"])
    assert value == pytest.approx(HAND_LOSS[loss_type], abs=1e-6)
    expected = np.zeros((2, 2))
    expected[0, 1] = HAND_GRAD[loss_type]
    np.testing.assert_allclose(grad * HAND["mask"], expected, atol=1e-6)
    assert metrics["kl"] == pytest.approx(0.306853 / 3, abs=1e-6)
    assert metrics["clip_ratio/low_mean"] == metrics["clip_ratio/high_mean"] == pytest.approx(1 / 3)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(2 / 3)


# --- Against TRL 1.16 (requirements-test.txt) -----------------------------------------------------------------

def _trl_loss(config: GRPOConfig, logps, old, ref, advantages, mask):
    """TRL's GRPOTrainer._compute_loss on these log-probs: a stand-in returns them as the model's per-token
    log-probs; the old and reference log-probs come in as the generation step would have stored them."""
    import torch
    from trl import GRPOTrainer

    policy = torch.tensor(logps, requires_grad=True)
    rows, length = policy.shape
    identity = lambda x: x  # noqa: E731
    trl = object.__new__(GRPOTrainer)
    trl.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (policy, torch.zeros(rows, length), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=config.beta, loss_type=config.loss_type, epsilon_low=config.epsilon, epsilon_high=config.epsilon_high,
        use_vllm=False, vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=length, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": collections.defaultdict(list)},
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        accelerator=types.SimpleNamespace(num_processes=1, gather=identity, reduce=lambda x, reduction: x))
    mask_t = torch.tensor(mask, dtype=torch.long)
    inputs = {"prompt_ids": torch.ones(rows, 3, dtype=torch.long), "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
              "completion_ids": torch.ones(rows, length, dtype=torch.long), "completion_mask": mask_t,
              "advantages": torch.tensor(advantages), "old_per_token_logps": torch.tensor(old),
              "ref_per_token_logps": torch.tensor(ref), "num_items_in_batch": mask_t.sum()}
    loss = trl._compute_loss(None, inputs)
    loss.backward()
    return float(loss.detach()), policy.grad.numpy(), {k: v[-1] for k, v in trl._metrics["train"].items()}


def _random_group(seed: int, rows: int = 8, length: int = 6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, rows)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    logps = -rng.uniform(0.05, 3.0, (rows, length))
    old = logps + rng.normal(0.0, 0.3, (rows, length))  # a policy some updates past its samples
    ref = logps + rng.normal(0.0, 0.5, (rows, length))
    advantages = grpo.group_advantages(rng.integers(0, 2, rows).astype(float), 4)[0].astype(np.float64)
    return logps, old, ref, advantages, mask


def test_the_hand_worked_group_is_trls_loss():
    config = GRPOConfig(beta=0.1, epsilon=0.2, loss_type="dapo")
    value, grad, metrics = _trl_loss(config, HAND["logps"], HAND["old"], HAND["ref"], HAND["advantages"], HAND["mask"])
    assert value == pytest.approx(HAND_LOSS["dapo"], abs=1e-6)
    assert grad[0, 1] == pytest.approx(HAND_GRAD["dapo"], abs=1e-6)
    assert metrics["kl"] == pytest.approx(0.306853 / 3, abs=1e-6)


@pytest.mark.parametrize("loss_type, beta, epsilon_high", [("dapo", 0.0, None), ("dapo", 0.04, 0.28),
                                                           ("grpo", 0.04, None), ("dr_grpo", 0.1, None)])
def test_loss_gradient_and_metrics_equal_trl(loss_type, beta, epsilon_high):
    config = GRPOConfig(beta=beta, loss_type=loss_type, epsilon_high=epsilon_high)
    group = _random_group(seed=len(loss_type) + int(100 * beta))
    value, grad, metrics = _ours(config, *group)
    trl_value, trl_grad, trl_metrics = _trl_loss(config, *group)
    mask = group[-1]
    assert value == pytest.approx(trl_value, rel=1e-5)
    np.testing.assert_allclose(grad * mask, trl_grad * mask, rtol=1e-4, atol=1e-7)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", *(["kl"] if beta else [])):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-7), name
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # the group exercises the clipping


def test_advantages_equal_trls():
    """TRL computes them inside GRPOTrainer._generate_and_score_completions; reproduced here from
    trl/trainer/grpo_trainer.py (1.16, lines 2761-2788, sum_then_normalize) with TRL's own nanstd."""
    import torch
    from trl.trainer.utils import nanstd

    rewards_ = np.random.default_rng(0).normal(size=24).round(1)
    rewards_[:4] = 1.0  # a group with zero std
    t = torch.tensor(rewards_)
    mean = torch.nanmean(t.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    for scale in ("group", "batch", "none"):
        std = nanstd(t.view(-1, G), dim=1).repeat_interleave(G, dim=0) if scale != "batch" else nanstd(t).expand_as(t)
        expected = t - mean
        if scale != "none":
            expected = expected / (std + 1e-4)
        np.testing.assert_allclose(grpo.group_advantages(rewards_, G, scale)[0], expected.numpy(), rtol=1e-5, atol=1e-6)


# --- Rollouts on a tiny model ------------------------------------------------------------------------------------

def _prompt_batches(vocabulary, texts):
    """A prompt stream (encoder-decoder features) cycling over `texts`, half of them a batch."""
    eos = vocabulary.eos_id
    encoder = np.zeros((len(texts), LENGTHS["inputs"]), np.int32)
    for i, text in enumerate(texts):
        row = list(vocabulary.encode(text))[: LENGTHS["inputs"] - 1] + [eos]
        encoder[i, : len(row)] = row
    half = len(texts) // 2
    while True:
        yield {"encoder_input_tokens": encoder[:half]}
        yield {"encoder_input_tokens": encoder[half:]}


def _characters(prompts, completions):
    """A reward with spread at random init: the completion's length in characters."""
    return [float(len(c)) for c in completions]


def _setup(adaptation=None, num_iterations: int = 1, num_microbatches: int = 1) -> types.SimpleNamespace:
    """A GRPO program of the tiny model (beta 0.04, AdamW) on a one-device-per-core mesh: .step() its jitted
    train step, .stream its RolloutBatches (4 prompts x G completions a batch) sampling from .follow(state)."""
    from t5lite.data.vocab import get_default_vocabulary

    model = Model(ENC_DEC)
    adaptation = adaptation or adaptation_lib.FullAdaptation()
    # A random model's next-token distribution is nearly uniform over 8192 tokens: at temperature 0.25
    # a few dozen tokens share it, so the samples of a group differ and the policy can move in a few steps.
    config = GRPOConfig(enabled=True, rewards=("characters",), num_generations=G, beta=0.04,
                        num_iterations=num_iterations, temperature=0.25)
    mesh, rules = partitioning.make_mesh(), partitioning.axis_rules("dp")
    tx = optax.adamw(1e-2)
    init = trainer.make_sharded_init(model, tx, model.input_shapes(4 * G, LENGTHS), mesh, rules, adaptation,
                                     keep_reference=grpo.keeps_reference_copy(config, adaptation))
    step = functools.cache(lambda: trainer.jit_train_step(
        model, tx, optax.constant_schedule(1e-2), init, mesh, rules, loss_config=LossConfig(), use_dropout=False,
        num_microbatches=num_microbatches, adaptation=adaptation, grpo=config))  # compiled on first use
    vocabulary = get_default_vocabulary()
    texts = ["1+2=", "3+4=", "10-7=", "19+19=", "5-5=", "0+0=", "8+1=", "2-1="]
    # One stream per program (its sampler compiles once): the tests follow their own states with it.
    stream = rollouts.RolloutBatches(_prompt_batches(vocabulary, texts), model=model, adaptation=adaptation,
                                     config=config, reward_fns=[("characters", _characters)],
                                     decode=vocabulary.decode, lengths=LENGTHS, mesh=mesh, rules=rules)
    holder = []

    def follow(state):
        """The stream now samples from holder[0], which starts as `state` (and _train moves on)."""
        holder[:] = [state]
        stream.follow(lambda: holder[0])
        return holder

    return types.SimpleNamespace(model=model, config=config, mesh=mesh, rules=rules, init=init, step=step,
                                 adaptation=adaptation, stream=stream, follow=follow, tx=tx)


def _train(setup, holder: list, steps: int) -> list[dict[str, float]]:
    """`steps` train steps of holder[0] (the state the stream samples from) on the stream's batches."""
    history = []
    for _ in range(steps):
        holder[0], metrics = setup.step()(holder[0], partitioning.shard_batch(next(setup.stream), setup.mesh),
                                          jax.random.PRNGKey(0))
        history.append({k: float(v) for k, v in metrics.items()})
    return history


@pytest.fixture(scope="module")
def full_setup():
    return _setup(num_microbatches=2)


def test_group_sampling_gives_each_prompt_different_completions(full_setup):
    state = full_setup.init.init_fn(jax.random.PRNGKey(0))
    full_setup.follow(state)
    batch = next(full_setup.stream)
    targets = batch["decoder_target_tokens"]
    assert targets.shape == (4 * G, LENGTHS["targets"])
    for group in range(4):
        rows = slice(group * G, (group + 1) * G)
        assert len(np.unique(batch["encoder_input_tokens"][rows], axis=0)) == 1  # one prompt per group
        assert len({tuple(r) for r in targets[rows]}) == G  # G different completions of it
        assert abs(batch["advantages"][rows].mean()) < 1e-5  # advantages are relative to the group
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], targets[:, :-1])  # teacher forcing
    assert batch["rewards"].std() > 0
    # The next batch samples the next prompts; a state one step on draws other samples of the same prompts.
    assert not np.array_equal(next(full_setup.stream)["encoder_input_tokens"], batch["encoder_input_tokens"])
    full_setup.follow(state.replace(step=state.step + 1))
    later = next(full_setup.stream)
    np.testing.assert_array_equal(later["encoder_input_tokens"], batch["encoder_input_tokens"])
    assert not np.array_equal(later["decoder_target_tokens"], targets)


def test_full_fine_tuning_keeps_a_frozen_reference_and_the_reward_rises(full_setup):
    state = full_setup.init.init_fn(jax.random.PRNGKey(0))
    assert isinstance(state, trainer.PreferenceTrainState)  # beta > 0 without LoRA: a frozen copy
    start = jax.tree_util.tree_map(np.asarray, state.reference)
    holder = full_setup.follow(state)
    history = _train(full_setup, holder, 12)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert history[-1]["kl"] > 1e-4
    assert all(h["clip_ratio/region_mean"] == 0 for h in history)  # mu = 1: the ratio is 1
    rewards_ = [h["reward"] for h in history]
    assert np.mean(rewards_[-4:]) > np.mean(rewards_[:4]) + 2.0, rewards_  # characters per completion
    assert {"reward_std", "frac_reward_zero_std", "entropy", "completions/mean_length",
            "completions/clipped_ratio", "num_completions"} <= set(history[0])
    assert history[0]["num_completions"] == 4 * G
    for ref, now in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(holder[0].reference),
                        strict=True):
        np.testing.assert_array_equal(ref, now)


def test_two_microbatches_give_the_loss_of_the_whole_batch(full_setup):
    """full_setup's step splits its 16 completions into 2 microbatches; the loss sums and counts of the two
    add up, and the one division gives the loss of the whole batch at once."""
    state = full_setup.init.init_fn(jax.random.PRNGKey(0))
    state = state.replace(params=jax.tree_util.tree_map(lambda x: x * 1.05, state.params))  # away from the reference
    full_setup.follow(state)
    batch = next(full_setup.stream)
    whole = jax.jit(lambda params, reference, rows: grpo.normalize_sums(grpo.loss_sums(
        full_setup.model, params, rows, config=full_setup.config, reference_params=reference)[1]))
    expected = whole(state.params, state.reference, batch)
    _, metrics = full_setup.step()(state, partitioning.shard_batch(batch, full_setup.mesh), jax.random.PRNGKey(0))
    for name in ("loss", "kl", "reward", "reward_std", "entropy", "num_tokens"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, atol=1e-8, err_msg=name)
    assert float(metrics["kl"]) > 0


def test_lora_with_two_iterations_per_batch(full_setup):
    """LoRA: the frozen base is the reference (no second copy); num_iterations 2: each batch is used twice,
    against the log-probs of the policy that sampled it."""
    lora = adaptation_lib.LoraAdaptation(patterns=(r"(query|value|wi_0|wo)$",), rank=4)
    setup = _setup(adaptation=lora, num_iterations=2)
    assert type(setup.init.abstract_state) is trainer.TrainState  # no second copy of the params
    # The state of the step-0 params (full_setup's reference), made without compiling another init.
    adapted = lora.adapt(full_setup.init.init_fn(jax.random.PRNGKey(0)).reference, jax.random.PRNGKey(0))
    state = jax.device_put(trainer.TrainState(step=jnp.zeros((), jnp.int32), params=adapted,
                                              opt_state=setup.tx.init(lora.trainable_params(adapted))),
                           setup.init.state_shardings)  # as the step returns it: one compiled step
    holder = setup.follow(state)
    first = next(setup.stream)
    logps = jax.jit(lambda p, rows: grpo.token_logps(setup.model, lora.step_params(p), rows, 0.25)[0])
    np.testing.assert_allclose(first["old_logps"], logps(state.params, first), rtol=1e-5, atol=1e-5)  # the sampler's
    assert next(setup.stream) is first  # used for 2 updates
    history = _train(setup, holder, 6)  # from the next batch on
    # b starts at zero: the policy starts as the base, the reference; then the adapters move it away.
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6) and history[-1]["kl"] > 1e-5
    # The first update of a batch has ratio 1; the second meets a policy that moved: some ratios leave [0.8, 1.2].
    assert all(h["clip_ratio/region_mean"] == 0 for h in history[0::2])
    assert any(h["clip_ratio/region_mean"] > 0 for h in history[1::2]), history


# --- Features, rewards, the task ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["encoder_decoder", "prefix_lm"])
def test_completion_rows_are_laid_out_as_seqios_converters_lay_them_out(model_type):
    import seqio
    import tensorflow as tf

    prompts, answers = [[5, 6, 7, 1], [8, 1]], [[9, 10, 1], [11, 1]]
    converter = {"encoder_decoder": seqio.EncDecFeatureConverter, "prefix_lm": seqio.PrefixLMFeatureConverter}
    dataset = tf.data.Dataset.from_generator(
        lambda: ({"inputs": p, "targets": a} for p, a in zip(prompts, answers, strict=True)),
        output_signature={k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets")})
    expected = list(converter[model_type](pack=False)(dataset, LENGTHS).as_numpy_iterator())
    rows = rollouts.answer_features(prompts, answers, LENGTHS, encoder_decoder=model_type == "encoder_decoder")
    for name in expected[0]:
        np.testing.assert_array_equal(rows[name], np.stack([e[name] for e in expected]), err_msg=name)
    ids = rollouts.prompt_ids(rows, encoder_decoder=model_type == "encoder_decoder")
    assert ids == prompts
    assert rollouts.completion_ids(np.array([[9, 1, 0, 0], [3, 4, 5, 6]]), eos_id=1) == [[9, 1], [3, 4, 5, 6]]


def test_arithmetic_rewards_and_task():
    from t5lite.data import arithmetic

    prompts = ["12+7=", "12+7=", "12+7=", "9-4=", "9-4="]
    completions = ["19", " 19 ", "18", "5", "five"]
    assert rewards.resolve("arithmetic_exact")(prompts, completions) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert rewards.resolve("arithmetic_format")(prompts, completions) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert rewards.resolve("arithmetic_partial")(prompts, completions) == [1.0, 1.0, 0.5, 1.0, 0.0]
    assert rewards.resolve("test_grpo:_characters") is _characters  # "module:function"
    with pytest.raises(UserError, match="unknown reward"):
        rewards.resolve("arithmetic_exakt")
    with pytest.raises(UserError, match="returned"):
        rollouts.reward_values([("short", lambda p, c: [1.0])], ["a", "b"], ["c", "d"])
    split = arithmetic.problems(max_operand=19, operators="+-", num_validation=100, seed=0)
    assert len(split["train"]) + len(split["validation"]) == 400 + 210
    assert not {r["inputs"] for r in split["train"]} & {r["inputs"] for r in split["validation"]}
    assert all(str(arithmetic.answer_of(r["inputs"])) == r["targets"] for r in split["train"])


def test_a_classifier_checkpoint_as_the_reward(full_setup, tmp_path):
    """ClassifierReward scores each completion with a t5lite checkpoint's log-probability of a label (its model
    configured under the gin scope reward_model/), or with labels, the label's probability among them."""
    import gin

    from t5lite import checkpoints

    saver = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), save_every=1, async_save=False)
    saver.save(1, full_setup.init.init_fn(jax.random.PRNGKey(0)), force=True)
    saver.close()
    for name in ("emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers", "num_decoder_layers"):
        gin.bind_parameter(f"reward_model/TransformerConfig.{name}", getattr(ENC_DEC, name))
    reward = rewards.ClassifierReward(str(tmp_path / "checkpoints" / "1"), template="sst2 sentence: {completion}",
                                      label="negative", labels=["positive", "negative"], batch_size=4)
    prompts, completions = ["p"] * 5, ["a fine film", "dull", "", "so so", "the best thing of the year"]
    logps = reward.label_logps(prompts, completions)
    assert logps.shape == (5, 2) and np.all(logps < 0)
    np.testing.assert_allclose(reward(prompts, completions), np.exp(logps[:, 1]) / np.exp(logps).sum(1), rtol=1e-6)
    np.testing.assert_allclose(reward.label_logps(prompts[:2], completions[:2]), logps[:2], rtol=1e-5)  # padding
    assert len(set(logps[:, 0].round(5))) == 5  # the completion is read


def test_bad_grpo_settings_say_what_to_do():
    with pytest.raises(UserError, match="rewards is empty"):
        GRPOConfig(enabled=True)
    with pytest.raises(UserError, match="num_generations"):
        GRPOConfig(enabled=True, rewards=("arithmetic_exact",), num_generations=1)
    with pytest.raises(UserError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(UserError, match="reward_weights"):
        GRPOConfig(rewards=("a", "b"), reward_weights=(1.0,))


# --- End to end ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_grpo_recipe_raises_the_reward_end_to_end(tmp_path):
    """gin/runs/grpo.gin from scratch on a tiny model with a reward given as "module:function" (the
    completion's length in characters, which a random model's samples at temperature 0.25 spread): the
    mean reward rises, the GRPO metrics reach metrics.jsonl, and the arithmetic eval runs."""
    (tmp_path / "length_reward.py").write_text(
        "def characters(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    model_dir = tmp_path / "run"
    flags = [f"--gin.MODEL_DIR='{model_dir}'", "--gin.INITIAL_CHECKPOINT=None", "--gin.TRAIN_STEPS=16",
             "--gin.BATCH_SIZE=32", "--gin.GRPOConfig.rewards=['length_reward:characters']",
             "--gin.GRPOConfig.num_generations=4", "--gin.GRPOConfig.temperature=0.25",
             "--gin.make_schedule.learning_rate=1e-2",
             "--gin.LoopConfig.log_every=4", "--gin.EvalConfig.every=16", "--gin.EvalConfig.infer_every=16",
             "--gin.EvalConfig.infer_examples=16", "--gin.CheckpointConfig.every=16"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, str(tmp_path)])}
    result = subprocess.run([sys.executable, "-m", "t5lite.train", "--gin_file=gin/runs/grpo.gin", *flags], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| reward " in result.stdout and "| kl " in result.stdout
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["group"] == "train"]
    assert len(train) == 4 and all({"loss", "reward", "reward_std", "kl", "clip_ratio/region_mean",
                                     "completions/mean_length", "entropy"} <= set(r) for r in train)
    assert train[-1]["reward"] > train[0]["reward"] + 2.0, [r["reward"] for r in train]
    assert any(r["group"] == "infer_eval/arithmetic" and "accuracy" in r for r in rows)
    assert math.isfinite(train[-1]["loss"])
