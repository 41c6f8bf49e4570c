"""python -m t5lite.serve: the continuous-batching engine against Model.predict_batch, and a real server
process on a free localhost port against t5lite.infer, with real clients (openai, httpx)."""

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import flax.linen as nn
import httpx
import jax
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_eval import _save_random_checkpoint

from t5lite import infer as infer_lib
from t5lite.model import decoding
from t5lite.model.config import TransformerConfig
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model
from t5lite.serving.engine import Engine, EngineConfig, Finished, Request, Token
from t5lite.serving.server import ApiError, ServeConfig, parse_completion

TINY = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                         num_encoder_layers=2, num_decoder_layers=2)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key-0123456789"
ENCDEC_GIN = ["--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin"]
DECODER_GIN = ["--gin_file=gin/base.gin", "--gin_file=gin/models/decoder_only_tiny.gin"]
LENGTHS = {"inputs": 16, "targets": 8}  # infer's; the servers' max_prompt_tokens is 16 too


# ------------------------------------------------------------------------------------------ engine
class Collector:
    """Tokens and the end of each request, in the order the engine finishes them."""

    def __init__(self, count):
        self.tokens = [[] for _ in range(count)]
        self.reasons = [None] * count
        self.order = []
        self.done = threading.Event()

    def emit(self, i):
        def emit(event):
            if isinstance(event, Token):
                self.tokens[i].append(event.id)
            else:
                assert isinstance(event, Finished)
                self.reasons[i] = event.reason
                self.order.append(i)
                if all(r is not None for r in self.reasons):
                    self.done.set()
        return emit


def _greedy(model, params, prompts, max_new, architecture):
    """Each prompt's greedy tokens through Model.predict_batch (t5lite.infer's decoding), up to EOS."""
    tokens = np.zeros((len(prompts), 13), np.int32)
    if architecture == "encoder_decoder":
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
        batch = {"encoder_input_tokens": tokens[:, :12]}
    else:
        causal = np.zeros_like(tokens)
        for row, prompt in enumerate(prompts):
            tokens[row, 1:1 + len(prompt)] = prompt
            causal[row, :1 + len(prompt)] = 1
        batch = {"decoder_input_tokens": tokens, "decoder_causal_attention": causal}
    out, _ = jax.jit(lambda p, b: model.predict_batch(p, b, DecodeConfig(max_decode_length=max_new), None,
                                                      bidirectional_prompt=False))(params, batch)
    rows = [[int(t) for t in row] for row in np.asarray(out)]
    return [row[:row.index(1)] if 1 in row else row for row in rows]


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_engine_rows_at_their_own_positions_equal_one_at_a_time_greedy_and_short_requests_finish_first(
        architecture):
    model = Model(dataclasses.replace(TINY, architecture=architecture))
    params = nn.unbox(model.init(jax.random.PRNGKey(0), model.input_shapes(2, {"inputs": 8, "targets": 8}))["params"])
    engine = Engine(model, params, step=7, config=EngineConfig(
        slots=3, max_prompt_tokens=12, max_new_tokens=24, prompt_buckets=(4,), prefill_batches=(1, 2),
        steps_per_call=3))
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(2, 64, n)] + [1] for n in (2, 9, 5, 1, 7, 3, 11)]
    max_new = [10, 4, 24, 7, 1, 12, 9]
    engine.start()
    try:
        # More requests than slots, of mixed lengths: queued, admitted as slots free up.
        got = Collector(len(prompts))
        for i, (p, m) in enumerate(zip(prompts, max_new, strict=True)):
            assert engine.submit(Request(prompt=p, max_new_tokens=m, emit=got.emit(i)))
        assert got.done.wait(120)
        expected = _greedy(model, params, prompts, 24, architecture)  # a greedy answer's prefix is greedy
        for i, m in enumerate(max_new):
            assert got.tokens[i] == expected[i][:m], i
            assert got.reasons[i] == ("length" if len(got.tokens[i]) == m else "stop")

        # A short request sent while a long one decodes finishes first; both keep their own settings.
        order = Collector(2)
        first_token = threading.Event()
        long_emit = order.emit(0)
        engine.submit(Request(prompt=prompts[2], max_new_tokens=24, temperature=0.9, top_k=5, seed=3,
                              emit=lambda e: (first_token.set(), long_emit(e))))
        assert first_token.wait(60)
        engine.submit(Request(prompt=prompts[0], max_new_tokens=2, emit=order.emit(1)))
        assert order.done.wait(60)
        assert order.order == [1, 0] and len(order.tokens[0]) > 2
        assert order.tokens[1] == expected[0][:2]

        # A request past its deadline ends as "timeout", one cancelled as "cancelled"; both free their slot.
        ended = Collector(2)
        engine.submit(Request(prompt=prompts[1], max_new_tokens=24, deadline=time.monotonic(), emit=ended.emit(0)))
        cancelled = Request(prompt=prompts[1], max_new_tokens=24, emit=ended.emit(1))
        cancelled.cancel()
        engine.submit(cancelled)
        assert ended.done.wait(60) and ended.reasons == ["timeout", "cancelled"]
        assert engine.busy_slots() == 0 and engine.queue_depth() == 0

        # A device error in the decode loop ends the requests in flight as "error" (not never) and the
        # engine refuses new ones, saying why.
        def fails(*args):
            raise RuntimeError("device lost")

        engine._compiled_step = fails
        broken = Collector(1)
        assert engine.submit(Request(prompt=prompts[0], max_new_tokens=4, emit=broken.emit(0)))
        assert broken.done.wait(60) and broken.reasons == ["error"]
        assert engine.failure == "RuntimeError: device lost"
        assert not engine.submit(Request(prompt=prompts[0], max_new_tokens=4, emit=broken.emit(0)))
    finally:
        engine.stop()


def test_per_row_sampling_keeps_the_tokens_filter_logits_keeps():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50)) * 0.5
    temperature = np.array([0.0, 1.0, 1.0, 0.7], np.float32)
    top_k = np.array([0, 3, 0, 0], np.int32)
    top_p = np.array([1.0, 1.0, 0.5, 1.0], np.float32)
    draws = np.stack([np.asarray(decoding.sample_rows(logits, jax.random.split(k, 4), temperature, top_k, top_p))
                      for k in jax.random.split(jax.random.PRNGKey(2), 64)])
    assert set(draws[:, 0]) == {int(decoding.argmax(logits)[0])}  # temperature 0: greedy
    kept_k = np.asarray(decoding.filter_logits(logits[1:2], top_k=3)) > decoding.NEG_INF
    assert set(draws[:, 1]) <= set(np.flatnonzero(kept_k[0])) and len(set(draws[:, 1])) > 1
    kept_p = np.asarray(decoding.filter_logits(logits[2:3], top_p=0.5)) > decoding.NEG_INF
    assert set(draws[:, 2]) <= set(np.flatnonzero(kept_p[0]))
    assert len(set(draws[:, 3])) > 3  # plain sampling draws many tokens


def test_completion_settings_are_validated_with_messages_naming_the_field():
    config = ServeConfig(max_new_tokens=32)
    ok = parse_completion({"prompt": ["a", "b"], "max_tokens": 5, "temperature": 0, "stop": "x", "n": 2}, config, 5)
    assert ok.prompts == ["a", "b"] and ok.stop == ["x"] and ok.temperature == 0.0
    for body, field in [({"prompt": "a", "max_tokens": 0}, "max_tokens"), ({"prompt": "a", "max_tokens": 33},
                        "max_tokens"), ({"prompt": "a", "temperature": -0.1}, "temperature"),
                        ({"prompt": "a", "top_p": 0}, "top_p"), ({"prompt": "a", "top_p": 1.5}, "top_p"),
                        ({"prompt": "a", "top_k": -1}, "top_k"), ({"prompt": 3}, "prompt"),
                        ({"prompt": "a", "bogus": 1}, "bogus"), ({"max_tokens": 3}, "prompt"),
                        ({"prompt": "a", "n": 0}, "n"), ({"prompt": "a", "logprobs": 9}, "logprobs")]:
        with pytest.raises(ApiError) as error:
            parse_completion(body, config, 5)
        assert error.value.status == 400 and field in error.value.message, body


# ------------------------------------------------------------------------------------------ server
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """python -m t5lite.serve in a subprocess, ready (compiled) when started."""

    def __init__(self, model_dir, gin_args, *flags, api_key=None, env=None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir = model_dir
        args = [sys.executable, "-m", "t5lite.serve", f"--model_dir={model_dir}", f"--port={self.port}",
                *gin_args, *flags]
        if api_key:
            key_file = os.path.join(model_dir, "key.txt")
            with open(key_file, "w") as f:
                f.write(api_key + "\n")
            args.append(f"--api_key_file={key_file}")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.log = open(os.path.join(model_dir, "server.log"), "w")  # noqa: SIM115
        self.process = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise AssertionError(f"not ready in time:\n{self.output()}")

    def output(self):
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-5000:]

    def post(self, path, body, **kwargs):
        return httpx.post(f"{self.url}{path}", json=body, headers=self.headers, timeout=60, **kwargs)

    def metrics(self):
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def gauge(self, name):
        return self.metrics()[name].samples[0].value

    def log_records(self):
        with open(os.path.join(self.model_dir, "serve", "requests.jsonl")) as f:
            return [json.loads(line) for line in f]

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)
        self.log.close()


def _serve_flags(**settings):
    return [f"--gin.ServeConfig.{k}={v!r}" if not isinstance(v, str) else f"--gin.ServeConfig.{k}='{v}'"
            for k, v in settings.items()]


def _infer(model_dir, gin_args, prompts, tmp_path):
    """t5lite.infer's greedy predictions for `prompts`."""
    inputs = tmp_path / f"prompts-{os.path.basename(model_dir)}.txt"
    inputs.write_text("".join(p + "\n" for p in prompts))
    output = str(tmp_path / f"infer-{os.path.basename(model_dir)}.jsonl")
    args = ["--gin_file=gin/runs/infer.gin", *gin_args[1:], f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", f"--gin.infer.input_file='{inputs}'",
            f"--gin.infer.output_path='{output}'", "--gin.infer.batch_size=4"]
    assert infer_lib.main(args) == 0
    with open(output) as f:
        return [json.loads(line)["prediction"] for line in f]


PROMPTS = ["copy: the cat sat", "hello world", "translate: a b c d e f", "1 2 3", "the quick brown fox jumps",
           "x"]


@pytest.fixture(scope="module")
def encdec(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("serve") / "encdec")
    _save_random_checkpoint(model_dir, 1, 0)
    server = Server(model_dir, ENCDEC_GIN, *_serve_flags(
        slots=8, max_prompt_tokens=16, max_new_tokens=200, prompt_buckets=(8,), prefill_batches=(1, 8),
        max_queue=64, max_body_bytes=4096), api_key=KEY)
    yield server
    server.stop()


@pytest.mark.slow
def test_openai_client_streaming_and_not_returns_infer_greedy_tokens(encdec, tmp_path):
    expected = _infer(encdec.model_dir, ENCDEC_GIN, PROMPTS, tmp_path)
    client = openai.OpenAI(base_url=f"{encdec.url}/v1", api_key=KEY, max_retries=0)
    whole = client.completions.create(model="encdec", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == expected
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > len(PROMPTS)
    for prompt, want in zip(PROMPTS[:3], expected, strict=False):
        chunks = list(client.completions.create(model="encdec", prompt=prompt, max_tokens=8, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    scored = client.completions.create(model="encdec", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2)
    logprobs = scored.choices[0].logprobs
    assert "".join(logprobs.tokens) == scored.choices[0].text == expected[0]
    assert len(logprobs.token_logprobs) == scored.usage.completion_tokens
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen < 0 and 1 <= len(top) <= 2 and chosen == pytest.approx(max(top.values()))  # greedy: the best
    models = client.models.list()
    assert models.data[0].id == "encdec" and models.data[0].model_extra["checkpoint_step"] == 1
    # Sampling is seeded: the same seed gives the same text.
    a, b = (client.completions.create(model="encdec", prompt="hello", max_tokens=6, temperature=1.0, seed=5,
                                      top_p=0.9, extra_body={"top_k": 50}).choices[0].text for _ in range(2))
    assert a == b


@pytest.mark.slow
def test_64_concurrent_mixed_requests_equal_one_at_a_time_and_a_short_one_finishes_before_a_long_one(encdec):
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta river stone apple cloud".split()
    bodies = [{"prompt": " ".join(rng.choice(words, int(rng.integers(1, 5)))), "max_tokens": int(rng.integers(1, 41)),
               "temperature": 0} for _ in range(64)]

    async def concurrently():
        async with httpx.AsyncClient(headers=encdec.headers, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post(f"{encdec.url}/v1/completions", json=b) for b in bodies))

    together = asyncio.run(concurrently())
    assert [r.status_code for r in together] == [200] * 64
    alone = [encdec.post("/v1/completions", b) for b in bodies]
    assert [r.json()["choices"][0]["text"] for r in together] == [r.json()["choices"][0]["text"] for r in alone]
    assert {r.json()["usage"]["completion_tokens"] <= b["max_tokens"] for r, b in zip(alone, bodies, strict=True)} == {
        True}

    async def short_after_long():
        async with httpx.AsyncClient(headers=encdec.headers, timeout=120) as client:
            finished = {}

            async def long():
                body = {"prompt": "hello world", "max_tokens": 200, "temperature": 0, "stream": True}
                async with client.stream("POST", f"{encdec.url}/v1/completions", json=body) as response:
                    lines = []
                    async for line in response.aiter_lines():
                        lines.append(line)
                        if len(lines) == 1:
                            started.set()
                finished["long"] = time.monotonic()
                return lines

            started = asyncio.Event()
            long_task = asyncio.create_task(long())
            await started.wait()
            short = await client.post(f"{encdec.url}/v1/completions",
                                      json={"prompt": "x", "max_tokens": 2, "temperature": 0})
            finished["short"] = time.monotonic()
            lines = await long_task
            return short, lines, finished

    short, lines, finished = asyncio.run(short_after_long())
    assert short.status_code == 200 and finished["short"] < finished["long"]
    last = json.loads([line for line in lines if line.startswith("data: {")][-1][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length"  # it ran its 200 tokens


@pytest.mark.slow
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(encdec):
    url = f"{encdec.url}/v1/completions"
    good = {"prompt": "hello", "max_tokens": 2, "temperature": 0}

    def still_serving():
        assert encdec.post("/v1/completions", good).status_code == 200

    assert httpx.post(url, json=good).status_code == 401
    assert httpx.post(url, json=good, headers={"Authorization": "Bearer wrong-key-000"}).status_code == 401
    still_serving()
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({**good, "frobnicate": 1}).encode(), 400, "unknown field(s) 'frobnicate'"),
        (json.dumps({**good, "prompt": "word " * 40}).encode(), 400, "at most 16 are allowed"),
        (json.dumps({**good, "max_tokens": 0}).encode(), 400, "'max_tokens' must be"),
        (json.dumps({**good, "temperature": -1}).encode(), 400, "'temperature' must be a number >= 0"),
        (json.dumps({**good, "top_p": 0}).encode(), 400, "'top_p' must be in (0, 1]"),
        (json.dumps({**good, "top_p": 1.5}).encode(), 400, "'top_p' must be in (0, 1]"),
        (json.dumps({**good, "prompt": "a" * 5000}).encode(), 413, "request body over 4096 bytes"),
    ]
    for body, status, message in cases:
        response = httpx.post(url, content=body, headers={**encdec.headers, "Content-Type": "application/json"})
        assert response.status_code == status, (body[:40], response.text)
        assert message in response.json()["error"]["message"]
        still_serving()
    client = openai.OpenAI(base_url=f"{encdec.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="encdec", prompt="hi", max_tokens=2, top_p=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{encdec.url}/v1", api_key="not-the-key", max_retries=0).completions.create(
            model="encdec", prompt="hi", max_tokens=2)
    still_serving()


@pytest.mark.slow
def test_a_disconnect_frees_its_slot_and_metrics_parse_and_feedback_joins_the_request_log(encdec):
    body = {"prompt": "the quick brown fox", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(headers=encdec.headers, timeout=60) as client, \
            client.stream("POST", f"{encdec.url}/v1/completions", json=body) as response:
        first = next(response.iter_lines())
    cancelled_id = json.loads(first[len("data: "):])["id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(r["id"] == cancelled_id for r in encdec.log_records()):
        time.sleep(0.1)
    record = next(r for r in encdec.log_records() if r["id"] == cancelled_id)
    assert record["status"] == 499 and record["completion_tokens"] < 200  # stopped, not run to the end
    assert encdec.gauge("t5lite_busy_slots") == 0

    done = encdec.post("/v1/completions", {"prompt": "hi", "max_tokens": 3, "temperature": 0}).json()
    feedback = encdec.post("/v1/feedback", {"id": done["id"], "rating": 4, "comment": "fine"})
    assert feedback.status_code == 200
    assert encdec.post("/v1/feedback", {"id": "../../etc/passwd", "rating": 1}).status_code == 400
    with open(os.path.join(encdec.model_dir, "serve", "feedback.jsonl")) as f:
        feedback_records = [json.loads(line) for line in f]
    assert feedback_records[-1]["id"] == done["id"] and feedback_records[-1]["rating"] == 4
    assert any(r["id"] == done["id"] and r["status"] == 200 for r in encdec.log_records())

    scores = encdec.post("/v1/score", {"prompt": "copy: a b", "continuations": ["a b", "river"]}).json()["scores"]
    assert len(scores) == 2 and all(s["logprob"] < 0 for s in scores)

    families = encdec.metrics()
    for name in ("t5lite_requests", "t5lite_request_latency_seconds", "t5lite_time_to_first_token_seconds",
                 "t5lite_generated_tokens", "t5lite_queue_depth", "t5lite_busy_slots", "t5lite_batch_occupancy",
                 "t5lite_model_step"):
        assert name in families, name
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value for s in families["t5lite_requests"].samples
                if s.name == "t5lite_requests_total"}
    assert requests[("completions", "200")] >= 1 and requests[("feedback", "400")] >= 1
    assert families["t5lite_model_step"].samples[0].value == 1
    assert httpx.get(f"{encdec.url}/metrics").status_code == 401  # behind the key; /healthz and /readyz are not
    assert httpx.get(f"{encdec.url}/healthz").status_code == 200


@pytest.mark.slow
def test_decoder_only_equals_infer_full_queue_gets_429_watch_swaps_checkpoints_and_sigterm_drains(tmp_path):
    model_dir = str(tmp_path / "decoder")
    _save_random_checkpoint(model_dir, 1, 0, DECODER_GIN[1])
    expected = _infer(model_dir, DECODER_GIN, PROMPTS, tmp_path)
    server = Server(model_dir, DECODER_GIN, "--watch", "--watch_interval_s=0.5", *_serve_flags(
        slots=2, max_queue=2, max_prompt_tokens=16, max_new_tokens=200, prompt_buckets=(), prefill_batches=(1,)))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        got = [client.completions.create(model="decoder", prompt=p, max_tokens=8, temperature=0).choices[0].text
               for p in PROMPTS]
        assert got == expected
        with pytest.raises(openai.BadRequestError, match="queues at most 2"):
            client.completions.create(model="decoder", prompt=PROMPTS, max_tokens=8, temperature=0)

        # 2 slots and 2 places in the queue: of 8 requests at once, some are turned away.
        async def burst():
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.gather(*(http.post(f"{server.url}/v1/completions", json={
                    "prompt": "hello", "max_tokens": 200, "temperature": 0}) for _ in range(8)))

        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert 429 in statuses and 200 in statuses and set(statuses) == {200, 429}
        assert next(r for r in responses if r.status_code == 429).headers["Retry-After"] == "1"

        # --watch: a new checkpoint while requests run; none fails, later ones use the new params.
        results, stop = [], threading.Event()

        def load():
            while not stop.is_set():
                r = server.post("/v1/completions", {"prompt": "hello world", "max_tokens": 20, "temperature": 0})
                results.append((r.status_code, r.json().get("system_fingerprint"), r.json()["choices"][0]["text"]))

        workers = [threading.Thread(target=load) for _ in range(2)]
        for w in workers:
            w.start()
        _save_random_checkpoint(model_dir, 2, 1, DECODER_GIN[1])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and client.models.list().data[0].model_extra["checkpoint_step"] != 2:
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for w in workers:
            w.join()
        assert {status for status, _, _ in results} == {200}
        texts = {}
        for _, fingerprint, text in results:
            texts.setdefault(fingerprint, set()).add(text)
        assert set(texts) == {"t5lite-step-1", "t5lite-step-2"}
        assert all(len(v) == 1 for v in texts.values()) and texts["t5lite-step-1"] != texts["t5lite-step-2"]

        # SIGTERM: the request in flight runs to its end, then the process exits 0.
        body = {"prompt": "hello", "max_tokens": 200, "temperature": 1.0, "seed": 1, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.url}/v1/completions",
                                                           json=body) as response:
            lines = response.iter_lines()
            next(lines)
            server.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["usage"]["completion_tokens"] == 200
        assert server.process.wait(60) == 0, server.output()
    finally:
        server.stop()


@pytest.mark.slow
def test_openai_chat_completions_render_the_template_and_answer_as_infer_does_on_the_conversation(tmp_path):
    model_dir = str(tmp_path / "chat")
    _save_random_checkpoint(model_dir, 1, 0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "the cat sat"}, {"role": "user", "content": "1 2 3"}]
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": messages}) + "\n")
    output = str(tmp_path / "answers.jsonl")
    assert infer_lib.main(["--gin_file=gin/runs/infer.gin", *ENCDEC_GIN[1:], f"--gin.MODEL_DIR='{model_dir}'",
                           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
                           f"--gin.infer.chat_file='{chats}'", f"--gin.infer.output_path='{output}'"]) == 0
    with open(output) as f:
        expected = json.loads(f.readline())["prediction"]
    server = Server(model_dir, ENCDEC_GIN, *_serve_flags(slots=2, max_prompt_tokens=64, max_new_tokens=8,
                                                         prompt_buckets=(), prefill_batches=(1,)))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0)
        assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
        assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.chat.completions.create(model="chat", messages=messages, temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        sampled = client.chat.completions.create(model="chat", messages=messages, temperature=1.0, top_p=0.9, seed=3,
                                                 n=2, stop=["\n"])
        assert len(sampled.choices) == 2 and all("\n" not in c.message.content for c in sampled.choices)
        with pytest.raises(openai.BadRequestError, match="ends with a user turn"):
            client.chat.completions.create(model="chat", messages=messages[:3], max_tokens=2)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_request_past_its_deadline_gets_504_or_finish_reason_timeout_and_frees_its_slot(tmp_path):
    model_dir = str(tmp_path / "deadline")
    _save_random_checkpoint(model_dir, 1, 0, DECODER_GIN[1])
    # One slot and a 0.5 s deadline against 4,000 new tokens: each long request must end by its deadline.
    server = Server(model_dir, DECODER_GIN, *_serve_flags(
        slots=1, max_prompt_tokens=16, max_new_tokens=4000, prompt_buckets=(), prefill_batches=(1,),
        request_timeout_s=0.5))
    try:
        long = {"prompt": "hello", "max_tokens": 4000, "temperature": 0}
        whole = server.post("/v1/completions", long)
        assert whole.status_code == 504, whole.text
        assert whole.json()["error"] == {"message": "the request took longer than 0.5 s", "type": "timeout",
                                         "param": None, "code": None}
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.url}/v1/completions",
                                                           json={**long, "stream": True}) as response:
            chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                      if line.startswith("data: {")]
        assert response.status_code == 200 and chunks[-1]["choices"][0]["finish_reason"] == "timeout"
        assert len(chunks) > 1  # tokens were streamed before the deadline
        # The slot is free again: a short request is answered.
        assert server.post("/v1/completions", {"prompt": "hello", "max_tokens": 2, "temperature": 0}).status_code == 200
        assert [r["status"] for r in server.log_records()] == [504, 504, 200]
    finally:
        server.stop()


@pytest.mark.slow
def test_a_hugging_face_t5_imported_serves_under_the_tp_preset_what_hf_generate_gives(tmp_path):
    """A MODEL_DIR made by `t5lite.hf_t5 --from_hf` (config.gin and vocabulary from the import), its heads
    split over 2 simulated devices (tp): greedy completions equal transformers' generate on the same ids."""
    import torch
    import transformers

    from t5lite import hf_t5
    from t5lite.data.vocab import get_default_vocabulary

    cfg = transformers.T5Config(vocab_size=8192, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_model = transformers.T5ForConditionalGeneration(cfg).eval()
    hf_dir, model_dir = str(tmp_path / "hf"), str(tmp_path / "imported")
    hf_model.save_pretrained(hf_dir)
    vocabulary = get_default_vocabulary()
    hf_t5.save_hf_tokenizer(vocabulary, hf_dir)
    assert hf_t5.main([f"--from_hf={hf_dir}", f"--output={model_dir}"]) == 0

    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([[*vocabulary.encode(prompt), 1]])
        out = hf_model.generate(ids, max_new_tokens=8, do_sample=False)[0, 1:].tolist()  # after the start id 0
        expected.append(vocabulary.decode(out[:out.index(1)] if 1 in out else out))
    server = Server(model_dir, [], *_serve_flags(partitioning_preset="tp", slots=4, max_prompt_tokens=16,
                                                  max_new_tokens=8, prompt_buckets=(8, 16), prefill_batches=(1, 4)),
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model="imported", prompt=PROMPTS, max_tokens=8, temperature=0)
        assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected
        assert "serve: ready: checkpoint 0, 4 slots, tp on tensor 2," in server.output()
    finally:
        server.stop()
