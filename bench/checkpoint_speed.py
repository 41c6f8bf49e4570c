"""Checkpoint save / restore times and the training slowdown while an async save is in flight.

    python bench/checkpoint_speed.py [--dir /tmp/t5lite_ckpt_bench] [--steps 8] [--batch 2]

Shape: T5 v1.1 small (gin/models/t5_1_1_small.gin with the 32128-row T5 vocabulary), Adafactor
(the default optimizer) state, float32, on all local devices. Reported:
  save_blocking_s   time the train loop is blocked by Checkpointer.save (device -> host copy)
  save_total_s      until the background write is committed
  restore_s         Checkpointer.restore onto the sharded abstract state
  step_s / step_during_save_s   median train-step time without / while a save is being written
Timings on a shared machine are noisy: run it twice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_throughput import T5_1_1_SMALL  # noqa: E402
from t5lite import checkpoints, partitioning, trainer  # noqa: E402
from t5lite.model.models import Model  # noqa: E402
from t5lite.optim import make_optimizer, make_schedule  # noqa: E402


def random_batch(batch: int, inputs: int, targets: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tgt = rng.integers(2, 32000, (batch, targets)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, 32000, (batch, inputs)).astype(np.int32),
        "decoder_target_tokens": tgt,
        "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_loss_weights": np.ones((batch, targets), np.int32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/t5lite_ckpt_bench")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--targets", type=int, default=32)
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)

    model = Model(T5_1_1_SMALL)
    schedule = make_schedule(name="constant", learning_rate=1e-3)
    tx = make_optimizer(name="adafactor", schedule=schedule).tx
    mesh, rules = partitioning.make_mesh(), partitioning.axis_rules("dp")
    lengths = {"inputs": args.inputs, "targets": args.targets}
    init = trainer.make_sharded_init(model, tx, model.input_shapes(args.batch, lengths), mesh, rules)
    state = init.init_fn(jax.random.PRNGKey(0))
    step_fn = jax.jit(trainer.make_train_step(model, tx, schedule, loss_config=trainer.LossConfig(),
                                              use_dropout=False),
                      in_shardings=(init.state_shardings, partitioning.batch_sharding(mesh), None),
                      out_shardings=(init.state_shardings, None), donate_argnums=(0,))
    batch = partitioning.shard_batch(random_batch(args.batch, **{k: v for k, v in vars(args).items()
                                                                 if k in ("inputs", "targets")}), mesh)
    key = jax.random.PRNGKey(0)

    def timed_step(state):
        t = time.perf_counter()
        state, metrics = step_fn(state, batch, key)
        jax.block_until_ready(metrics["loss"])
        return state, time.perf_counter() - t

    with mesh:
        for _ in range(2):  # compile, warm up
            state, _ = timed_step(state)
        quiet = []
        for _ in range(args.steps):
            state, dt = timed_step(state)
            quiet.append(dt)

        ckpt = checkpoints.Checkpointer(args.dir, save_every=1, keep=2)
        t = time.perf_counter()
        ckpt.save(int(state.step), state)
        save_blocking = time.perf_counter() - t
        during = []
        while ckpt.saving_in_progress() and len(during) < 100:
            state, dt = timed_step(state)
            during.append(dt)
        ckpt.wait()
        save_total = time.perf_counter() - t
        saved_step = ckpt.latest_step()

        t = time.perf_counter()
        restored = ckpt.restore(saved_step, init.abstract_state)
        jax.block_until_ready(restored)
        restore_s = time.perf_counter() - t
        ckpt.close()

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(args.dir, str(saved_step)))
               for f in fs)
    step_s, during_s = float(np.median(quiet)), float(np.median(during)) if during else float("nan")
    print(json.dumps({
        "params": n_params, "checkpoint_mb": round(size / 2**20, 1), "devices": jax.device_count(),
        "cpu_cores": os.cpu_count(), "save_blocking_s": round(save_blocking, 3), "save_total_s": round(save_total, 3),
        "restore_s": round(restore_s, 3), "step_s": round(step_s, 4), "step_during_save_s": round(during_s, 4),
        "steps_during_save": len(during), "slowdown_during_save_pct": round(100 * (during_s / step_s - 1), 1),
        "batch": args.batch, "lengths": lengths,
    }))


if __name__ == "__main__":
    main()
