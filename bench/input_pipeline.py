"""Does the input pipeline keep up? Pipeline batches/s vs training steps/s, in one run.

    python bench/input_pipeline.py [--gin_file=gin/base.gin] [--batches 200] [--steps 10]

Reads the training mixture of the gin config (default: base.gin, span corruption with packing)
through t5lite.data.pipeline.get_batches, then times the jitted train step of the configured
model on one of those batches. The margin (pipeline batches/s over train steps/s) should be
>= 10 on this CPU; the pipeline here runs while the CPU is otherwise idle, whereas in training
it shares the cores with the step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5lite import gin_cli, partitioning, trainer  # noqa: E402
from t5lite.data import pipeline  # noqa: E402
from t5lite.model.config import TransformerConfig  # noqa: E402
from t5lite.model.models import Model  # noqa: E402
from t5lite.optim import make_optimizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    gin_cli.parse_gin(args.gin_file or ["gin/base.gin"], [])
    import gin  # noqa: PLC0415

    name = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
    lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
    batch_size = gin.query_parameter("%BATCH_SIZE")
    config = TransformerConfig()

    t = time.perf_counter()
    batches = pipeline.get_batches(name, split="train", task_feature_lengths=lengths,
                                   model_type=config.architecture, batch_size=batch_size, shuffle=True, seed=0)
    first = next(batches)
    startup_s = time.perf_counter() - t
    t = time.perf_counter()
    real = total = 0
    for _ in range(args.batches):
        b = next(batches)
        for k in ("encoder_input_tokens", "decoder_target_tokens"):
            real, total = real + int(np.count_nonzero(b[k])), total + b[k].size
    pipe_s = time.perf_counter() - t
    pipe_rate = args.batches / pipe_s

    model = Model(config)
    optimizer = make_optimizer()
    mesh = partitioning.make_mesh()
    init = trainer.make_sharded_init(model, optimizer.tx, model.input_shapes(batch_size, lengths), mesh,
                                     partitioning.axis_rules("dp"))
    state = init.init_fn(jax.random.PRNGKey(0))
    step = jax.jit(trainer.make_train_step(model, optimizer.tx, optimizer.schedule, loss_config=trainer.LossConfig(),
                                           use_dropout=False), donate_argnums=(0,))
    device_batch = partitioning.shard_batch(first, mesh)
    state, m = step(state, device_batch, jax.random.PRNGKey(0))
    jax.block_until_ready(m["loss"])
    t = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, device_batch, jax.random.PRNGKey(0))
    jax.block_until_ready(m["loss"])
    train_rate = args.steps / (time.perf_counter() - t)

    print(f"mixture {name}, lengths {dict(lengths)}, batch {batch_size}, {os.cpu_count()} CPU cores")
    print(f"pipeline: first batch after {startup_s:.1f}s; {pipe_rate:.1f} batches/s, "
          f"{pipe_rate * batch_size:.0f} examples/s, {total / pipe_s:.0f} tokens/s ({real / pipe_s:.0f} non-padding)")
    print(f"training: {train_rate:.2f} steps/s of the {config.emb_dim}-dim {config.architecture} model")
    print(f"margin: pipeline supplies {pipe_rate / train_rate:.1f}x what training consumes")


if __name__ == "__main__":
    main()
