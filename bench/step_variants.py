"""A/B timing of train-step variants in one process, interleaved, for noisy shared machines.

    python bench/step_variants.py --variants base,unrolled,onednn [--rounds 3] [--batch 8 ...]

Every variant is compiled first; then each round runs one step of every variant in turn, so a
burst of load from other processes hits all variants alike. Reported per variant: the best wall
time, the best process CPU time (all threads) and the speed-up of the best wall time over the
first variant. Shape as bench/train_throughput.py: T5 v1.1 small, batch 8, 512/114, float32, AdamW.

Variants (name -> what differs from base, the current defaults):
  base       as t5lite runs by default
  unrolled   TransformerConfig.scan_layers=False
  onednn     compiler option xla_cpu_use_onednn (oneDNN matmuls instead of XLA's own)
  onednn_only   oneDNN matmuls without the YNNPACK dot fusions t5lite compiles its CPU step with
  no_ynn     XLA:CPU's default (no YNNPACK dot fusions)
  no_guard   without the non-finite guard (a what-it-costs reference, not a candidate)
  mlp_autodiff  gelu(x wi_0) * (x wi_1) differentiated by autodiff (t5lite before layers.gated_gelu)
"""

from __future__ import annotations

import argparse
import dataclasses
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
from t5lite.model.models import Model  # noqa: E402

VARIANTS = {
    "base": ({}, {}),
    "unrolled": ({"scan_layers": False}, {}),
    "onednn": ({}, {"xla_cpu_use_onednn": True}),
    "onednn_only": ({}, {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True}),
    "no_ynn": ({}, {"xla_cpu_experimental_ynn_fusion_type": ""}),
    "no_guard": ({}, {}),
    "mlp_autodiff": ({}, {}),
}


def compiled_step(name: str, batch: int, inputs: int, targets: int):
    config_changes, compiler_options = VARIANTS[name]
    config = dataclasses.replace(T5_1_1_SMALL, **config_changes)
    model, tx = Model(config), optax.adamw(1e-3)
    mesh, rules = partitioning.make_mesh(), partitioning.axis_rules("dp")
    init = trainer.make_sharded_init(model, tx, model.input_shapes(batch, {"inputs": inputs, "targets": targets}),
                                     mesh, rules)
    step = trainer.make_train_step(model, tx, optax.constant_schedule(1e-3), loss_config=trainer.LossConfig(),
                                   use_dropout=False)
    if name == "no_guard":
        step = _without_guard(model, tx)
    if name == "mlp_autodiff":  # traced (below) with autodiff through the gated GELU, then restored
        layers.gated_gelu, original = (lambda a, b: jax.nn.gelu(a, approximate=True) * b), layers.gated_gelu
    data = partitioning.shard_batch(random_batch(batch, inputs, targets), mesh)
    key = jax.random.PRNGKey(0)
    state = init.init_fn(key)
    t = time.perf_counter()
    try:
        # The variant's options on top of those t5lite compiles its train step with (trainer.jit_train_step).
        options = {**(trainer.train_compiler_options(mesh) or {}), **compiler_options}
        fn = jax.jit(step, donate_argnums=(0,)).lower(state, data, key).compile(options or None)
    finally:
        if name == "mlp_autodiff":
            layers.gated_gelu = original
    return fn, state, data, key, time.perf_counter() - t


def _without_guard(model, tx):
    def step(state, batch, rng):
        grads, sums = trainer.grad_and_metric_sums(model, state.params, batch, None, trainer.LossConfig())
        grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(sums["num_tokens"], 1.0), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return trainer.TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), sums
    return step


def main() -> None:
    # Time the step in the process t5lite.train would run it in (its malloc settings).
    host_memory.restart_with_tunables(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="base,unrolled")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--targets", type=int, default=114)
    args = parser.parse_args()
    names = args.variants.split(",")
    runs = {}
    for name in names:
        fn, state, data, key, compile_s = compiled_step(name, args.batch, args.inputs, args.targets)
        state, _ = fn(state, data, key)  # warm-up
        jax.block_until_ready(state)
        runs[name] = [fn, state, data, key]
        print(f"compiled {name} in {compile_s:.1f} s", flush=True)
    best = {n: [float("inf"), float("inf")] for n in names}
    for r in range(args.rounds):
        for name in names:
            fn, state, data, key = runs[name]
            t, c = time.perf_counter(), time.process_time()
            state, metrics = fn(state, data, key)
            jax.block_until_ready((state, metrics))
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            runs[name][1] = state
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
            print(f"round {r} {name:10s} wall {wall:7.3f} s  cpu {cpu:7.3f} s", flush=True)
    print(f"\n{'variant':10s} {'best wall s':>11s} {'best cpu s':>10s} {'speed-up':>8s}")
    for name in names:
        print(f"{name:10s} {best[name][0]:11.3f} {best[name][1]:10.3f} {best[names[0]][0] / best[name][0]:8.2f}x")


if __name__ == "__main__":
    main()
