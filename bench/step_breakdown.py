"""Where the time of one t5lite training step goes, timed piece by piece on the default device.

    python bench/step_breakdown.py [--pieces step,grad,forward,optimizer,...] [--repeats 3]
        [--gin.TransformerConfig.scan_layers=False ...]

Same shape as bench/train_throughput.py (T5 v1.1 small, batch 8, 512/114, float32, AdamW). Each
piece is jitted on its own and timed as the best of `repeats` calls (best, not median: on a
shared machine the best is the least disturbed). Pieces:
  step       the whole train step (trainer.make_train_step), as the benchmark runs it
  grad       forward + backward of the loss, no optimizer
  forward    the loss alone
  optimizer  AdamW update + apply + the non-finite guard on given gradients
  encoder_attention / decoder_attention / cross_attention   one MultiHeadAttention, fwd + bwd
  mlp        one GatedMlp on encoder tokens, fwd + bwd
  bias       the encoder's relative-position bias + mask (built once per stack), fwd + bwd
  loss_head  decoder norm, logits and cross entropy, fwd + bwd
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_throughput import T5_1_1_SMALL, random_batch  # noqa: E402
from t5lite import host_memory, partitioning, trainer  # noqa: E402
from t5lite.model import layers  # noqa: E402
from t5lite.model.models import Model, loss_and_metric_sums  # noqa: E402


def _jit(fn):
    """jax.jit with the XLA options t5lite compiles its train step with, so pieces time as in it."""
    return jax.jit(fn, compiler_options=trainer.train_compiler_options(partitioning.make_mesh()))


def best_seconds(fn, *args, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best process CPU seconds) of `repeats` calls after a compiling one.

    CPU seconds (all threads) are less disturbed by other processes on a shared machine than
    wall seconds; divided by the cores in use they approximate an undisturbed wall time."""
    jax.block_until_ready(fn(*args))  # compile
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        best_wall, best_cpu = min(best_wall, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return best_wall, best_cpu


def fwd_bwd(module, params, *inputs):
    """jitted grad of sum(module output) w.r.t. params and the first input."""
    def f(p, x, *rest):
        return jnp.sum(module.apply({"params": p}, x, *rest))
    return _jit(jax.grad(f, argnums=(0, 1))), (params, *inputs)


def pieces(config, batch_size: int, inputs: int, targets: int):
    """name -> (jitted fn, args), built lazily."""
    model = Model(config)
    tx = optax.adamw(1e-3)
    data = random_batch(batch_size, inputs, targets)
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), model.input_shapes(
        batch_size, {"inputs": inputs, "targets": targets})))()["params"]
    params = jax.tree_util.tree_map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                                    is_leaf=lambda x: hasattr(x, "unbox"))
    dt, key = config.compute_dtype, jax.random.PRNGKey(0)
    x_enc = jax.random.normal(key, (batch_size, inputs, config.emb_dim), dt)
    x_dec = jax.random.normal(key, (batch_size, targets, config.emb_dim), dt)
    seg_e = jnp.ones((batch_size, inputs), jnp.int32)
    h, d = config.num_heads, config.head_dim

    def attention(xq, xkv, bias):
        mha = layers.MultiHeadAttention(h, d, dt)
        p = mha.init(key, xq, xkv, bias, True)["params"]
        fn = _jit(jax.grad(lambda p, q, kv, b: jnp.sum(mha.apply({"params": p}, q, kv, b, True)), argnums=(0, 1, 2)))
        return fn, (p, xq, xkv, bias)

    def step():
        state = jax.jit(lambda k: trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)))(key)
        fn = _jit(trainer.make_train_step(model, tx, optax.constant_schedule(1e-3), loss_config=trainer.LossConfig(),
                                          use_dropout=False))
        return fn, (state, data, key)

    def grad():
        return _jit(jax.grad(lambda p, b: model.loss_sums(p, b, z_loss=1e-4)[0])), (params, data)

    def forward():
        return _jit(lambda p, b: model.loss_sums(p, b, z_loss=1e-4)[0]), (params, data)

    def optimizer():
        opt_state = tx.init(params)

        def update(p, g, s):
            updates, s2 = tx.update(g, s, p)
            p2 = optax.apply_updates(p, updates)
            finite = jnp.isfinite(optax.tree.norm(g))
            return jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), (p2, s2), (p, s))
        return _jit(update), (params, params, opt_state)

    def bias():
        rpb = layers.RelativePositionBias(h, bidirectional=True)
        p = rpb.init(key, inputs, inputs)["params"]

        def f(p, seg):
            return jnp.sum(jnp.sin(rpb.apply({"params": p}, inputs, inputs) + layers.attention_mask_bias(seg, seg)))
        return _jit(jax.grad(f)), (p, seg_e)

    def mlp():
        m = layers.GatedMlp(config.mlp_dim, dt)
        p = m.init(key, x_enc, True)["params"]
        return _jit(jax.grad(lambda p, x: jnp.sum(m.apply({"params": p}, x, True)), argnums=(0, 1))), (p, x_enc)

    def loss_head():
        w = params["decoder"]["logits_dense"]
        tgt = jnp.asarray(data["decoder_target_tokens"])

        def f(w, x):
            logits = jnp.einsum("ble,ev->blv", x, w.astype(dt)).astype(jnp.float32)
            return loss_and_metric_sums(logits, tgt, jnp.ones_like(tgt), z_loss=1e-4)[0]
        return _jit(jax.grad(f, argnums=(0, 1))), (w, x_dec)

    enc_bias = jnp.zeros((batch_size, h, inputs, inputs), jnp.float32)
    return {
        "step": step, "grad": grad, "forward": forward, "optimizer": optimizer,
        "encoder_attention": lambda: attention(x_enc, x_enc, enc_bias),
        "decoder_attention": lambda: attention(x_dec, x_dec, jnp.zeros((batch_size, h, targets, targets))),
        "cross_attention": lambda: attention(x_dec, x_enc, jnp.zeros((batch_size, 1, targets, inputs))),
        "mlp": mlp, "bias": bias, "loss_head": loss_head,
    }


def main() -> None:
    # Time the step in the process t5lite.train would run it in (its malloc settings).
    host_memory.restart_with_tunables(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pieces", default="step,grad,forward,optimizer,encoder_attention,decoder_attention,"
                        "cross_attention,mlp,bias,loss_head")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan_layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--targets", type=int, default=114)
    args = parser.parse_args()
    import dataclasses  # noqa: PLC0415

    config = dataclasses.replace(T5_1_1_SMALL, scan_layers=bool(args.scan_layers))
    available = pieces(config, args.batch, args.inputs, args.targets)
    for name in args.pieces.split(","):
        fn, fn_args = available[name]()
        wall, cpu = best_seconds(fn, *fn_args, repeats=args.repeats)
        print(f"{name:20s} wall {wall * 1e3:9.1f} ms   cpu {cpu * 1e3:9.1f} ms", flush=True)


if __name__ == "__main__":
    main()
