"""Training throughput of t5lite vs the PyTorch Hugging Face T5 peer, measured in one run.

    python bench/train_throughput.py [--peer_python ~/peer-venv/bin/python] [--steps 6] [--warmup 2]

Shape: T5 v1.1 small (d_model 512, d_ff 1024, 8+8 layers, 6 heads x 64, vocab 32128), batch 8,
512 input and 114 target tokens, float32, AdamW(1e-3), dropout 0, random token ids: the same
setting as ../shared/bench/peers/hf_t5_train.py. Both count tokens as batch * (inputs + targets).
Timings on shared machines are noisy: compare the ratio, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5lite import partitioning, trainer  # noqa: E402
from t5lite.model import flops  # noqa: E402
from t5lite.model.config import TransformerConfig  # noqa: E402
from t5lite.model.models import Model  # noqa: E402

PEER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "peers", "hf_t5_train.py")

T5_1_1_SMALL = TransformerConfig(vocab_size=32128, emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                                 num_encoder_layers=8, num_decoder_layers=8, dropout_rate=0.0)


def t5lite_train_throughput(config: TransformerConfig, batch: int, inputs: int, targets: int,
                            steps: int, warmup: int) -> dict:
    model = Model(config)
    tx = optax.adamw(1e-3)
    mesh = partitioning.make_mesh()
    rules = partitioning.axis_rules("dp")
    init = trainer.make_sharded_init(model, tx, model.input_shapes(batch, {"inputs": inputs, "targets": targets}),
                                     mesh, rules)
    state = init.init_fn(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tgt = rng.integers(2, 32000, (batch, targets)).astype(np.int32)
    data = {
        "encoder_input_tokens": rng.integers(2, 32000, (batch, inputs)).astype(np.int32),
        "decoder_target_tokens": tgt,
        "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_loss_weights": np.ones((batch, targets), np.int32),
    }
    step_fn = jax.jit(trainer.make_train_step(model, tx, optax.constant_schedule(1e-3),
                                              loss_config=trainer.LossConfig(), use_dropout=False),
                      donate_argnums=(0,))
    device_batch = partitioning.shard_batch(data, mesh)
    key = jax.random.PRNGKey(0)
    t = time.perf_counter()
    compiled = step_fn.lower(state, device_batch, key).compile()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, device_batch, key)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times[warmup:]))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    return {"impl": "t5lite", "jax": jax.__version__, "params": n_params, "scan_layers": config.scan_layers,
            "remat": config.remat_policy, "compile_s": compile_s, "median_step_s": step_s,
            "train_tokens_per_s": batch * (inputs + targets) / step_s}


def run_peer(peer_python: str, *peer_args: int) -> dict:
    """Runs the peer script with its positional args (batch inputs targets steps warmup decode_len);
    -> the JSON line it prints last."""
    out = subprocess.run([peer_python, PEER, *map(str, peer_args)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peer_train_throughput(peer_python: str, batch: int, inputs: int, targets: int, steps: int, warmup: int) -> dict:
    # decode_len 1: this benchmark is about training; the decode benchmark is separate.
    return run_peer(peer_python, batch, inputs, targets, steps, warmup, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer_python", default=os.path.expanduser("~/peer-venv/bin/python"))
    parser.add_argument("--skip_peer", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--targets", type=int, default=114)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    shape = (args.batch, args.inputs, args.targets, args.steps, args.warmup)

    peak = flops.measure_matmul_peak()
    step_flops = flops.train_step_flops(T5_1_1_SMALL, args.batch, args.inputs, args.targets)
    rows = [t5lite_train_throughput(T5_1_1_SMALL, *shape)]
    if not args.skip_peer:
        rows.append(peer_train_throughput(args.peer_python, *shape))
    for row in rows:
        row["mfu"] = step_flops / row["median_step_s"] / peak  # same model FLOPs for both
        print(json.dumps(row))
    print(f"\nmatmul peak (2048^2 float32, jax): {peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs per step {step_flops / 1e9:.1f} G")
    print(f"{'impl':28s} {'step (s)':>9s} {'train tok/s':>12s} {'MFU':>6s}")
    for row in rows:
        name = row.get("impl", row.get("peer"))
        print(f"{name:28s} {row['median_step_s']:9.3f} {row['train_tokens_per_s']:12.0f} {row['mfu']:6.1%}")
    if len(rows) == 2:
        print(f"ratio t5lite / peer: {rows[0]['train_tokens_per_s'] / rows[1]['train_tokens_per_s']:.2f}x  "
              f"(CPU: {os.cpu_count()} cores, batch {args.batch}, {args.inputs}+{args.targets} tokens, float32)")


if __name__ == "__main__":
    main()
