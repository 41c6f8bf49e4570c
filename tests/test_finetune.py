"""Fine-tuning modes in the train step: frozen params, LoRA, LoRA on a quantized base, export."""

import json
import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio

from t5lite import adaptation as adaptation_lib
from t5lite import checkpoints, evaluation, finetune, hf_t5, partitioning, peft, trainer
from t5lite import train as train_lib
from t5lite.data import vocab_record
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model

TINY = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                         num_encoder_layers=2, num_decoder_layers=2)
LENGTHS = {"inputs": 10, "targets": 6}
LORA = adaptation_lib.LoraAdaptation(patterns=(r"(query|value|wi_0)$",), rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def model_and_batch():
    rng = np.random.default_rng(0)
    tgt = rng.integers(2, 64, (4, 6)).astype(np.int32)
    batch = {"encoder_input_tokens": rng.integers(2, 64, (4, 10)).astype(np.int32), "decoder_target_tokens": tgt,
             "decoder_input_tokens": np.concatenate([np.zeros((4, 1), np.int32), tgt[:, :-1]], 1)}
    return Model(TINY), batch


def _train(model, batch, adaptation, tx, steps):
    """(initial state, final state, losses) of `steps` jitted train steps under `adaptation`."""
    mesh = partitioning.make_mesh()
    rules = partitioning.axis_rules("fsdp")
    init = trainer.make_sharded_init(model, tx, model.input_shapes(4, LENGTHS), mesh, rules, adaptation)
    step = trainer.jit_train_step(model, tx, optax.constant_schedule(0.0), init, mesh, rules,
                                  loss_config=trainer.LossConfig(), use_dropout=False, adaptation=adaptation)
    state0 = init.init_fn(jax.random.PRNGKey(0))
    first = jax.tree_util.tree_map(np.asarray, state0)  # the step donates its input state
    state, losses = state0, []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, metrics = step(state, batch, jax.random.PRNGKey(1))
            losses.append(float(metrics["loss"]))
    return first, state, losses


def test_frozen_params_are_bitwise_unchanged_and_have_no_optimizer_state(model_and_batch):
    model, batch = model_and_batch
    adaptation = adaptation_lib.make_adaptation(trainable=[r"^decoder/"], frozen=[r"norm"])
    first, state, _ = _train(model, batch, adaptation, adaptation.wrap_optimizer(optax.adam(1e-2)), steps=3)
    names = jax.tree_util.tree_leaves(peft.param_names(first.params))
    trained = 0
    for name, before, after in zip(names, jax.tree_util.tree_leaves(first.params),
                                   jax.tree_util.tree_leaves(state.params), strict=True):
        if name.startswith("decoder/") and "norm" not in name:
            assert not np.array_equal(before, after), name
            trained += before.size
        else:
            np.testing.assert_array_equal(before, after, err_msg=name)
    assert adaptation.num_trainable(state.params) == trained
    # Adam keeps two moments per TRAINED scalar (plus step counts): frozen params have none.
    opt_floats = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.dtype == jnp.float32)
    assert opt_floats == 2 * trained


def test_lora_starts_equal_to_the_base_model_and_trains_only_its_factors(model_and_batch):
    model, batch = model_and_batch
    base_losses = _train(model, batch, adaptation_lib.FullAdaptation(), optax.sgd(0.0), steps=1)[2]
    first, state, losses = _train(model, batch, LORA, optax.adam(3e-2), steps=10)
    # b = 0: the first step's loss (before its update) is the base model's, exactly.
    assert losses[0] == base_losses[0]
    np.testing.assert_array_equal(model.logits(LORA.model_params(first.params), batch),
                                  model.logits(first.params["base"], batch))
    assert losses[-1] < losses[0] - 0.5, losses
    for before, after in zip(jax.tree_util.tree_leaves(first.params["base"]),
                             jax.tree_util.tree_leaves(state.params["base"]), strict=True):
        np.testing.assert_array_equal(before, after)
    assert all(float(jnp.abs(f["b"]).max()) > 0 for f in state.params["lora"].values())
    assert LORA.num_trainable(state.params) == sum(x.size for x in jax.tree_util.tree_leaves(state.params["lora"]))

    # The merged params (what export writes) equal W + (alpha / rank) a b, merged here by hand per layer.
    merged = jax.tree_util.tree_map(np.asarray, LORA.model_params(state.params))
    by_hand = jax.tree_util.tree_map(np.array, state.params["base"])
    for name, f in state.params["lora"].items():
        node = by_hand
        *parents, leaf = name.split("/")
        for key in parents:
            node = node[key]
        for layer in range(node[leaf].shape[0]):
            node[leaf][layer] += 2.0 * np.tensordot(np.asarray(f["a"][layer]), np.asarray(f["b"][layer]), axes=1)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), merged, by_hand)
    np.testing.assert_allclose(model.logits(merged, batch), model.logits(by_hand, batch), rtol=1e-4, atol=1e-5)


def test_lora_on_the_token_embedding_starts_at_the_base_and_adapts_the_rows_of_the_tokens_read(model_and_batch):
    model, batch = model_and_batch
    adaptation = adaptation_lib.LoraAdaptation(patterns=(r"token_embedder/embedding$",), rank=4, alpha=8.0)
    first, state, losses = _train(model, batch, adaptation, optax.adam(3e-2), steps=10)
    factors = first.params["lora"]["token_embedder/embedding"]
    assert factors["a"].shape == (64, 4) and factors["b"].shape == (4, 32)
    assert not factors["a"].any() and factors["b"].any()  # a = 0: the base model at step 0
    assert losses[-1] < losses[0] - 0.5, losses
    # The logits are a separate kernel (untied), so only the rows of tokens the model read train.
    a = np.asarray(state.params["lora"]["token_embedder/embedding"]["a"])
    read = np.unique(np.concatenate([batch["encoder_input_tokens"].ravel(), batch["decoder_input_tokens"].ravel()]))
    np.testing.assert_array_equal(np.flatnonzero(np.abs(a).max(axis=1) > 0), read)
    merged = adaptation.model_params(state.params)["token_embedder"]["embedding"]
    np.testing.assert_allclose(merged, first.params["base"]["token_embedder"]["embedding"]
                               + 2.0 * a @ np.asarray(state.params["lora"]["token_embedder/embedding"]["b"]),
                               rtol=1e-5, atol=1e-6)


def test_quantized_base_lora_trains_and_its_base_stays_quantized(model_and_batch):
    model, batch = model_and_batch
    qlora = adaptation_lib.LoraAdaptation(patterns=(r"(query|value|wi_0)$",), rank=4, alpha=8.0, base_bits=4,
                                    block_size=32, min_quantized_size=256)
    first, state, losses = _train(model, batch, qlora, optax.adam(3e-2), steps=10)
    assert losses[-1] < losses[0] - 0.5, losses
    is_q = lambda x: isinstance(x, peft.QuantizedTensor)  # noqa: E731
    quantized = [x for x in jax.tree_util.tree_leaves(state.params["base"], is_leaf=is_q) if is_q(x)]
    assert len(quantized) >= 10 and all(q.codes.dtype == jnp.int8 and q.bits == 4 for q in quantized)
    for before, after in zip(jax.tree_util.tree_leaves(first.params["base"]),
                             jax.tree_util.tree_leaves(state.params["base"]), strict=True):
        np.testing.assert_array_equal(before, after)
    shapes = jax.eval_shape(lambda: state)
    lines = adaptation_lib.summary_lines(qlora, shapes, jax.eval_shape(lambda: peft.dequantize(state.params["base"])))
    before_bytes, packed_bytes, held_bytes = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) bytes", lines[1]))
    assert packed_bytes < 0.3 * before_bytes and packed_bytes < held_bytes < 0.5 * before_bytes, lines


def test_lora_factors_take_their_kernels_logical_axes_and_a_replicated_rank():
    model = Model(TINY)
    mesh = partitioning.make_mesh()
    init = trainer.make_sharded_init(model, optax.adam(1e-3), model.input_shapes(4, LENGTHS), mesh,
                                     partitioning.axis_rules("fsdp"), LORA)
    boxed = LORA.lora_logical_shapes(init.boxed_params_shapes, init.abstract_state.params["lora"])
    assert boxed["encoder/layers/attention/query"]["a"].names == ("layers", "embed", "lora_rank")
    assert boxed["encoder/layers/attention/query"]["b"].names == ("layers", "lora_rank", "heads", "kv")
    assert boxed["decoder/layers/mlp/wi_0"]["b"].names == ("layers", "lora_rank", "mlp")
    spec = init.state_shardings.params["lora"]["encoder/layers/attention/query"]["a"].spec
    assert tuple(spec) == (None, "fsdp", None)  # embed over fsdp, like its kernel
    embedding = adaptation_lib.LoraAdaptation(patterns=(r"token_embedder/embedding$",))
    init = trainer.make_sharded_init(model, optax.adam(1e-3), model.input_shapes(4, LENGTHS), mesh,
                                     partitioning.axis_rules("fsdp"), embedding)
    boxed = embedding.lora_logical_shapes(init.boxed_params_shapes, init.abstract_state.params["lora"])
    assert boxed["token_embedder/embedding"]["a"].names == ("vocab", "lora_rank")
    assert boxed["token_embedder/embedding"]["b"].names == ("lora_rank", "embed")


def test_quantized_codes_take_their_kernels_sharding_and_the_last_axes_on_the_blocks():
    mesh = jax.sharding.AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"))  # shardings need no devices
    kernel = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    # [256, 96] in blocks of 16: 6 blocks per row, which tensor (2) divides.
    q = jax.eval_shape(lambda: peft.quantize_tensor(jnp.zeros((256, 96)), bits=8, block_size=16))
    sharded = adaptation_lib._quantized_sharding(kernel, q)
    assert tuple(sharded.codes.spec) == tuple(sharded.scale.spec) == ("fsdp", "tensor", None)
    # [256, 40]: blocks of 16, 16 and 8 (padded) -> 3 blocks, which tensor does not divide: replicated.
    q = jax.eval_shape(lambda: peft.quantize_tensor(jnp.zeros((256, 40)), bits=8, block_size=16))
    assert tuple(adaptation_lib._quantized_sharding(kernel, q).codes.spec) == ("fsdp", None, None)


def test_lora_dropout_drops_adapter_input_rows_only_in_training():
    adaptation = adaptation_lib.LoraAdaptation(patterns=(r"attention/query$",), rank=4, alpha=4.0, dropout=0.5)
    params = {"attention": {"query": jnp.zeros((8, 2, 4))}}
    lora = adaptation.adapt(params, jax.random.PRNGKey(0))
    lora["lora"]["attention/query"]["b"] = jnp.ones((4, 2, 4))
    full = adaptation.model_params(lora)["attention"]["query"]
    dropped = adaptation.model_params(lora, rng=jax.random.PRNGKey(3))["attention"]["query"]
    zero_rows = np.all(np.asarray(dropped) == 0, axis=(1, 2))
    assert 0 < zero_rows.sum() < 8  # whole input features dropped, the rest scaled by 1 / (1 - p)
    np.testing.assert_allclose(np.asarray(dropped)[~zero_rows], 2 * np.asarray(full)[~zero_rows], rtol=1e-6)


def test_adaptation_errors_are_clear():
    with pytest.raises(UserError, match="needs LoRA"):
        adaptation_lib.make_adaptation(base_bits=4)
    with pytest.raises(UserError, match="only the LoRA factors train"):
        adaptation_lib.make_adaptation(lora_patterns=["query$"], trainable=["decoder/"])
    with pytest.raises(UserError, match="8 or 4"):
        adaptation_lib.make_adaptation(lora_patterns=["query$"], base_bits=2)


# --- End to end: pretrain, fine-tune on SST-2 with gin/runs/finetune*.gin, export ---------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FT = ["--gin_file=gin/models/t5_1_1_tiny.gin", "--gin.BATCH_SIZE=8", "--gin.LoopConfig.log_every=5",
           "--gin.EvalConfig.every=10", "--gin.EvalConfig.batches=1", "--gin.EvalConfig.infer_every=8",
           "--gin.EvalConfig.infer_examples=16"]


def _jsonl(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.full_data  # SST-2 is not shipped with the tests (no license to redistribute it)
def test_pretrain_then_finetune_on_sst2_and_export_merged_lora(tmp_path, capsys, monkeypatch, data_dir):
    monkeypatch.chdir(REPO)
    tiny_ft = [*TINY_FT, f"--gin.downstream_data_dir.path='{data_dir}'"]
    pre = str(tmp_path / "pre")
    gin.clear_config()
    assert train_lib.main(["--gin_file=gin/base.gin", *TINY_FT[:2], "--gin.TRAIN_STEPS=6",
                           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.EvalConfig.batches=1",
                           "--gin.CheckpointConfig.every=6", f"--gin.MODEL_DIR='{pre}'"]) == 0

    full = str(tmp_path / "full")
    gin.clear_config()
    assert train_lib.main(["--gin_file=gin/runs/finetune.gin", *tiny_ft, "--gin.TRAIN_STEPS=10",
                           f"--gin.INITIAL_CHECKPOINT='{pre}/checkpoints/6'", f"--gin.MODEL_DIR='{full}'"]) == 0
    out = capsys.readouterr().out
    assert "steps 6->16" in out and "trainable parameters: 1,246,080 of 1,246,080" in out
    records = _jsonl(full)
    assert [r["step"] for r in records if r["group"] == "train"] == [10, 15, 16]  # steps 7..16
    accuracy = [r for r in records if r["group"] == "infer_eval/sst2"]
    assert [r["step"] for r in accuracy] == [8, 16] and 0.0 <= accuracy[-1]["accuracy"] <= 100.0
    assert "trainable parameters" in open(os.path.join(full, "model-info.txt")).read()

    qlora = str(tmp_path / "qlora")
    gin.clear_config()
    assert train_lib.main(["--gin_file=gin/runs/finetune_qlora.gin", *tiny_ft, "--gin.TRAIN_STEPS=10",
                           f"--gin.INITIAL_CHECKPOINT='{pre}/checkpoints/6'", f"--gin.MODEL_DIR='{qlora}'"]) == 0
    assert "bytes float32 ->" in capsys.readouterr().out
    assert [r["step"] for r in _jsonl(qlora) if r["group"] == "infer_eval/sst2"] == [8, 16]

    # Export: a normal params checkpoint whose teacher-forced eval equals the one training logged
    # for the adapted (int4 base + LoRA) model at its last step.
    merged_dir = str(tmp_path / "merged")
    assert finetune.main([f"--model_dir={qlora}", f"--output={merged_dir}"]) == 0
    assert adaptation_lib.make_adaptation().base_bits == 4  # gin now holds the run's config.gin
    assert checkpoints.read_step(f"{merged_dir}/checkpoints/16") == 16
    assert vocab_record.read(merged_dir) == vocab_record.read(qlora) is not None  # eval / infer check it
    model, mesh, rules = Model(TransformerConfig()), partitioning.make_mesh(), partitioning.axis_rules("dp")
    merged = checkpoints.restore_params(f"{merged_dir}/checkpoints", 16, trainer.abstract_params(model, mesh, rules))
    eval_data = evaluation.load_eval_batches(["sst2"], split="validation", max_batches=1, seed=0, batch_size=8,
                                            task_feature_lengths={"inputs": 64, "targets": 4},
                                            model_type="encoder_decoder", shard_info=seqio.ShardInfo(0, 1))
    eval_step = jax.jit(trainer.make_eval_step(model, trainer.LossConfig()))
    with jax.set_mesh(mesh):
        loss = evaluation.teacher_forced_eval(eval_step, merged, eval_data, mesh)["sst2"]["loss"]
    logged = [r for r in _jsonl(qlora) if r["group"] == "eval/sst2" and r["step"] == 16][0]["loss"]
    assert loss == pytest.approx(logged, rel=1e-5)
    # The merged export carries the run's config.gin, so it converts to Hugging Face T5 as it is.
    assert hf_t5.main([f"--checkpoint={merged_dir}/checkpoints/16", f"--output={tmp_path / 'hf'}"]) == 0
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "spiece.model",
                                                   "tokenizer_config.json"]
    gin.clear_config()
