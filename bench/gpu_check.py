"""GPU check: a few bfloat16 training steps of the T5 v1.1 small and Llama-style small shapes with each
attention kernel (TransformerConfig.attention_impl); one line per configuration as it finishes.

    bash bench/gpu_check.sh                          # on a GPU machine, from the repo root (a few minutes)
    python bench/gpu_check.py --tiny --steps 2       # tiny shapes: a smoke run on a CPU
    python bench/gpu_check.py --only llama,cudnn --batch 64 --lengths 0,1024

Shapes: gin/models/t5_1_1_small.gin (T5 vocabulary, 32128 ids; encoder INPUTS tokens, decoder TARGETS)
and gin/models/llama_small.gin (Llama's 32000 ids; one decoder sequence of INPUTS + TARGETS tokens, as
t5lite lays out a prefix-LM example); --tiny takes t5_1_1_tiny.gin and llama_tiny.gin. Kernels: xla,
dot_product_attention, and cudnn on a GPU. Batches are random token ids packed two examples a row
(segment ids, as seqio's packing gives t5lite), so the masks are those of real pretraining.

Each step is t5lite's own (trainer.build_train_program: the default Adafactor, z-loss 1e-4, the state
donated), dtype bfloat16, dropout 0. Printed per configuration: compile seconds, the mean step time of
--steps steps after one warm-up step, tokens/s (every position of inputs and targets), and MFU = model
FLOPs (t5lite.model.flops: the full [q, k] attention matrix, causal or not) / step time / the device's
bfloat16 dense peak (t5lite.observability's table: H100 SXM and H200 989 TFLOP/s); "peak unknown"
elsewhere, a CPU included. A configuration that fails prints its error on its line and the next one runs.

Needs jax, flax, optax, orbax-checkpoint, gin-config and numpy only: no TensorFlow, no seqio.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import gin
import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from t5lite import observability, partitioning, trainer  # noqa: E402
from t5lite.errors import UserError  # noqa: E402
from t5lite.model import attention, flops  # noqa: E402
from t5lite.model.config import TransformerConfig  # noqa: E402
from t5lite.run_config import DataConfig, TrainConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    gin_file: str  # under gin/models/
    vocab_size: int


SHAPES = {"t5": Shape("t5_1_1_small.gin", 32128), "llama": Shape("llama_small.gin", 32000)}
TINY_SHAPES = {"t5": Shape("t5_1_1_tiny.gin", 512), "llama": Shape("llama_tiny.gin", 512)}
COLUMNS = f"{'shape':14s} {'attention':22s} {'batch':>5s} {'lengths':>9s} {'compile s':>9s} {'step ms':>9s} " \
          f"{'tokens/s':>10s} {'MFU':>6s} {'loss':>7s}"


def model_config(shape: Shape, attention_impl: str) -> TransformerConfig:
    """The gin model file's TransformerConfig in bfloat16 with this kernel (only that file is parsed:
    gin/base.gin imports the data pipeline, which needs TensorFlow)."""
    gin.clear_config()
    gin.parse_config_file(os.path.join(REPO, "gin", "models", shape.gin_file))
    config = TransformerConfig()
    return dataclasses.replace(config, vocab_size=shape.vocab_size, dtype="bfloat16", dropout_rate=0.0,
                               attention_impl=attention_impl)


def packed_random_batch(config: TransformerConfig, batch: int, inputs: int, targets: int) -> dict[str, np.ndarray]:
    """Random ids in [2, vocab), each row two packed examples (segment ids 1 and 2, the first longer)."""
    rng = np.random.default_rng(0)

    def segments(length: int) -> np.ndarray:
        return np.broadcast_to(np.where(np.arange(length) < (length * 5) // 8, 1, 2), (batch, length)).astype(np.int32)

    length = targets if config.is_encoder_decoder else inputs + targets
    tokens = rng.integers(2, config.vocab_size, (batch, length + 1)).astype(np.int32)
    out = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
           "decoder_loss_weights": np.ones((batch, length), np.int32), "decoder_segment_ids": segments(length)}
    if config.is_encoder_decoder:
        out["encoder_input_tokens"] = rng.integers(2, config.vocab_size, (batch, inputs)).astype(np.int32)
        out["encoder_segment_ids"] = segments(inputs)
    return out


def measure(config: TransformerConfig, batch: int, inputs: int, targets: int, steps: int) -> dict[str, float]:
    """Builds and compiles t5lite's train step, runs 1 + `steps` steps -> compile_s, step_s, loss."""
    lengths = {"inputs": inputs, "targets": targets}
    run = TrainConfig(model_dir="unused", data=DataConfig(batch_size=batch, task_feature_lengths=lengths))
    program = trainer.build_train_program(config, run, partitioning.make_mesh())
    data = packed_random_batch(config, batch, inputs, targets)
    with jax.set_mesh(program.mesh):
        state = program.init.init_fn(jax.random.PRNGKey(0))
        device_batch = partitioning.shard_batch(data, program.mesh)
        start = time.perf_counter()
        step = program.lower({k: v.shape for k, v in data.items()}).compile()
        compile_s = time.perf_counter() - start
        rng = jax.random.PRNGKey(1)
        state, metrics = step(state, device_batch, rng)  # warm-up
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):  # dispatched back to back, as training runs
            state, metrics = step(state, device_batch, rng)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - start) / steps
    return {"compile_s": compile_s, "step_s": step_s, "loss": float(metrics["loss"])}


def model_flops(config: TransformerConfig, batch: int, inputs: int, targets: int) -> float:
    if config.is_encoder_decoder:
        return flops.train_step_flops(config, batch, inputs, targets)
    return flops.train_step_flops(config, batch, 0, inputs + targets)


def device_peak() -> float | None:
    """The first device's bfloat16 dense peak FLOP/s from t5lite's table; None where it has none."""
    device = jax.devices()[0]
    try:
        return observability.peak_flops_per_device(device.device_kind, device.platform)
    except UserError:
        return None


def row(impl: str, batch: int, inputs: int, targets: int, shape: Shape, steps: int, peak: float | None) -> str:
    """One configuration's line: its figures, or the error that stopped it."""
    lengths = f"{inputs}+{targets}"
    head = f"{shape.gin_file.removesuffix('.gin'):14s} {impl:22s} {batch:5d} {lengths:>9s}"
    try:
        config = model_config(shape, impl)
        result = measure(config, batch, inputs, targets, steps)
    except Exception as e:  # noqa: BLE001  (a kernel that does not run here is a finding, not the end)
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"{head} failed: {type(e).__name__}: {message[:300]}"
    tokens_per_s = batch * (inputs + targets) / result["step_s"]
    mfu = f"{model_flops(config, batch, inputs, targets) / result['step_s'] / peak:6.1%}" if peak else "     -"
    return (f"{head} {result['compile_s']:9.1f} {result['step_s'] * 1e3:9.2f} {tokens_per_s:10.0f} {mfu} "
            f"{result['loss']:7.3f}")


def selected(only_text: str | None, default_impls: list[str]) -> list[tuple[str, str]]:
    """(shape, kernel) pairs to run: all shapes and default_impls, narrowed by --only (shape and kernel
    names, comma-separated; a kernel named there runs even where it is no default, to show its error)."""
    only = {name for name in (only_text or "").split(",") if name}
    unknown = only - set(SHAPES) - set(attention.IMPLEMENTATIONS)
    if unknown:
        raise UserError(f"--only {','.join(sorted(unknown))}: choose among {sorted(SHAPES)} and "
                        f"{list(attention.IMPLEMENTATIONS)}.")
    shapes = [s for s in SHAPES if s in only] or list(SHAPES)
    impls = [i for i in attention.IMPLEMENTATIONS if i in only] or default_impls
    return [(s, i) for s in shapes for i in impls]


def parse_lengths(text: str) -> tuple[int, int]:
    try:
        inputs, targets = (int(n) for n in text.split(","))
    except ValueError as e:
        raise UserError(f"--lengths {text!r}: write INPUTS,TARGETS, e.g. 512,128.") from e
    if inputs < 0 or targets < 1:
        raise UserError(f"--lengths {text!r}: INPUTS must be >= 0 and TARGETS >= 1.")
    return inputs, targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 32; --tiny 4)")
    parser.add_argument("--lengths", default=None, help="INPUTS,TARGETS tokens (default 512,128; --tiny 32,16)")
    parser.add_argument("--only", default=None,
                        help="comma-separated shapes (t5, llama) and/or kernels to run, e.g. llama,cudnn")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run on a CPU")
    args = parser.parse_args()
    try:
        inputs, targets = parse_lengths(args.lengths or ("32,16" if args.tiny else "512,128"))
        implementations = ["xla", "dot_product_attention"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
        runs = selected(args.only, implementations)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = args.batch or (4 if args.tiny else 32)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    device, peak = jax.devices()[0], device_peak()
    peak_text = f"peak {peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else "peak unknown (no MFU)"
    print(f"device: {device.device_kind} ({device.platform}) x{jax.device_count()}, jax {jax.__version__}, "
          f"{peak_text}; {args.steps} steps after 1 warm-up, bfloat16{', tiny shapes' if args.tiny else ''}",
          flush=True)
    print(COLUMNS, flush=True)
    for name, impl in runs:
        print(row(impl, batch, inputs, targets, shapes[name], args.steps, peak), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
