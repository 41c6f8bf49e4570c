"""Preference tuning (DPO, IPO, SimPO): the losses and gradients against TRL's own code, the pair
batches, the reference model, gradient accumulation, bad data, and an end-to-end run of gin/runs/dpo.gin."""

import collections
import json
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
from t5lite import partitioning, preference, trainer
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model
from t5lite.run_config import LossConfig, PreferenceConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 32, "targets": 24}
ENC_DEC = TransformerConfig(vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                            num_encoder_layers=1, num_decoder_layers=1)
DECODER_ONLY = TransformerConfig(architecture="decoder_only", vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16,
                                 mlp_dim=64, num_decoder_layers=1)


# --- The losses against TRL 1.16 (requirements-test.txt) ----------------------------------------------------

def _random_pairs(seed: int, pairs: int = 6, length: int = 7):
    """Per-token policy log-probs [2 * pairs, length] (TRL's [chosen..., rejected...] order) with a
    completion mask of 1..length tokens per row, and reference sequence log-probs [pairs] x 2."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, 2 * pairs)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float64)
    per_token = -rng.uniform(0.05, 3.0, (2 * pairs, length)) * mask
    reference = per_token.sum(1) + rng.normal(0.0, 2.0, 2 * pairs)
    return per_token, mask, reference[:pairs], reference[pairs:]


def _ours(config: PreferenceConfig, per_token, mask, ref_chosen, ref_rejected):
    """(mean loss, its gradient w.r.t. the sequence log-probs [2 * pairs] in TRL's order, metrics)."""
    pairs = len(per_token) // 2
    counts = mask.sum(1).reshape(2, pairs).T

    def loss(seq_logps):
        logps = seq_logps.reshape(2, pairs).T  # [pairs, (chosen, rejected)]
        reference = None if config.objective == "simpo" else jnp.stack([ref_chosen, ref_rejected], 1)
        losses, rewards = preference.pair_losses(config, logps, reference, counts)
        return jnp.mean(losses), rewards

    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(lambda s: loss(s)[0])(jnp.asarray(per_token.sum(1)))
        rewards = loss(jnp.asarray(per_token.sum(1)))[1]
        return float(value), np.asarray(grad), np.asarray(rewards)


def _trl_dpo(loss_type: str, beta: float, per_token, mask, ref_chosen, ref_rejected):
    """TRL's DPOTrainer._compute_loss on these log-probs: a stand-in model returns them as its
    per-token log-probs, the reference log-probs come in as precomputed (precompute_ref_logps)."""
    import torch
    from trl import DPOTrainer

    logps = torch.tensor(per_token, requires_grad=True)
    rows, length = per_token.shape
    # TRL shifts the completion mask by one (labels are next tokens): a prompt token comes first.
    completion = torch.tensor(np.concatenate([np.zeros((rows, 1)), mask], 1), dtype=torch.long)

    class Policy:
        training = True

        def __call__(self, **kwargs):
            zeros = torch.zeros(rows, length)
            return types.SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros,
                                         is_top1=torch.zeros(rows, length, dtype=torch.bool))

    identity = lambda x: x  # noqa: E731
    dpo = object.__new__(DPOTrainer)
    dpo.__dict__.update(
        beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=0.0, f_divergence_type="reverse_kl",
        ld_alpha=None, precompute_ref_logps=True, use_weighting=False, aux_loss_enabled=False, model=Policy(),
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=identity, gather=identity),
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(rows, length + 1, dtype=torch.long),
              "attention_mask": torch.ones_like(completion), "completion_mask": completion,
              "ref_chosen_logps": torch.tensor(ref_chosen), "ref_rejected_logps": torch.tensor(ref_rejected)}
    loss = dpo._compute_loss(Policy(), inputs, return_outputs=False)
    loss.backward()
    grad = (logps.grad.numpy() * mask).sum(1) / mask.sum(1)  # d loss / d (sequence log-prob), per row
    return float(loss.detach()), grad, {k: v[-1] for k, v in dpo._metrics["train"].items()}


def _trl_cpo(loss_type: str, beta: float, label_smoothing: float, gamma: float, chosen, rejected):
    """TRL's CPOTrainer.cpo_loss (mean over pairs) and its gradient w.r.t. its two inputs."""
    import torch
    from trl.experimental.cpo import CPOTrainer

    cpo = object.__new__(CPOTrainer)
    cpo.__dict__.update(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                        simpo_gamma=gamma, accelerator=types.SimpleNamespace(device="cpu"))
    chosen, rejected = torch.tensor(chosen, requires_grad=True), torch.tensor(rejected, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = cpo.cpo_loss(chosen, rejected)
    losses.mean().backward()
    return (float(losses.mean().detach()), np.concatenate([chosen.grad.numpy(), rejected.grad.numpy()]),
            np.stack([chosen_rewards.numpy(), rejected_rewards.numpy()], 1))


@pytest.mark.parametrize("objective, trl_loss, beta", [("dpo", "sigmoid", 0.1), ("dpo", "sigmoid", 0.7),
                                                       ("ipo", "ipo", 0.1), ("ipo", "ipo", 0.5)])
def test_dpo_and_ipo_losses_and_gradients_equal_trl(objective, trl_loss, beta):
    per_token, mask, ref_chosen, ref_rejected = _random_pairs(seed=int(beta * 10))
    config = PreferenceConfig(objective=objective, beta=beta)
    loss, grad, rewards = _ours(config, per_token, mask, ref_chosen, ref_rejected)
    trl_value, trl_grad, trl_metrics = _trl_dpo(trl_loss, beta, per_token, mask, ref_chosen, ref_rejected)
    np.testing.assert_allclose(loss, trl_value, rtol=1e-6)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-6, atol=1e-9)
    # The logged rewards are TRL's too.
    np.testing.assert_allclose(rewards.mean(0), [trl_metrics["rewards/chosen"], trl_metrics["rewards/rejected"]],
                               rtol=1e-6)
    np.testing.assert_allclose((rewards[:, 0] > rewards[:, 1]).mean(), trl_metrics["rewards/accuracies"])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_loss_and_gradients_equal_trl_cpo(label_smoothing):
    """SimPO is TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0, on per-token averaged log-probs."""
    per_token, mask, _, _ = _random_pairs(seed=3)
    config = PreferenceConfig(objective="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=label_smoothing)
    loss, grad, rewards = _ours(config, per_token, mask, None, None)
    average = per_token.sum(1) / mask.sum(1)
    pairs = len(average) // 2
    trl_value, trl_grad_avg, trl_rewards = _trl_cpo("simpo", 2.0, label_smoothing, 0.7, average[:pairs],
                                                    average[pairs:])
    np.testing.assert_allclose(loss, trl_value, rtol=1e-6)
    np.testing.assert_allclose(grad, trl_grad_avg / mask.sum(1), rtol=1e-6, atol=1e-9)  # chain rule through the mean
    np.testing.assert_allclose(rewards, trl_rewards, rtol=1e-6)


def test_dpo_label_smoothing_is_trls_conservative_sigmoid():
    """TRL 1.16's DPO "sigmoid" has no label smoothing; its smoothed sigmoid (conservative DPO, TRL's DPO
    before 1.0) lives on in CPOTrainer's "sigmoid", which applied to the log-ratios is smoothed DPO."""
    per_token, mask, ref_chosen, ref_rejected = _random_pairs(seed=5)
    config = PreferenceConfig(objective="dpo", beta=0.3, label_smoothing=0.1)
    loss, grad, _ = _ours(config, per_token, mask, ref_chosen, ref_rejected)
    pairs = len(ref_chosen)
    sequence = per_token.sum(1)
    trl_value, trl_grad, _ = _trl_cpo("sigmoid", 0.3, 0.1, 0.0, sequence[:pairs] - ref_chosen,
                                      sequence[pairs:] - ref_rejected)
    np.testing.assert_allclose(loss, trl_value, rtol=1e-6)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-6, atol=1e-9)


# --- Steps on a tiny model --------------------------------------------------------------------------------

def _pair_batches(config: TransformerConfig, batch_size: int, split: str = "train", prefix_lm: bool = False):
    from t5lite.data import pipeline

    model_type = pipeline.model_type(config.is_encoder_decoder, prefix_lm, preference=True)
    return pipeline.get_batches("tiny_shakespeare_preference", split=split, task_feature_lengths=LENGTHS,
                                model_type=model_type, batch_size=batch_size, shuffle=split == "train", seed=0,
                                num_epochs=None if split == "train" else 1)


def _program(config: TransformerConfig, tx, objective: str, adaptation=None, num_microbatches: int = 1,
             batch_size: int = 8):
    """(model, sharded init, jitted train step) of a preference run on a one-device-per-core mesh."""
    model = Model(config)
    adaptation = adaptation or adaptation_lib.FullAdaptation()
    pref = PreferenceConfig(objective=objective)
    mesh, rules = partitioning.make_mesh(), partitioning.axis_rules("dp")
    init = trainer.make_sharded_init(model, tx, model.input_shapes(batch_size, LENGTHS), mesh, rules, adaptation,
                                     keep_reference=preference.keeps_reference_copy(pref, adaptation))
    step = trainer.jit_train_step(model, tx, optax.constant_schedule(0.0), init, mesh, rules,
                                  loss_config=LossConfig(), num_microbatches=num_microbatches, use_dropout=False,
                                  adaptation=adaptation, preference=pref)
    return model, init, step, mesh


def test_dpo_margin_grows_on_a_tiny_model():
    model, init, step, mesh = _program(ENC_DEC, optax.adam(5e-3), "dpo")
    state = init.init_fn(jax.random.PRNGKey(0))
    assert isinstance(state, trainer.PreferenceTrainState)
    start = jax.tree_util.tree_map(np.asarray, state.reference)
    batches = _pair_batches(ENC_DEC, 8)
    margins, accuracies = [], []
    for _ in range(20):
        state, metrics = step(state, partitioning.shard_batch(next(batches), mesh), jax.random.PRNGKey(0))
        margins.append(float(metrics["rewards/margins"]))
        accuracies.append(float(metrics["rewards/accuracies"]))
    assert margins[0] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert np.mean(margins[-5:]) > max(0.2, 5 * np.mean(margins[:5])), margins
    assert np.mean(accuracies[-10:]) > 0.7, accuracies
    # The reference never moves; the policy does.
    for ref, now in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(state.reference), strict=True):
        np.testing.assert_array_equal(ref, now)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(start),
                                                      jax.tree_util.tree_leaves(state.params), strict=True))
    # Held-out pairs: the teacher-forced eval step sees the same preference.
    shardings = (init.state_shardings.params, init.state_shardings.reference)
    eval_step = trainer.jit_eval_step(model, shardings, mesh, partitioning.axis_rules("dp"), loss_config=LossConfig(),
                                      preference=PreferenceConfig(objective="dpo"))
    sums = [eval_step((state.params, state.reference), partitioning.global_batch(b, mesh))
            for b in _pair_batches(ENC_DEC, 8, split="validation")]
    held_out = preference.normalize_sums(jax.tree_util.tree_map(lambda *x: sum(x), *sums))
    assert float(held_out["num_pairs"]) == 64 and float(held_out["rewards/accuracies"]) > 0.7


def test_with_lora_the_reference_is_the_base_and_no_copy_is_kept():
    lora = adaptation_lib.LoraAdaptation(patterns=(r"(query|value|wi_0|wo)$",), rank=4)
    model, init, step, mesh = _program(ENC_DEC, optax.adam(1e-2), "dpo", adaptation=lora)
    state = init.init_fn(jax.random.PRNGKey(0))
    assert type(state) is trainer.TrainState  # no second copy of the params
    base = jax.tree_util.tree_map(np.asarray, state.params["base"])
    batches = _pair_batches(ENC_DEC, 8)
    for _ in range(5):
        state, metrics = step(state, partitioning.shard_batch(next(batches), mesh), jax.random.PRNGKey(0))
    rows = preference.paired_rows(next(batches))
    logps = jax.jit(lambda params: preference.answer_logps(model, params, rows)[0])
    # The reference log-probs the step uses are the base model's (the starting model, as b starts at 0).
    np.testing.assert_allclose(logps(preference.reference_params(lora, state.params)), logps(base), rtol=1e-6)
    assert not np.allclose(logps(lora.model_params(state.params)), logps(base), atol=1e-3)
    assert float(metrics["rewards/margins"]) != 0.0


def test_two_microbatches_equal_one_batch():
    """A decoder-only model reading the prompt causally; the step over 2 microbatches of 4 pairs is the
    step over 8 pairs: the loss is a mean over the pairs of the global batch."""
    tx = optax.sgd(0.5)
    batch = next(_pair_batches(DECODER_ONLY, 8))
    out = {}
    for n in (1, 2):
        _, init, step, mesh = _program(DECODER_ONLY, tx, "dpo", num_microbatches=n)
        state = init.init_fn(jax.random.PRNGKey(0))
        # A policy away from its reference, so the loss and gradient depend on the pairs.
        state = state.replace(params=jax.tree_util.tree_map(lambda x: x * 1.1, state.params))
        out[n] = step(state, partitioning.shard_batch(batch, mesh), jax.random.PRNGKey(0))
    (one, m1), (two, m2) = out[1], out[2]
    assert float(m1["num_pairs"]) == float(m2["num_pairs"]) == 8
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["rewards/margins"], m2["rewards/margins"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(two.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_pair_batch_keeps_each_pair_in_one_row():
    batch = next(_pair_batches(ENC_DEC, 4, split="validation"))
    rows = preference.paired_rows(batch)
    np.testing.assert_array_equal(rows["decoder_target_tokens"][0::2], batch["chosen_decoder_target_tokens"])
    np.testing.assert_array_equal(rows["decoder_target_tokens"][1::2], batch["rejected_decoder_target_tokens"])
    np.testing.assert_array_equal(rows["encoder_input_tokens"], batch["encoder_input_tokens"])  # one row a pair
    # Both answers hold the same words (the rejected one shuffled), and end with EOS.
    assert all(sorted(c[c > 0]) == sorted(r[r > 0]) for c, r in zip(batch["chosen_decoder_target_tokens"],
                                                                     batch["rejected_decoder_target_tokens"],
                                                                     strict=True))


def test_each_prompt_is_encoded_once_and_both_answers_read_it():
    """The pair rows' logits (encoder batch B, decoder batch 2B) equal those of the prompt repeated for
    each answer, as a plain batch of 2B rows gives them; with dropout too (the same rng)."""
    model = Model(ENC_DEC)
    batch = next(_pair_batches(ENC_DEC, 4, split="validation"))
    rows = preference.paired_rows(batch)
    params = model.init(jax.random.PRNGKey(0), model.input_shapes(4, LENGTHS))["params"]
    repeated = {k: (jnp.repeat(v, 2, axis=0) if k.startswith("encoder_") else v) for k, v in rows.items()}
    assert rows["encoder_input_tokens"].shape[0] * 2 == rows["decoder_input_tokens"].shape[0]
    np.testing.assert_allclose(model.logits(params, rows), model.logits(params, repeated), rtol=1e-5, atol=1e-5)
    odd = {**repeated, "encoder_input_tokens": repeated["encoder_input_tokens"][:3]}
    with pytest.raises(ValueError, match="multiple of the encoder batch"):
        model.logits(params, odd)


def test_a_pair_without_a_field_names_its_file_and_line(tmp_path):
    from t5lite.data import pipeline, tasks

    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks.add_preference_task("test_bad_pairs", str(path))
    with pytest.raises(UserError) as error:
        pipeline.get_batches("test_bad_pairs", split="train", task_feature_lengths=LENGTHS,
                             model_type="preference_encoder_decoder", batch_size=1, shuffle=False, seed=0)
    message = str(error.value)
    assert "\n" not in message and f"{path}:2:" in message and "'rejected'" in message


def test_a_pair_task_trained_as_lm_data_says_how_to_train_it():
    from t5lite.data import pipeline

    with pytest.raises(UserError, match="PreferenceConfig.objective"):
        pipeline.get_batches("tiny_shakespeare_preference", split="train", task_feature_lengths=LENGTHS,
                             model_type="encoder_decoder", batch_size=2, shuffle=False, seed=0)


# --- End to end --------------------------------------------------------------------------------------------

def test_simpo_keeps_no_reference_and_its_margin_grows():
    """SimPO is reference-free: the train state is a plain TrainState (no frozen copy), and the step's
    reward margin (beta times the average log-prob gap) grows as the policy learns the pairs."""
    _, init, step, mesh = _program(ENC_DEC, optax.adam(5e-3), "simpo")
    state = init.init_fn(jax.random.PRNGKey(0))
    assert type(state) is trainer.TrainState
    batches = _pair_batches(ENC_DEC, 8)
    margins = []
    for _ in range(12):
        state, metrics = step(state, partitioning.shard_batch(next(batches), mesh), jax.random.PRNGKey(0))
        margins.append(float(metrics["rewards/margins"]))
    assert all(np.isfinite(margins)) and np.mean(margins[-4:]) > np.mean(margins[:4]) + 0.05, margins


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo"])  # SimPO's state and step: test_simpo_keeps_no_reference_...
def test_dpo_recipe_trains_end_to_end(tmp_path, objective):
    """gin/runs/dpo.gin from scratch on a tiny model (no initial checkpoint), a few steps: the pair
    metrics reach metrics.jsonl, the eval has them too, and the checkpoint's params are the model's."""
    model_dir = tmp_path / "run"
    flags = [f"--gin.MODEL_DIR='{model_dir}'", "--gin.INITIAL_CHECKPOINT=None", "--gin.TRAIN_STEPS=6",
             "--gin.BATCH_SIZE=4", f"--gin.PreferenceConfig.objective='{objective}'", "--gin.EvalConfig.every=6",
             "--gin.EvalConfig.batches=2", "--gin.LoopConfig.log_every=3", "--gin.CheckpointConfig.every=6"]
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-m", "t5lite.train", "--gin_file=gin/runs/dpo.gin",
                             "--gin_file=gin/models/t5_1_1_tiny.gin", *flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward acc" in result.stdout and "reward accuracy" in result.stdout
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["group"] == "train"]
    assert train and all({"loss", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(r) for r in train)
    assert any(r["group"] == "eval/tiny_shakespeare_preference" and "rewards/margins" in r for r in rows)
    results = json.loads((model_dir / "eval_results.json").read_text())["tasks"]["tiny_shakespeare_preference"]
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(results)


def _dpo_losses(model_dir, preset: str, mesh: tuple[int, int, int] | None) -> list[float]:
    """Train losses of 3 DPO steps of the tiny model (from scratch: the reference is the random init),
    one process; mesh (data, fsdp, tensor) on 8 simulated CPU devices, or None: one device."""
    flags = [f"--gin.MODEL_DIR='{model_dir}'", "--gin.INITIAL_CHECKPOINT=None", "--gin.TRAIN_STEPS=3",
             "--gin.BATCH_SIZE=8", "--gin.EvalConfig.every=3", "--gin.EvalConfig.batches=1",
             "--gin.LoopConfig.log_every=1", "--gin.CheckpointConfig.every=3",
             f"--gin.TrainConfig.partitioning_preset='{preset}'"]
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("XLA_FLAGS", None)
    if mesh is not None:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        flags += [f"--gin.make_mesh.{axis}={size}" for axis, size in zip(("data", "fsdp", "tensor"), mesh, strict=True)]
    result = subprocess.run([sys.executable, "-m", "t5lite.train", "--gin_file=gin/runs/dpo.gin",
                             "--gin_file=gin/models/t5_1_1_tiny.gin", *flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["group"] == "train"]


@pytest.mark.slow
def test_dpo_gives_the_one_device_losses_with_the_data_and_the_fsdp_tensor_presets_on_8_devices(tmp_path):
    one_device = _dpo_losses(tmp_path / "one", "dp", None)
    assert len(one_device) == 3 and one_device[-1] != one_device[0]
    for preset, mesh in (("dp", (8, 1, 1)), ("fsdp+tp", (1, 4, 2))):
        losses = _dpo_losses(tmp_path / preset.replace("+", "_"), preset, mesh)
        np.testing.assert_allclose(losses, one_device, rtol=1e-4, err_msg=preset)
