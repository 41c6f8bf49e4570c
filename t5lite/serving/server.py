"""The HTTP API (Starlette, ASGI) over the engine: OpenAI-compatible completions, scoring, health,
Prometheus metrics, feedback; limits, API key, request log. See docs/serving.md.

    POST /v1/completions   OpenAI's completions API (prompt, max_tokens, temperature, top_p, top_k,
                           stop, seed, n, stream, logprobs); usage counts in the response
    POST /v1/chat/completions  OpenAI's chat completions API (messages, max_tokens, temperature, top_p,
                           top_k, stop, seed, n, stream): the messages rendered by the gin-bound
                           ChatTemplate (t5lite/data/chat.py), as chat SFT trained the model
    POST /v1/score         {"prompt": str, "continuations": [str, ...]} -> log-likelihoods
    POST /v1/feedback      {"id": "cmpl-...", "rating": number, "comment": str} -> feedback.jsonl
    GET  /v1/models        the model's name and checkpoint step
    GET  /healthz /readyz  alive / ready (compiled, not draining)
    GET  /metrics          Prometheus text format

Every request value is validated here; none reaches the filesystem (the logs are JSON lines in
the serve directory, whose names are fixed). The engine and tokenizer arrive once the model is
compiled (ServerState.ready); until then, and while draining, the API answers 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import gin
import prometheus_client
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from t5lite.data import chat
from t5lite.serving.engine import Engine, EngineConfig, Finished, Request, Token

REQUEST_LOG = "requests.jsonl"
FEEDBACK_LOG = "feedback.jsonl"
ID_PATTERN = re.compile(r"^cmpl-[0-9a-f]{24}$")
MAX_N = 16
MAX_STOP = 4


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Limits and engine sizes of `python -m t5lite.serve` (gin: ServeConfig.slots = 16, ...).

    slots .. prefill_batches, max_queue, prefix_lm: see EngineConfig. request_timeout_s: a request
    still running after this many seconds ends (504, or finish_reason "timeout" when streaming).
    max_body_bytes: larger request bodies get 413. prompt_eos: prompts end with EOS, as t5lite.infer
    and the seqio tasks encode inputs (greedy answers then equal t5lite.infer's). partitioning_preset:
    "dp" or "tp" over the local devices. default_temperature: when a request gives none (OpenAI: 1).
    steps_per_call: decode steps per engine call (EngineConfig).
    """

    slots: int = 8
    max_prompt_tokens: int = 128
    max_new_tokens: int = 64
    prompt_buckets: tuple[int, ...] = (32,)
    prefill_batches: tuple[int, ...] = (1, 4)
    max_queue: int = 64
    prefix_lm: bool = False
    request_timeout_s: float = 60.0
    max_body_bytes: int = 1 << 20
    prompt_eos: bool = True
    partitioning_preset: str = "dp"
    default_temperature: float = 1.0
    steps_per_call: int = 4

    def engine_config(self, eos_id: int) -> EngineConfig:
        return EngineConfig(slots=self.slots, max_prompt_tokens=self.max_prompt_tokens,
                            max_new_tokens=self.max_new_tokens, prompt_buckets=tuple(self.prompt_buckets),
                            prefill_batches=tuple(self.prefill_batches), max_queue=self.max_queue,
                            prefix_lm=self.prefix_lm, eos_id=eos_id, steps_per_call=self.steps_per_call)


@dataclasses.dataclass
class Tokenizer:
    """encode(text) -> ids (no EOS), decode(ids) -> text, and the EOS id."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_id: int


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "unavailable", 504: "timeout"}.get(self.status, "error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param, "code": None}},
                            status_code=self.status, headers=self.headers)


class Metrics:
    """The Prometheus metrics of one server (its own registry)."""

    def __init__(self, state: ServerState):
        r = self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter("t5lite_requests", "HTTP requests by endpoint and status",
                                                  ["endpoint", "status"], registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.latency = prometheus_client.Histogram("t5lite_request_latency_seconds", "total request latency",
                                                   ["endpoint"], buckets=buckets, registry=r)
        self.ttft = prometheus_client.Histogram("t5lite_time_to_first_token_seconds",
                                                "time from arrival to the first generated token",
                                                buckets=buckets, registry=r)
        self.tokens = prometheus_client.Counter("t5lite_generated_tokens", "tokens generated", registry=r)
        self.occupancy = prometheus_client.Histogram("t5lite_batch_occupancy", "busy slots / slots at each decode step",
                                                     buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
                                                     registry=r)
        engine = lambda: state.engine  # noqa: E731
        prometheus_client.Gauge("t5lite_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: engine().queue_depth() if engine() else 0)
        prometheus_client.Gauge("t5lite_busy_slots", "slots decoding a request", registry=r).set_function(
            lambda: engine().busy_slots() if engine() else 0)
        prometheus_client.Gauge("t5lite_model_step", "checkpoint step served", registry=r).set_function(
            lambda: (engine().params_step or 0) if engine() else -1)
        prometheus_client.Gauge("t5lite_ready", "1 once compiled and not draining", registry=r).set_function(
            lambda: float(state.is_ready()))


class ServerState:
    """What the app serves: set up before the engine exists, made ready once it is compiled."""

    def __init__(self, config: ServeConfig, *, model_name: str, serve_dir: str, api_key: str | None = None):
        self.config, self.model_name, self.api_key = config, model_name, api_key
        self.engine: Engine | None = None
        self.tokenizer: Tokenizer | None = None
        self.draining = False
        self.failed: str | None = None  # start-up failed: /readyz says why
        os.makedirs(serve_dir, exist_ok=True)
        self.request_log_path = os.path.join(serve_dir, REQUEST_LOG)
        self.feedback_path = os.path.join(serve_dir, FEEDBACK_LOG)
        self._log_lock = threading.Lock()
        self.metrics = Metrics(self)

    def ready(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine, self.tokenizer = engine, tokenizer

    def is_ready(self) -> bool:
        return self.engine is not None and not self.draining and not self.engine.failure

    def append(self, path: str, record: dict) -> None:
        with self._log_lock, open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def observe_step(self, busy: int) -> None:
        self.metrics.occupancy.observe(busy / self.config.slots)


# ---------------------------------------------------------------------------------------- validation
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n",
                     "stream", "logprobs", "stream_options", "user", "echo"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class CompletionParams:
    prompts: list[str]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    seed: int | None
    n: int
    stream: bool
    logprobs: int | None
    include_usage: bool


def _check_fields(body: Any, allowed: set[str], required: Sequence[str]) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}",
                       param=unknown[0])
    for name in required:
        if name not in body:
            raise ApiError(400, f"missing required field {name!r}", param=name)


def parse_completion(body: Any, config: ServeConfig, top_logprobs: int) -> CompletionParams:
    """The validated settings of a /v1/completions body; ApiError(400) names the first bad field."""
    _check_fields(body, COMPLETION_FIELDS, ["prompt"])
    prompt = body["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = config.max_new_tokens
    if not _is_int(max_tokens) or not 1 <= max_tokens <= config.max_new_tokens:
        raise ApiError(400, f"'max_tokens' must be an integer from 1 to {config.max_new_tokens}, got {max_tokens!r}",
                       param="max_tokens")
    temperature = body.get("temperature", config.default_temperature)
    temperature = config.default_temperature if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 100:
        raise ApiError(400, f"'temperature' must be a number >= 0, got {temperature!r}", param="temperature")
    top_p = 1.0 if body.get("top_p") is None else body["top_p"]
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p!r}", param="top_p")
    top_k = 0 if body.get("top_k") is None else body["top_k"]
    if not _is_int(top_k) or top_k < 0:
        raise ApiError(400, f"'top_k' must be an integer >= 0 (0: all tokens), got {top_k!r}", param="top_k")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise ApiError(400, f"'seed' must be a non-negative integer, got {seed!r}", param="seed")
    n = 1 if body.get("n") is None else body["n"]
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"'n' must be an integer from 1 to {MAX_N}, got {n!r}", param="n")
    stream = bool(body.get("stream") or False)
    if not isinstance(body.get("stream", False), bool | None):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= top_logprobs):
        raise ApiError(400, f"'logprobs' must be an integer from 0 to {top_logprobs}, got {logprobs!r}",
                       param="logprobs")
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported", param="echo")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' may only hold 'include_usage'", param="stream_options")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "'user' must be a string", param="user")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", param="model")
    return CompletionParams(prompts, max_tokens, float(temperature), float(top_p), top_k, stop, seed, n, stream,
                            logprobs, bool(options.get("include_usage")))


CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop",
               "seed", "n", "stream", "stream_options", "user"}


def parse_chat(body: Any, config: ServeConfig) -> tuple[list[dict], CompletionParams]:
    """(messages, settings) of a /v1/chat/completions body: the messages checked as chat SFT data is,
    the settings as /v1/completions reads them (max_tokens by default: as many as the server allows)."""
    _check_fields(body, CHAT_FIELDS, ["messages"])
    problem = chat.check_messages(body, to_answer=True)
    if problem:
        raise ApiError(400, f"'messages': {problem}", param="messages")
    settings = {k: v for k, v in body.items() if k not in ("messages", "max_completion_tokens")}
    settings["max_tokens"] = body.get("max_completion_tokens", body.get("max_tokens"))
    return body["messages"], parse_completion({**settings, "prompt": ""}, config, top_logprobs=0)


# ---------------------------------------------------------------------------------------- the app
def build_app(state: ServerState) -> Starlette:
    """The Starlette app serving `state` (its engine once state.ready() has been called)."""

    async def read_json(request: HttpRequest) -> Any:
        declared = request.headers.get("content-length")
        limit = state.config.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body over {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body over {limit} bytes")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def check_key(request: HttpRequest) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def ready_engine() -> tuple[Engine, Tokenizer]:
        if state.draining:
            raise ApiError(503, "the server is shutting down")
        if state.engine is None or state.tokenizer is None:
            raise ApiError(503, "the model is still loading and compiling; retry when /readyz says ready",
                           headers={"Retry-After": "5"})
        if state.engine.failure:
            raise ApiError(503, f"the decode engine failed ({state.engine.failure}); restart the server")
        return state.engine, state.tokenizer

    def endpoint(name: str, handler, *, public: bool = False):
        async def wrapped(request: HttpRequest) -> Response:
            started = time.monotonic()
            try:
                if not public:
                    check_key(request)
                response = await handler(request)
            except ApiError as e:
                response = e.response()
            state.metrics.requests.labels(name, str(response.status_code)).inc()
            if not isinstance(response, StreamingResponse):
                state.metrics.latency.labels(name).observe(time.monotonic() - started)
            return response

        return wrapped

    # ------------------------------------------------------------------ completions
    async def completions(request: HttpRequest) -> Response:
        engine, tokenizer = ready_engine()
        body = await read_json(request)
        params = parse_completion(body, state.config, engine.config.top_logprobs)
        eos = [tokenizer.eos_id] if state.config.prompt_eos else []
        prompt_ids = []
        for i, text in enumerate(params.prompts):
            ids = tokenizer.encode(text) + eos
            if len(ids) > state.config.max_prompt_tokens:
                raise ApiError(400, f"prompt {i} has {len(ids)} tokens; at most {state.config.max_prompt_tokens} "
                               "are allowed", param="prompt")
            prompt_ids.append(ids)
        return await run(request, engine, tokenizer, params, prompt_ids, is_chat=False)

    async def chat_completions(request: HttpRequest) -> Response:
        engine, tokenizer = ready_engine()
        messages, params = parse_chat(await read_json(request), state.config)
        # The chat format ends the prompt with EOS itself, whatever ServeConfig.prompt_eos says.
        ids = chat.prompt_tokens(chat.ChatTemplate(), messages, tokenizer.encode, tokenizer.eos_id)
        if len(ids) > state.config.max_prompt_tokens:
            raise ApiError(400, f"the messages take {len(ids)} tokens; at most {state.config.max_prompt_tokens} are "
                           "allowed", param="messages")
        return await run(request, engine, tokenizer, params, [ids], is_chat=True)

    async def run(request: HttpRequest, engine: Engine, tokenizer: Tokenizer, params: CompletionParams,
                  prompt_ids: list[list[int]], *, is_chat: bool) -> Response:
        """Decodes params.n choices of each prompt: the whole response, or a stream of server-sent events."""
        choices = len(prompt_ids) * params.n
        if choices > engine.config.max_queue:
            raise ApiError(400, f"{len(prompt_ids)} prompts x n={params.n} is {choices} sequences; the server queues "
                           f"at most {engine.config.max_queue}: send fewer at a time", param="prompt")
        if engine.config.max_queue - engine.queue_depth() < choices:
            raise ApiError(429, "too many requests waiting; retry later", headers={"Retry-After": "1"})

        arrival, started = time.time(), time.monotonic()
        completion_id = "cmpl-" + secrets.token_hex(12)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        deadline = started + state.config.request_timeout_s
        base_seed = params.seed if params.seed is not None else secrets.randbits(32)
        requests = []
        for p, ids in enumerate(prompt_ids):
            for j in range(params.n):
                index = p * params.n + j

                def emit(event, index=index):
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))

                requests.append(Request(prompt=ids, max_new_tokens=params.max_tokens, emit=emit,
                                        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                        seed=base_seed + index, deadline=deadline,
                                        top_logprobs=bool(params.logprobs)))
        for r in requests:
            if not engine.submit(r):
                for other in requests:
                    other.cancel()
                raise ApiError(429, "too many requests waiting; retry later", headers={"Retry-After": "1"})
        completion = CompletionRun(state, tokenizer, params, requests, events, completion_id, arrival, started,
                                   sum(len(ids) for ids in prompt_ids) * params.n, chat=is_chat)
        if params.stream:
            return StreamingResponse(completion.stream(request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await completion.whole(request)

    # ------------------------------------------------------------------ score
    async def score(request: HttpRequest) -> Response:
        engine, tokenizer = ready_engine()
        body = await read_json(request)
        _check_fields(body, {"model", "prompt", "continuations"}, ["prompt", "continuations"])
        prompt, continuations = body["prompt"], body["continuations"]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string", param="prompt")
        if (not isinstance(continuations, list) or not 1 <= len(continuations) <= 64
                or not all(isinstance(c, str) for c in continuations)):
            raise ApiError(400, "'continuations' must be a list of 1 to 64 strings", param="continuations")
        eos = [tokenizer.eos_id]
        prompt_ids = tokenizer.encode(prompt) + (eos if state.config.prompt_eos else [])
        if len(prompt_ids) > state.config.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; at most {state.config.max_prompt_tokens} "
                           "are allowed", param="prompt")
        pairs = []
        for i, text in enumerate(continuations):
            ids = tokenizer.encode(text) + eos
            if len(ids) > state.config.max_new_tokens:
                raise ApiError(400, f"continuation {i} has {len(ids)} tokens; at most {state.config.max_new_tokens} "
                               "are allowed", param="continuations")
            pairs.append((prompt_ids, ids))
        scores = await asyncio.to_thread(engine.score, pairs)
        return JSONResponse({
            "object": "score", "model": state.model_name, "checkpoint_step": engine.params_step,
            "scores": [{"index": i, "continuation": c, "logprob": s, "tokens": len(pairs[i][1])}
                       for i, (c, s) in enumerate(zip(continuations, scores, strict=True))],
            "usage": {"prompt_tokens": len(prompt_ids) * len(pairs), "scored_tokens": sum(len(p[1]) for p in pairs)}})

    # ------------------------------------------------------------------ the rest
    async def feedback(request: HttpRequest) -> Response:
        body = await read_json(request)
        _check_fields(body, {"id", "rating", "comment"}, ["id", "rating"])
        if not isinstance(body["id"], str) or not ID_PATTERN.match(body["id"]):
            raise ApiError(400, "'id' must be a completion id as returned by /v1/completions (cmpl-...)", param="id")
        if not _is_number(body["rating"]):
            raise ApiError(400, "'rating' must be a number", param="rating")
        comment = body.get("comment", "")
        if not isinstance(comment, str) or len(comment) > 4000:
            raise ApiError(400, "'comment' must be a string of at most 4000 characters", param="comment")
        state.append(state.feedback_path, {"id": body["id"], "time": time.time(), "rating": body["rating"],
                                           "comment": comment})
        return JSONResponse({"object": "feedback", "id": body["id"], "recorded": True})

    async def models(request: HttpRequest) -> Response:
        step = state.engine.params_step if state.engine else None
        return JSONResponse({"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                                         "owned_by": "t5lite", "checkpoint_step": step}]})

    async def healthz(request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: HttpRequest) -> Response:
        if state.is_ready():
            return JSONResponse({"status": "ready", "checkpoint_step": state.engine.params_step})
        failure = state.engine.failure if state.engine is not None else None
        reason = "draining" if state.draining else (
            state.failed or (f"engine failed: {failure}" if failure else "loading"))
        return JSONResponse({"status": reason}, status_code=503)

    async def metrics(request: HttpRequest) -> Response:
        return Response(prometheus_client.generate_latest(state.metrics.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    routes = [
        Route("/v1/completions", endpoint("completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint("chat_completions", chat_completions), methods=["POST"]),
        Route("/v1/score", endpoint("score", score), methods=["POST"]),
        Route("/v1/feedback", endpoint("feedback", feedback), methods=["POST"]),
        Route("/v1/models", endpoint("models", models), methods=["GET"]),
        Route("/healthz", endpoint("healthz", healthz, public=True), methods=["GET"]),
        Route("/readyz", endpoint("readyz", readyz, public=True), methods=["GET"]),
        Route("/metrics", endpoint("metrics", metrics), methods=["GET"]),
    ]
    return Starlette(routes=routes)


class CompletionRun:
    """The choices of one /v1/completions (or, chat: /v1/chat/completions) request as the engine produces them."""

    def __init__(self, state: ServerState, tokenizer: Tokenizer, params: CompletionParams, requests: list[Request],
                 events: asyncio.Queue, completion_id: str, arrival: float, started: float, prompt_tokens: int,
                 *, chat: bool = False):
        self.state, self.tokenizer, self.params, self.requests = state, tokenizer, params, requests
        self.chat = chat
        self.object = "chat.completion" if chat else "text_completion"
        self.events, self.id, self.arrival, self.started = events, completion_id, arrival, started
        self.prompt_tokens = prompt_tokens
        count = len(requests)
        self.tokens: list[list[Token]] = [[] for _ in range(count)]
        self.texts = [""] * count  # text so far, cut at a stop string
        self.sent = [0] * count  # characters streamed
        self.finish: list[str | None] = [None] * count
        self.first_token_at: float | None = None
        self.params_step: int | None = None

    def _on(self, index: int, event: Token | Finished) -> None:
        if self.finish[index] is not None:
            return  # a stop string ended it; the engine's own end follows
        if isinstance(event, Finished):
            self.finish[index] = event.reason
            self.params_step = event.params_step if event.params_step is not None else self.params_step
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.state.metrics.ttft.observe(self.first_token_at - self.started)
        self.state.metrics.tokens.inc()
        self.tokens[index].append(event)
        text = self.tokenizer.decode([t.id for t in self.tokens[index]])
        for stop in self.params.stop:
            at = text.find(stop)
            if at >= 0:
                self.texts[index] = text[:at]
                self.finish[index] = "stop"
                self.requests[index].cancel()
                return
        self.texts[index] = text

    def _done(self) -> bool:
        return all(f is not None for f in self.finish)

    async def _next(self, http: HttpRequest) -> bool:
        """Waits for the next engine event; False if the client went away (its requests are cancelled)."""
        while True:
            try:
                index, event = await asyncio.wait_for(self.events.get(), 0.25)
            except TimeoutError:
                if await http.is_disconnected():
                    self.cancel()
                    return False
                continue
            self._on(index, event)
            return True

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    def _logprobs(self, index: int, start: int = 0) -> dict | None:
        k = self.params.logprobs
        if k is None:
            return None
        tokens = self.tokens[index][start:]
        piece = lambda i: self.tokenizer.decode([i])  # noqa: E731
        # Each token's text is what it adds to the decoded prefix (so the pieces join to the text).
        ids = [t.id for t in self.tokens[index]]
        prefixes = [self.tokenizer.decode(ids[:end]) for end in range(start, len(ids) + 1)]
        texts = [b[len(a):] if b.startswith(a) else piece(i)
                 for a, b, i in zip(prefixes[:-1], prefixes[1:], ids[start:], strict=True)]
        offsets = [len(p) for p in prefixes[:-1]]
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{piece(i): lp for i, lp in zip(t.top_ids[:k], t.top_logprobs[:k], strict=True)}
                                 for t in tokens] if k > 0 else None,
                "text_offset": offsets}

    def _usage(self) -> dict:
        completion = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _fingerprint(self) -> str:
        step = next((r.params_step for r in self.requests if r.params_step is not None), self.params_step)
        return f"t5lite-step-{step}"

    def _log(self, status: int) -> None:
        now = time.monotonic()
        self.state.append(self.state.request_log_path, {
            "id": self.id, "arrival": self.arrival, "status": status, "latency_s": round(now - self.started, 6),
            "ttft_s": None if self.first_token_at is None else round(self.first_token_at - self.started, 6),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": sum(len(t) for t in self.tokens),
            "finish_reasons": self.finish, "checkpoint_step": self.params_step, "stream": self.params.stream})

    async def whole(self, http: HttpRequest) -> Response:
        try:
            while not self._done():
                if not await self._next(http):
                    self._log(499)  # client closed the connection
                    return Response(status_code=499)
        except asyncio.CancelledError:
            self.cancel()
            raise
        if "timeout" in self.finish:
            self._log(504)
            raise ApiError(504, f"the request took longer than {self.state.config.request_timeout_s} s")
        if "error" in self.finish:  # the decode engine died (its traceback is in the server's log)
            self._log(500)
            raise ApiError(500, f"the decode engine failed ({self.state.engine.failure}); restart the server")
        if "cancelled" in self.finish:  # the server is shutting down
            self._log(503)
            raise ApiError(503, "the server stopped before the request finished")
        self._log(200)
        return JSONResponse({
            "id": self.id, "object": self.object, "created": int(self.arrival), "model": self.state.model_name,
            "system_fingerprint": self._fingerprint(),
            "choices": [self._choice(i, self.texts[i], self._logprobs(i)) for i in range(len(self.requests))],
            "usage": self._usage()})

    def _choice(self, index: int, text: str, logprobs: dict | None) -> dict:
        """One choice (streaming: its delta) as the completions or the chat completions API writes it."""
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": self.finish[index]}
        return {"index": index, "delta" if self.params.stream else "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": self.finish[index]}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        payload = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": int(self.arrival),
                   "model": self.state.model_name, "system_fingerprint": self._fingerprint(), "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream(self, http: HttpRequest):
        """Server-sent events: text deltas per choice, a last chunk per choice with its finish_reason,
        usage (stream_options.include_usage), then [DONE]. Text that could still become a stop string
        is held back until it cannot."""
        holdback = max((len(s) for s in self.params.stop), default=1) - 1
        streamed_tokens = [0] * len(self.requests)
        reported = [False] * len(self.requests)
        status = 200
        try:
            while True:
                if self._done() and all(reported):
                    break
                if not self._done() and not await self._next(http):
                    status = 499
                    return
                for i in range(len(self.requests)):
                    if reported[i]:
                        continue
                    text = self.texts[i]
                    upto = len(text) if self.finish[i] is not None else max(self.sent[i], len(text) - holdback)
                    if upto > self.sent[i] or self.finish[i] is not None:
                        delta = text[self.sent[i]:upto]
                        logprobs = self._logprobs(i, streamed_tokens[i])
                        streamed_tokens[i] = len(self.tokens[i])
                        self.sent[i] = upto
                        if delta or self.finish[i] is not None:
                            yield self._chunk([self._choice(i, delta, logprobs)])
                        reported[i] = self.finish[i] is not None
            if self.params.include_usage:
                yield self._chunk([], self._usage())
            yield "data: [DONE]\n\n"
            status = 504 if "timeout" in self.finish else 200
        except (asyncio.CancelledError, OSError):
            status = 499
            raise
        finally:
            self.cancel()
            endpoint = "chat_completions" if self.chat else "completions"
            self.state.metrics.latency.labels(endpoint).observe(time.monotonic() - self.started)
            self._log(status)
