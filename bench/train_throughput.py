"""Training throughput of t5lite vs PyTorch Hugging Face peers (T5, Llama), measured in one run, one table.

    python bench/train_throughput.py [--peer_python ~/peer-venv/bin/python] [--steps 6] [--warmup 2]
        [--rounds 1] [--only encdec|decoder|llama]

Shapes (float32, AdamW(1e-3), dropout 0, random token ids, tokens counted as all positions):
  encdec   T5 v1.1 small (d_model 512, d_ff 1024, 8+8 layers, 6 heads x 64, vocab 32128), batch 8,
           512 inputs + 114 targets; peer: ../shared/bench/peers/hf_t5_train.py (same setting).
  decoder  the same decoder stack as a decoder-only LM (8 layers, no cross-attention), batch 8,
           512 tokens; peer: bench/hf_t5_decoder_only_peer.py (HF's T5 decoder stack + LM head).
  llama    gin/models/llama_small.gin with Llama's 32000 ids (d_model 512, d_ff 1408, 8 layers, 8 heads
           x 64 sharing 2 key/value heads, RoPE, SwiGLU), batch 8, 512 tokens; peer:
           bench/hf_llama_peer.py (transformers' LlamaForCausalLM, the same shape).
t5lite runs with nn.scan over layers (the default) and unrolled. Every row runs in its own
process, so its peak host memory (max RSS, from os.wait4) is its own; rows of one round run one
after another, and --rounds N repeats the table's rows N times interleaved, keeping each row's
best median step (machines here are shared and noisy: compare ratios within a run, not absolute numbers).
MFU = model FLOPs (t5lite.model.flops, the same count for both) / step time / the CPU's matmul
peak measured at the start. t5lite rows run with the glibc malloc settings that `python -m
t5lite.train` restarts itself with (t5lite/host_memory.py); peer rows with this process's
environment (set GLIBC_TUNABLES yourself to give every row the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5lite import host_memory, observability, partitioning, trainer  # noqa: E402
from t5lite.model import flops  # noqa: E402
from t5lite.model.config import TransformerConfig  # noqa: E402
from t5lite.model.models import Model  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(BENCH, "..", "..", "shared", "bench", "peers", "hf_t5_train.py")
DECODER_PEER = os.path.join(BENCH, "hf_t5_decoder_only_peer.py")
LLAMA_PEER = os.path.join(BENCH, "hf_llama_peer.py")

T5_1_1_SMALL = TransformerConfig(vocab_size=32128, emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                                 num_encoder_layers=8, num_decoder_layers=8, dropout_rate=0.0)
DECODER_ONLY_SMALL = dataclasses.replace(T5_1_1_SMALL, architecture="decoder_only")
LLAMA_SMALL = TransformerConfig(architecture="decoder_only", vocab_size=32000, emb_dim=512, num_heads=8, head_dim=64,
                                num_kv_heads=2, mlp_dim=1408, num_decoder_layers=8, position_encoding="rope",
                                mlp_activation="silu", layer_norm_epsilon=1e-5, dropout_rate=0.0)
CONFIGS = {"encdec": T5_1_1_SMALL, "decoder": DECODER_ONLY_SMALL, "llama": LLAMA_SMALL}


def random_batch(batch: int, inputs: int, targets: int) -> dict[str, np.ndarray]:
    """Random token ids in [2, 32000), every position real (as the peer's batch); inputs 0: decoder-only."""
    rng = np.random.default_rng(0)
    tgt = rng.integers(2, 32000, (batch, targets)).astype(np.int32)
    out = {
        "decoder_target_tokens": tgt,
        "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_loss_weights": np.ones((batch, targets), np.int32),
    }
    if inputs:
        out["encoder_input_tokens"] = rng.integers(2, 32000, (batch, inputs)).astype(np.int32)
    return out


def t5lite_train_throughput(config: TransformerConfig, batch: int, inputs: int, targets: int,
                            steps: int, warmup: int) -> dict:
    model = Model(config)
    tx = optax.adamw(1e-3)
    mesh = partitioning.make_mesh()
    rules = partitioning.axis_rules("dp")
    lengths = {"inputs": inputs, "targets": targets} if inputs else {"targets": targets}
    init = trainer.make_sharded_init(model, tx, model.input_shapes(batch, lengths), mesh, rules)
    state = init.init_fn(jax.random.PRNGKey(0))
    data = random_batch(batch, inputs, targets)
    step_fn = trainer.jit_train_step(model, tx, optax.constant_schedule(1e-3), init, mesh, rules,
                                     loss_config=trainer.LossConfig(), use_dropout=False)
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
    return {"impl": f"t5lite {'scan' if config.scan_layers else 'unrolled'}", "jax": jax.__version__,
            "compile_s": compile_s, "median_step_s": step_s, "best_step_s": float(np.min(times[warmup:])),
            "train_tokens_per_s": batch * (inputs + targets) / step_s}


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[dict, int]:
    """Runs `cmd` in its own process; -> (the JSON line it prints last, its peak RSS in bytes)."""
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=devnull, text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * 1024  # KiB on Linux


def run_peer(peer_python: str, *peer_args: int) -> dict:
    """Runs the T5 peer script with its positional args (batch inputs targets steps warmup decode_len);
    -> the JSON line it prints last (used by the decode benchmark too)."""
    out = subprocess.run([peer_python, PEER, *map(str, peer_args)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@dataclasses.dataclass(frozen=True)
class Row:
    shape: str  # "encdec", "decoder" or "llama"
    impl: str  # "t5lite scan", "t5lite unrolled", "peer"


def row_command(row: Row, args) -> list[str]:
    sizes = [args.batch, args.inputs, args.targets] if row.shape == "encdec" else [args.batch, 0, args.length]
    if row.impl == "peer":
        if row.shape == "encdec":  # decode_len 1: training is measured here, decoding in decode_throughput.py
            return [args.peer_python, PEER, *map(str, [*sizes, args.steps, args.warmup, 1])]
        peer = DECODER_PEER if row.shape == "decoder" else LLAMA_PEER
        return [args.peer_python, peer, *map(str, [args.batch, args.length, args.steps, args.warmup])]
    return [sys.executable, os.path.abspath(__file__), "--row", json.dumps(
        {"shape": row.shape, "scan": row.impl.endswith("scan"), "sizes": sizes, "steps": args.steps,
         "warmup": args.warmup})]


def run_one_row(spec: str) -> None:
    """Child-process mode: one t5lite row, printed as a JSON line."""
    spec = json.loads(spec)
    config = dataclasses.replace(CONFIGS[spec["shape"]], scan_layers=spec["scan"])
    print(json.dumps(t5lite_train_throughput(config, *spec["sizes"], spec["steps"], spec["warmup"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer_python", default=os.path.expanduser("~/peer-venv/bin/python"))
    parser.add_argument("--skip_peer", action="store_true")
    parser.add_argument("--only", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--targets", type=int, default=114)
    parser.add_argument("--length", type=int, default=512, help="decoder-only sequence length")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        return run_one_row(args.row)

    shapes = [args.only] if args.only else list(CONFIGS)
    impls = ["t5lite scan", "t5lite unrolled"] + ([] if args.skip_peer else ["peer"])
    rows = [Row(s, i) for s in shapes for i in impls]
    peak = observability.measured_cpu_peak()
    load_before = os.getloadavg()
    results: dict[Row, dict] = {}
    for _ in range(args.rounds):
        for row in rows:
            # t5lite rows run with the malloc settings its entry points restart with; peers as they are.
            env = None if row.impl == "peer" else host_memory.process_env()
            result, rss = run_measured(row_command(row, args), env)
            result["peak_rss_bytes"] = rss
            best = results.get(row)
            if best is None or result["median_step_s"] < best["median_step_s"]:
                results[row] = result
    load_after = os.getloadavg()

    step_flops = {shape: flops.train_step_flops(config, args.batch, args.inputs, args.targets) if shape == "encdec"
                  else flops.train_step_flops(config, args.batch, 0, args.length) for shape, config in CONFIGS.items()}
    for row, r in results.items():
        r["mfu"] = step_flops[row.shape] / r["median_step_s"] / peak
        print(json.dumps({"shape": row.shape, "impl": row.impl, **r}))
    print(f"\nmachine: {os.cpu_count()} CPUs, jax {jax.__version__}, load average {load_before[0]:.1f} before / "
          f"{load_after[0]:.1f} after; matmul peak (1536^2 float32, jax) {peak / 1e9:.1f} GFLOP/s")
    print(f"GLIBC_TUNABLES: t5lite rows {host_memory.process_env().get('GLIBC_TUNABLES', '(unset)')}; "
          f"peer rows {os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    print(f"{'shape':34s} {'impl':16s} {'step s':>7s} {'tok/s':>7s} {'vs peer':>7s} {'MFU':>6s} "
          f"{'compile s':>9s} {'peak RSS':>9s}")
    for row, r in results.items():
        peer = results.get(Row(row.shape, "peer"))
        ratio = f"{r['train_tokens_per_s'] / peer['train_tokens_per_s']:.2f}x" if peer else "-"
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        shape = {"encdec": f"T5 1.1 small b{args.batch} {args.inputs}+{args.targets}",
                 "decoder": f"decoder-only small b{args.batch} {args.length}",
                 "llama": f"llama small b{args.batch} {args.length}"}[row.shape]
        print(f"{shape:34s} {row.impl:16s} {r['median_step_s']:7.2f} {r['train_tokens_per_s']:7.0f} {ratio:>7s} "
              f"{r['mfu']:6.1%} {compile_s:>9s} {r['peak_rss_bytes'] / 2**30:8.2f}G")
    print("model FLOPs per step: " + ", ".join(f"{shape} {step_flops[shape] / 1e9:.0f} G" for shape in shapes))


if __name__ == "__main__":
    main()
