"""Greedy decoding throughput of t5lite vs the PyTorch Hugging Face T5 peer, measured in one run.

    python bench/decode_throughput.py [--peer_python ~/peer-venv/bin/python] [--repeats 3]

Shape: T5 v1.1 small (d_model 512, d_ff 1024, 8+8 layers, 6 heads x 64, vocab 32128), random
init, float32, batch 8, 512 random input tokens, 64 new tokens: the setting of
../shared/bench/peers/hf_t5_train.py (run as "8 512 114 1 1 64": a one-step train part, then its
greedy generate with min_new_tokens=64). Both count batch * 64 new tokens over the whole call
(encoder included) and never stop early at EOS. Compare the ratio, not absolute numbers.
t5lite runs in its own process with the glibc malloc settings of t5lite's entry points
(t5lite/host_memory.py); the peer with this process's environment.

It also prints what this machine allows, measured in t5lite's process right after its timing:
the encoder's FLOPs (and the cross-attention keys/values) at the float32 matmul peak, plus each
decoding step's bytes (decoder weights but the cross-attention key/value kernels, output weights,
cross-attention cache, the self-attention cache written so far) at the read bandwidth of a plain
jitted sum over 512 MB, and again at the bandwidth XLA:CPU's own matrix-vector products reach when
they stream weights from memory (16 different [8, 512] x [512, 2048] products, 64 MB). Each is a
lower bound on the call time (the second, for XLA:CPU's kernels); its tokens/s over the peer's is
the best ratio the machine (or those kernels) allow with float32 weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_throughput import T5_1_1_SMALL, run_measured, run_peer  # noqa: E402
from t5lite import host_memory, observability  # noqa: E402
from t5lite.model import flops  # noqa: E402
from t5lite.model.decoding import DecodeConfig  # noqa: E402
from t5lite.model.models import Model  # noqa: E402


def t5lite_decode_throughput(batch: int, inputs: int, new_tokens: int, repeats: int) -> dict:
    config = dataclasses.replace(T5_1_1_SMALL, dtype="float32")
    model = Model(config)
    params = jax.jit(lambda rng: model.init(rng, model.input_shapes(batch, {"inputs": inputs, "targets": 1}))
                     ["params"])(jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                                    is_leaf=lambda x: hasattr(x, "unbox"))
    params = jax.jit(model.decode_params)(params)  # once per checkpoint, as t5lite.eval / infer do
    # eos_id -1 never occurs: every row decodes all new_tokens, like the peer's min_new_tokens.
    decode = DecodeConfig(method="greedy", max_decode_length=new_tokens, eos_id=-1)
    predict = jax.jit(functools.partial(model.predict_batch, config=decode))
    data = {"encoder_input_tokens": np.random.default_rng(0).integers(2, 32000, (batch, inputs)).astype(np.int32)}
    t = time.perf_counter()
    compiled = predict.lower(params, data).compile()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, data))
        times.append(time.perf_counter() - t)
    call_s = float(np.median(times[1:]))
    return {"impl": "t5lite", "jax": jax.__version__, "batch": batch, "inputs": inputs, "new_tokens": new_tokens,
            "compile_s": compile_s, "median_call_s": call_s, "decode_tokens_per_s": batch * new_tokens / call_s,
            **machine_limits(config, params, batch, inputs, new_tokens)}


def _best_seconds(fn, *args, repeats: int = 10) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def read_bandwidth() -> float:
    """Bytes/s of a jitted float32 sum over 512 MB (far more than the last-level cache)."""
    data = jnp.asarray(np.random.default_rng(0).standard_normal(128 * 2**20, dtype=np.float32))
    return data.nbytes / _best_seconds(jnp.sum, data)


def matvec_bandwidth(layers: int = 16, rows: int = 8, k: int = 512, n: int = 2048) -> float:
    """Weight bytes/s of XLA:CPU's [rows, k] x [k, n] products over `layers` different weights (read
    from memory, as a decoding step reads its layers)."""
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)) for _ in range(layers)]
    x = jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32))
    return sum(w.nbytes for w in weights) / _best_seconds(lambda x, *ws: jnp.stack([(x @ w).sum() for w in ws]),
                                                         x, *weights)


def machine_limits(config, decode_params, batch: int, inputs: int, new_tokens: int) -> dict:
    """Lower bounds on the call time from this machine's measured peak FLOP/s and bandwidths."""
    parts = flops.forward_flops(config, batch, inputs, 0)  # decoder length 0: the encoder side only
    prefill_flops = parts.encoder + parts.cross_attention  # encoder + cross-attention keys/values
    # Every decoder weight but the cross-attention key/value kernels (used once, by the prefill).
    weights = [w for path, w in jax.tree_util.tree_flatten_with_path(decode_params["decoder"])[0]
               if not ("encoder_decoder_attention" in jax.tree_util.keystr(path)
                       and jax.tree_util.keystr(path).endswith(("['key']", "['value']")))]
    cache_row = config.num_decoder_layers * 2 * batch * config.num_heads * config.head_dim * 4  # k and v, float32
    mean_self_cache = cache_row * (new_tokens + 1) / 2
    step_bytes = sum(w.nbytes for w in weights) + cache_row * inputs + mean_self_cache
    peak, read_bw, matvec_bw = observability.measured_cpu_peak(), read_bandwidth(), matvec_bandwidth()
    bound = {name: prefill_flops / peak + new_tokens * step_bytes / bw
             for name, bw in (("read", read_bw), ("matvec", matvec_bw))}
    return {"prefill_gflop": prefill_flops / 1e9, "step_mb": step_bytes / 1e6, "matmul_peak_gflops": peak / 1e9,
            "read_gb_s": read_bw / 1e9, "matvec_gb_s": matvec_bw / 1e9,
            "bound_call_s_read": bound["read"], "bound_call_s_matvec": bound["matvec"]}


def peer_decode_throughput(peer_python: str, batch: int, inputs: int, new_tokens: int) -> dict:
    # Targets 114 and one train step: the peer script trains first; keep that part short.
    return run_peer(peer_python, batch, inputs, 114, 1, 1, new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t5lite_row", action="store_true", help="child-process mode: the t5lite measurement")
    parser.add_argument("--peer_python", default=os.path.expanduser("~/peer-venv/bin/python"))
    parser.add_argument("--skip_peer", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.t5lite_row:
        print(json.dumps(t5lite_decode_throughput(args.batch, args.inputs, args.new_tokens, args.repeats)))
        return
    # t5lite in its own process, with the malloc settings t5lite.eval / infer restart with.
    row_args = ["--batch", str(args.batch), "--inputs", str(args.inputs), "--new_tokens", str(args.new_tokens),
                "--repeats", str(args.repeats)]
    rows = [run_measured([sys.executable, os.path.abspath(__file__), "--t5lite_row", *row_args],
                         host_memory.process_env())[0]]
    if not args.skip_peer:
        rows.append(peer_decode_throughput(args.peer_python, args.batch, args.inputs, args.new_tokens))
    for row in rows:
        print(json.dumps(row))
    print(f"\n{'impl':28s} {'decode tok/s':>12s}")
    for row in rows:
        print(f"{row.get('impl', row.get('peer')):28s} {row['decode_tokens_per_s']:12.1f}")
    if len(rows) == 2:
        print(f"ratio t5lite / peer: {rows[0]['decode_tokens_per_s'] / rows[1]['decode_tokens_per_s']:.2f}x  "
              f"(CPU: {os.cpu_count()} cores, batch {args.batch}, {args.inputs} inputs, {args.new_tokens} new "
              "tokens, float32, greedy)")
    print_limits(rows)


def print_limits(rows: list[dict]) -> None:
    """The machine's lower bounds on t5lite's call time, and the peer ratios they would give."""
    r = rows[0]
    print(f"\nthis machine: float32 matmul {r['matmul_peak_gflops']:.0f} GFLOP/s; reads {r['read_gb_s']:.1f} GB/s "
          f"(jitted sum), {r['matvec_gb_s']:.1f} GB/s (XLA:CPU matrix-vector products)")
    print(f"per call: {r['prefill_gflop']:.0f} GFLOP of encoder + cross-attention keys/values, then "
          f"{r['new_tokens']} steps of {r['step_mb']:.0f} MB")
    tokens = r["batch"] * r["new_tokens"]
    for name, what in (("read", "the jitted sum's bandwidth"), ("matvec", "the matrix-vector bandwidth")):
        bound = r[f"bound_call_s_{name}"]
        vs_peer = f", {tokens / bound / rows[1]['decode_tokens_per_s']:.2f}x the peer" if len(rows) == 2 else ""
        print(f"  at the matmul peak and {what}: >= {bound:.3f} s per call = {tokens / bound:.0f} tok/s{vs_peer}"
              f"; t5lite takes {r['median_call_s']:.3f} s ({bound / r['median_call_s']:.0%} of that bound)")


if __name__ == "__main__":
    main()
