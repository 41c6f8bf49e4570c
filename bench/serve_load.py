"""Load on python -m t5lite.serve (continuous batching) against one-at-a-time Hugging Face generate and
t5lite's static batching, measured in one run on the same prompts.

    python bench/serve_load.py --model=base --clients=1,8,32
    python bench/serve_load.py --model=small --clients=32 --requests_per_client=4

--model: base (gin/base.gin's model) or small (T5 v1.1 small shape), random init (a fresh MODEL_DIR
with config.gin and one checkpoint in a temporary directory). Prompts: 4-40 random words of the
embedded vocabulary; outputs mixed: 1 request in 4 is long (--long_tokens), the rest short
(--short_tokens). Greedy; the random model rarely emits EOS, so requests generate what they ask.

Server load, open loop (asyncio, httpx): at C clients, C * requests_per_client requests arrive as a
Poisson process of rate C / (idle latency of an average request): with infinite capacity, C
requests would be in flight on average. Arrivals do not wait for answers. Each request streams, so
time to first token (TTFT) is measured; throughput = generated tokens / (last answer - first send).
"short p99 / idle" is the p99 latency of the short requests under this load over their median
latency alone on the idle server.

Peers, on the same prompts (all available at once, so at saturation):
  hf_one_at_a_time  the checkpoint exported by t5lite.hf_t5, transformers generate per request (torch,
                    greedy, max_new_tokens of the request): what a user would otherwise do.
  static_batching   t5lite's Model.predict_batch in batches of --slots requests in arrival order,
                    each batch decoded to its longest request (compiled before timing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODEL_GIN = {"base": ["gin/base.gin"], "small": ["gin/base.gin", "gin/models/t5_1_1_small.gin"]}


def make_model_dir(model: str, directory: str) -> str:
    """A MODEL_DIR with config.gin, the default vocabulary record and a random-init checkpoint 0."""
    import gin
    import jax

    from t5lite import checkpoints, gin_cli, partitioning, run_dir, trainer
    from t5lite.model.config import TransformerConfig
    from t5lite.model.models import Model
    from t5lite.optim import make_optimizer

    gin.clear_config()
    gin_cli.parse_gin([os.path.join(REPO, f) for f in MODEL_GIN[model]], [])
    model_dir = os.path.join(directory, model)
    os.makedirs(model_dir)
    with open(run_dir.path(model_dir, run_dir.CONFIG), "w") as f:
        f.write(gin.config_str())
    net = Model(TransformerConfig())
    mesh = partitioning.make_mesh()
    init = trainer.make_sharded_init(net, make_optimizer().tx, net.input_shapes(1, {"inputs": 8, "targets": 8}),
                                     mesh, partitioning.axis_rules("dp"))
    saver = checkpoints.Checkpointer(run_dir.checkpoints_dir(model_dir), save_every=1, keep=None)
    saver.save(0, init.init_fn(jax.random.PRNGKey(0)), force=True)
    saver.wait()
    saver.close()
    gin.clear_config()
    return model_dir


def make_requests(count: int, short: int, long: int, seed: int = 0) -> list[dict]:
    from t5lite.data.vocab import get_default_vocabulary

    vocabulary = get_default_vocabulary()
    rng = np.random.default_rng(seed)
    words = [vocabulary.decode([int(i)]).strip() for i in rng.integers(100, 8000, 2000)]
    words = [w for w in words if w.isalpha()]
    return [{"prompt": " ".join(rng.choice(words, int(rng.integers(4, 41)))),
             "max_tokens": long if i % 4 == 3 else short, "temperature": 0, "stream": True}
            for i in range(count)]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}


# --------------------------------------------------------------------------------------------- server
class Server:
    def __init__(self, model_dir: str, slots: int, max_new: int, max_prompt: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(model_dir, "server.log"), "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "t5lite.serve", f"--model_dir={model_dir}", f"--port={self.port}",
             f"--gin.ServeConfig.slots={slots}", f"--gin.ServeConfig.max_new_tokens={max_new}",
             f"--gin.ServeConfig.max_prompt_tokens={max_prompt}", "--gin.ServeConfig.prompt_buckets=(32,)",
             f"--gin.ServeConfig.prefill_batches=(1, {min(4, slots)})", "--gin.ServeConfig.max_queue=1024",
             "--gin.ServeConfig.request_timeout_s=600.0"],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: see {self.log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() - started > 900:
                raise RuntimeError("the server was not ready in 15 minutes")
            time.sleep(1)
        self.ready_s = time.monotonic() - started

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(120)
        self.log.close()


async def one_request(client, url: str, body: dict) -> dict:
    sent = time.monotonic()
    first, tokens, status = None, 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions",
                                 json={**body, "stream_options": {"include_usage": True}}) as response:
            status = response.status_code
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("choices") and chunk["choices"][0]["text"] and first is None:
                    first = time.monotonic()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001  counted as an error
        status = f"{type(e).__name__}"
    done = time.monotonic()
    return {"sent": sent, "done": done, "ttft": None if first is None else first - sent, "latency": done - sent,
            "tokens": tokens, "ok": status == 200, "long": body["max_tokens"] > 16}


async def open_loop(url: str, bodies: list[dict], rate: float, seed: int = 1) -> list[dict]:
    import httpx

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(bodies))
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=len(bodies))) as client:
        tasks, start = [], time.monotonic()
        for body, at in zip(bodies, np.cumsum(gaps) - gaps[0], strict=True):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            tasks.append(asyncio.create_task(one_request(client, url, body)))
        return await asyncio.gather(*tasks)


def summarize(results: list[dict], expected: int) -> dict:
    ok = [r for r in results if r["ok"]]
    span = max(r["done"] for r in results) - min(r["sent"] for r in results)
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": expected, "errors": len(results) - len(ok), "lost": expected - len(results),
            "tokens": tokens, "seconds": span, "tokens_per_s": tokens / span,
            "ttft": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
            "latency": percentiles([r["latency"] for r in ok]),
            "short_latency": percentiles([r["latency"] for r in ok if not r["long"]])}


# --------------------------------------------------------------------------------------------- peers
def hf_one_at_a_time(model_dir: str, bodies: list[dict], directory: str) -> dict:
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from t5lite import hf_t5

    output = os.path.join(directory, "hf")
    hf_t5.export_checkpoint(os.path.join(model_dir, "checkpoints", "0"), output)
    model = T5ForConditionalGeneration.from_pretrained(output).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    tokens, started = 0, time.perf_counter()
    with torch.no_grad():
        for body in bodies:
            inputs = tokenizer(body["prompt"], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=body["max_tokens"], do_sample=False, num_beams=1)
            tokens += int((out[0, 1:] != tokenizer.eos_token_id).sum())  # after the start token, EOS not counted
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def static_batching(model_dir: str, bodies: list[dict], slots: int, max_prompt: int) -> dict:
    import gin
    import jax

    from t5lite import checkpoints, gin_cli, partitioning, run_dir, trainer
    from t5lite.data.vocab import get_default_vocabulary
    from t5lite.model.config import TransformerConfig
    from t5lite.model.decoding import DecodeConfig
    from t5lite.model.models import Model

    gin_cli.parse_run_config(run_dir.path(model_dir, run_dir.CONFIG))
    model = Model(TransformerConfig())
    gin.clear_config()
    mesh, rules = partitioning.make_mesh(), partitioning.axis_rules("dp")
    params = checkpoints.restore_params(run_dir.checkpoints_dir(model_dir), 0,
                                        trainer.abstract_params(model, mesh, rules))
    params = jax.jit(model.decode_params)(params)
    vocabulary = get_default_vocabulary()
    longest = max(b["max_tokens"] for b in bodies)
    predict = {n: jax.jit(lambda p, b, n=n: model.predict_batch(p, b, DecodeConfig(max_decode_length=n)))
               for n in sorted({b["max_tokens"] for b in bodies})}
    batches = [bodies[i:i + slots] for i in range(0, len(bodies), slots)]

    def features(batch):
        tokens = np.zeros((slots, max_prompt), np.int32)
        for row, body in enumerate(batch):
            ids = vocabulary.encode(body["prompt"])[:max_prompt - 1] + [vocabulary.eos_id]
            tokens[row, :len(ids)] = ids
        return {"encoder_input_tokens": tokens}

    compiled = {n: fn.lower(params, features(batches[0])).compile() for n, fn in predict.items()}
    generated, started = 0, time.perf_counter()
    for batch in batches:
        n = max(b["max_tokens"] for b in batch)  # decode to the longest request of the batch
        out, _ = compiled[n](params, features(batch))
        out = np.asarray(out)
        for row, body in enumerate(batch):
            row_tokens = list(out[row, :body["max_tokens"]])
            generated += row_tokens.index(1) if 1 in row_tokens else len(row_tokens)
    seconds = time.perf_counter() - started
    assert longest in compiled
    return {"tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}


# --------------------------------------------------------------------------------------------- main
def machine() -> str:
    name, flags = platform.processor(), ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        info = f.read()
        name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                    name)
        flags = " ".join(f for f in ("avx2", "avx512f") if f" {f}" in info)
    return f"{os.cpu_count()} CPUs, {name}, {flags}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_GIN), default="base")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests_per_client", type=int, default=4)
    parser.add_argument("--min_requests", type=int, default=16)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--short_tokens", type=int, default=8)
    parser.add_argument("--long_tokens", type=int, default=64)
    parser.add_argument("--max_prompt", type=int, default=64)
    parser.add_argument("--skip_peers", action="store_true")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    print(f"machine: {machine()}", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        model_dir = make_model_dir(args.model, directory)
        total = max(max(clients) * args.requests_per_client, args.min_requests)
        bodies = make_requests(total, args.short_tokens, args.long_tokens)
        server = Server(model_dir, args.slots, args.long_tokens, args.max_prompt)
        print(f"server ready in {server.ready_s:.1f} s", flush=True)
        try:
            # Idle latencies: one request at a time (warms the server up first).
            asyncio.run(open_loop(server.url, bodies[:2], rate=1e6))
            idle = [asyncio.run(open_loop(server.url, [b], rate=1e6))[0] for b in bodies[:8]]
            idle_short = float(np.median([r["latency"] for r in idle if not r["long"]]))
            mean_latency = float(np.mean([r["latency"] for r in idle]))
            rows["idle"] = {"short_latency_s": idle_short, "mean_latency_s": mean_latency}
            print(f"idle: short request {idle_short * 1e3:.0f} ms, mean {mean_latency * 1e3:.0f} ms", flush=True)
            for c in clients:
                count = max(c * args.requests_per_client, args.min_requests)
                results = asyncio.run(open_loop(server.url, bodies[:count], rate=c / mean_latency))
                row = summarize(results, count)
                row["short_p99_over_idle"] = (row["short_latency"]["p99"] or float("nan")) / idle_short
                rows[f"server_{c}"] = row
                print(f"server, {c} clients: {json.dumps(row)}", flush=True)
        finally:
            server.stop()
        if not args.skip_peers:
            count = max(max(clients) * args.requests_per_client, args.min_requests)
            rows["static_batching"] = static_batching(model_dir, bodies[:count], args.slots, args.max_prompt)
            print(f"static batching: {json.dumps(rows['static_batching'])}", flush=True)
            rows["hf_one_at_a_time"] = hf_one_at_a_time(model_dir, bodies[:count], directory)
            print(f"hf one at a time: {json.dumps(rows['hf_one_at_a_time'])}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
