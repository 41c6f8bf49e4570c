"""Continuous batching: a decode engine with a fixed number of slots over the model's cached decoding.

    engine = Engine(model, params, step=600, config=EngineConfig(slots=8))   # compiles everything
    engine.start()
    engine.submit(Request(prompt=[...], max_new_tokens=32, emit=callback))  # callback: Token / Finished

One device state holds a KV cache of `slots` rows, each row one request at its own position (the
model's decoding takes a [slots] vector of positions). The engine thread loops:
  1. drop cancelled / timed-out requests (their slots are free at once);
  2. admit waiting requests into free slots: a prefill (encoder-decoder: the encoder and the
     cross-attention keys/values; decoder-only: BOS + prompt) of a (batch, length) bucket, its rows
     written into the free slots of the cache;
  3. one decode step of every slot (idle slots compute and are ignored), sampling each row with its
     own temperature / top-k / top-p and seed; a row that ends (EOS, max tokens) frees its slot.
Every program (prefill per bucket, step, score) is compiled in the constructor; the request path
calls compiled executables only, which refuse any other shape. A slot's first token comes from a
step fed the last prompt token at position prompt_length - 1, as Model.predict_batch's loop does,
so a greedy request gives the tokens of t5lite.infer. This module needs jax alone (no TensorFlow).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5lite import partitioning
from t5lite.errors import UserError
from t5lite.model import decoding
from t5lite.model.models import Model

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """slots: rows decoded together. max_prompt_tokens: prompt tokens at most (EOS included; the
    encoder length of an encoder-decoder). max_new_tokens: generated tokens at most. prompt_buckets:
    prefill lengths compiled (max_prompt_tokens is always one). prefill_batches: prefill batch sizes
    compiled (requests admitted together). max_queue: waiting requests at most. prefix_lm: a
    decoder-only model trained as a prefix LM (prompt attended both ways). top_logprobs: most likely
    tokens reported per position at most. score_batch: rows of one /v1/score program call.
    steps_per_call: decode steps per compiled call (one dispatch and one host round trip for several
    tokens; a request is admitted, and a finished row freed, at most steps_per_call - 1 steps later)."""

    slots: int = 8
    max_prompt_tokens: int = 128
    max_new_tokens: int = 64
    prompt_buckets: tuple[int, ...] = (32,)
    prefill_batches: tuple[int, ...] = (1, 4)
    max_queue: int = 64
    prefix_lm: bool = False
    eos_id: int = 1
    top_logprobs: int = 5
    score_batch: int = 4
    steps_per_call: int = 1

    def __post_init__(self):
        if min(self.slots, self.max_prompt_tokens, self.max_new_tokens, self.max_queue, self.score_batch,
               self.steps_per_call) < 1:
            raise UserError(f"EngineConfig: slots, max_prompt_tokens, max_new_tokens, max_queue, score_batch and "
                            f"steps_per_call must be at least 1; got {self}.")
        if not self.prefill_batches or min(self.prefill_batches) < 1 or min(self.prompt_buckets, default=1) < 1:
            raise UserError(f"EngineConfig: prefill_batches and prompt_buckets need sizes >= 1; got {self}.")

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted({b for b in self.prompt_buckets if b < self.max_prompt_tokens} | {self.max_prompt_tokens}))

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(sorted({min(b, self.slots) for b in self.prefill_batches}))


@dataclasses.dataclass(frozen=True)
class Token:
    """A generated token: its id, log-probability, and the most likely tokens at its position."""

    id: int
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Finished:
    """A request ended: reason "stop" (EOS), "length" (max tokens), "cancelled" or "timeout"."""

    reason: str
    params_step: int | None


@dataclasses.dataclass(eq=False)
class Request:
    """prompt: token ids as the model reads them (EOS included; no BOS). emit: called on the engine
    thread with each Token and then one Finished. deadline: time.monotonic() after which it ends."""

    prompt: Sequence[int]
    max_new_tokens: int
    emit: Callable[[Token | Finished], None]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    deadline: float | None = None
    top_logprobs: bool = False  # report the most likely tokens at each position (else Token.top_* are 0)
    cancelled: bool = False  # set from any thread; the engine frees the slot before its next step
    params_step: int | None = None  # the checkpoint step it is decoded with (set on admission)

    def cancel(self) -> None:
        self.cancelled = True


def smallest_fitting(sizes: Sequence[int], n: int) -> int:
    """The smallest of sorted `sizes` that is >= n (the largest if none is)."""
    return next((s for s in sizes if s >= n), sizes[-1])


class Engine:
    """The slots, their device state and the thread that decodes them; see the module docstring."""

    def __init__(self, model: Model, params: Any, *, step: int | None, config: EngineConfig,
                 mesh: jax.sharding.Mesh | None = None, rules=(),
                 observe_step: Callable[[int], None] | None = None):
        """params: the model's params (as restored; converted to the decode layout here). observe_step:
        called after each decode step with the number of busy slots (metrics)."""
        self.model, self.config = model, config
        self.encoder_decoder = model.config.is_encoder_decoder
        self.mesh = mesh or partitioning.make_mesh()
        self.rules = rules
        self.observe_step = observe_step or (lambda busy: None)
        c = config
        # Decoder positions: BOS + prompt + new tokens (encoder-decoder: BOS + new tokens).
        self.cache_length = 1 + c.max_new_tokens + (0 if self.encoder_decoder else c.max_prompt_tokens)
        self._to_decode_layout = jax.jit(model.decode_params)
        # raw_params: as restored (scoring runs the training network); params: the decode layout.
        self.raw_params, self.params, self.params_step = params, self._to_decode_layout(params), step
        self._compile()
        self.state = self._placed_fresh_state()
        s = c.slots
        self.requests: list[Request | None] = [None] * s
        self.tokens = np.zeros(s, np.int32)
        self.positions = np.zeros(s, np.int32)
        self.generated = np.zeros(s, np.int32)
        self.temperature = np.zeros(s, np.float32)
        self.top_k = np.zeros(s, np.int32)
        self.top_p = np.ones(s, np.float32)
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self._pending_params: tuple[Any, int | None] | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.failure: str | None = None  # why the decode thread died (a device error): no request is served

    # ---------------------------------------------------------------- programs
    def _jit(self, fn, donate: tuple[int, ...] = (), out_shardings=None):
        return jax.jit(partitioning.with_sharding_rules(fn, self.mesh, self.rules), donate_argnums=donate,
                       out_shardings=out_shardings)

    def _slot_sharding(self, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
        """Where a [slots, ...] array of the decode state lives: its rows split over the mesh's data axis
        (dp) when they divide evenly, else on every device (tp: the params carry the split)."""
        data = self.mesh.shape["data"]
        split = data > 1 and len(shape) > 0 and shape[0] % data == 0
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data" if split else None))

    def _decode(self, params, cache, tokens, position, encoder_segment_ids=None, encoded=None, prefix_lengths=None):
        """One cached decoder call: (logits [batch, n, vocab], cache)."""
        variables = {"params": params, "cache": cache}
        if self.encoder_decoder:
            logits, out = self.model.decode_module.apply(
                variables, tokens, encoder_segment_ids, position, self.cache_length, encoded,
                method="decode", mutable=["cache"])
        else:
            logits, out = self.model.decode_module.apply(
                variables, tokens, position, self.cache_length, prefix_lengths, method="decode", mutable=["cache"])
        return logits, out["cache"]

    def _zero_cache(self, params, rows: int):
        """An all-zero cache of `rows` rows (shapes from an abstract call)."""
        tokens = jax.ShapeDtypeStruct((rows, self.cache_length), jnp.int32)
        if self.encoder_decoder:
            e = self.config.max_prompt_tokens
            segments = jax.ShapeDtypeStruct((rows, e), jnp.int32)
            encoded = jax.ShapeDtypeStruct((rows, e, self.model.config.emb_dim), self.model.config.compute_dtype)
            shapes = jax.eval_shape(lambda t, s, x: self._decode(params, {}, t, jnp.zeros((), jnp.int32), s, x)[1],
                                    tokens, segments, encoded)
        else:
            shapes = jax.eval_shape(lambda t: self._decode(params, {}, t, jnp.zeros((), jnp.int32))[1], tokens)
        return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

    def _fresh_state(self) -> dict[str, Array]:
        s, c = self.config.slots, self.config
        state = {"cache": self._zero_cache(self.params, s), "keys": jnp.zeros((s, 2), jnp.uint32)}
        if self.encoder_decoder:
            state["encoder_segment_ids"] = jnp.zeros((s, c.max_prompt_tokens), jnp.int32)
        elif c.prefix_lm:
            state["prefix_lengths"] = jnp.zeros((s,), jnp.int32)
        return state

    def _placed_fresh_state(self) -> dict[str, Array]:
        return jax.device_put(self._fresh_state(), self._state_shardings)

    def _prefill(self, params, state, prompts, prompt_lengths, slots, keys):
        """Writes the caches of new requests into `slots` ([rows]; out-of-range rows are padding).
        prompts [rows, bucket] (encoder-decoder: encoder tokens; decoder-only: BOS + prompt)."""
        rows, c = prompts.shape[0], self.config
        state = dict(state)
        cache = self._zero_cache(params, rows)
        if self.encoder_decoder:
            segments = (prompts > 0).astype(jnp.int32)
            encoded = self.model.decode_module.apply({"params": params}, prompts, segments, method="encode")
            pad = c.max_prompt_tokens - prompts.shape[1]
            encoded = jnp.pad(encoded, ((0, 0), (0, pad), (0, 0)))
            segments = jnp.pad(segments, ((0, 0), (0, pad)))
            _, cache = self._decode(params, cache, prompts[:, :0], 0, segments, encoded)
            state["encoder_segment_ids"] = state["encoder_segment_ids"].at[slots].set(segments, mode="drop")
        else:
            prefix = prompt_lengths if c.prefix_lm else None
            _, cache = self._decode(params, cache, prompts, 0, prefix_lengths=prefix)
            if c.prefix_lm:
                state["prefix_lengths"] = state["prefix_lengths"].at[slots].set(prompt_lengths, mode="drop")
        state["cache"] = jax.tree_util.tree_map(lambda old, new: old.at[slots].set(new, mode="drop"),
                                                state["cache"], cache)
        state["keys"] = state["keys"].at[slots].set(keys, mode="drop")
        return state

    def _step(self, params, state, tokens, positions, temperature, top_k, top_p, want_top):
        """One decode step of every slot -> (state, chosen [slots], its log-prob, top ids, top log-probs).
        want_top (a bool scalar): compute the top tokens (a sort of the vocabulary per row: ~20% of a
        small model's step on CPU), else zeros."""
        state = dict(state)
        logits, state["cache"] = self._decode(
            params, state["cache"], tokens[:, None], positions, state.get("encoder_segment_ids"),
            prefix_lengths=state.get("prefix_lengths"))
        logits = logits[:, -1]
        keys = jax.vmap(jax.random.fold_in)(state["keys"], positions)
        chosen = decoding.sample_rows(logits, keys, temperature, top_k, top_p)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        chosen_log_prob = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
        k = self.config.top_logprobs
        rows = log_probs.shape[0]
        top_log_probs, top_ids = jax.lax.cond(
            want_top, lambda: tuple(jax.lax.top_k(log_probs, k)),
            lambda: (jnp.zeros((rows, k), log_probs.dtype), jnp.zeros((rows, k), jnp.int32)))
        return state, chosen, chosen_log_prob, top_ids, top_log_probs

    def _steps(self, params, state, tokens, positions, temperature, top_k, top_p, want_top):
        """config.steps_per_call steps of _step, each feeding its tokens to the next -> (state, chosen,
        log-prob, top ids, top log-probs), each [steps, slots, ...]. Rows that end inside the call
        decode on (their tokens are dropped; a new request replaces the whole cache row)."""
        def body(carry, _):
            state, tokens, positions = carry
            state, *out = self._step(params, state, tokens, positions, temperature, top_k, top_p, want_top)
            return (state, out[0], jnp.minimum(positions + 1, self.cache_length - 1)), out

        (state, _, _), (chosen, log_prob, top_ids, top_log_probs) = jax.lax.scan(
            body, (state, tokens, positions), None, length=self.config.steps_per_call)
        return state, chosen, log_prob, top_ids, top_log_probs

    def _score(self, params, batch):
        return self.model.score_batch(params, batch, bidirectional_prompt=self.config.prefix_lm)

    def _compile(self) -> None:
        c, s = self.config, self.config.slots
        i32, f32 = jnp.int32, jnp.float32

        # Compiled executables accept only the shardings they were compiled for: every input names its
        # own (the params as restored onto the mesh, the state by _slot_sharding, host arrays on every
        # device), and the state comes out placed as it went in, to be passed back at the next call.
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        def spec(shape, dtype=i32, sharding=replicated):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        def placed(tree):
            return jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype, x.sharding), tree)

        shapes = jax.eval_shape(self._fresh_state)
        self._state_shardings = jax.tree_util.tree_map(lambda x: self._slot_sharding(x.shape), shapes)
        state = jax.tree_util.tree_map(lambda x, sh: spec(x.shape, x.dtype, sh), shapes, self._state_shardings)
        slots = self._slot_sharding((s,))
        params = placed(self.params)
        started = time.perf_counter()
        step = self._jit(self._steps, donate=(1,), out_shardings=(self._state_shardings, *[None] * 4))
        self._compiled_step = step.lower(
            params, state, spec((s,), i32, slots), spec((s,), i32, slots), spec((s,), f32, slots),
            spec((s,), i32, slots), spec((s,), f32, slots), spec((), jnp.bool_)).compile()
        self._compiled_prefill = {}
        extra = 0 if self.encoder_decoder else 1  # BOS
        prefill = self._jit(self._prefill, donate=(1,), out_shardings=self._state_shardings)
        for rows in c.batches:
            for length in c.buckets:
                self._compiled_prefill[rows, length] = prefill.lower(
                    params, state, spec((rows, length + extra)), spec((rows,)), spec((rows,)),
                    spec((rows, 2), jnp.uint32)).compile()
        batch = self.score_shapes()
        self._compiled_score = self._jit(self._score).lower(
            placed(self.raw_params), {k: spec(v) for k, v in batch.items()}).compile()
        self.compile_seconds = time.perf_counter() - started

    # ---------------------------------------------------------------- scoring
    def score_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        rows, targets = c.score_batch, c.max_new_tokens
        if self.encoder_decoder:
            return {"encoder_input_tokens": (rows, c.max_prompt_tokens), "decoder_input_tokens": (rows, targets),
                    "decoder_target_tokens": (rows, targets), "decoder_loss_weights": (rows, targets)}
        length = c.max_prompt_tokens + targets
        return {"decoder_input_tokens": (rows, length), "decoder_target_tokens": (rows, length),
                "decoder_loss_weights": (rows, length), "decoder_causal_attention": (rows, length)}

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
        """Log-likelihood of each continuation given its prompt (token ids, EOS included in both, as
        t5lite.infer's score mode reads them); prompts/continuations must fit the limits."""
        shapes, results = self.score_shapes(), []
        rows = self.config.score_batch
        for start in range(0, len(pairs), rows):
            chunk = pairs[start:start + rows]
            batch = {k: np.zeros(v, np.int32) for k, v in shapes.items()}
            for r, (prompt, continuation) in enumerate(chunk):
                if self.encoder_decoder:
                    batch["encoder_input_tokens"][r, :len(prompt)] = prompt
                    targets = list(continuation)
                    batch["decoder_target_tokens"][r, :len(targets)] = targets
                    batch["decoder_input_tokens"][r, 1:len(targets)] = targets[:-1]
                    batch["decoder_loss_weights"][r, :len(targets)] = 1
                else:
                    targets = list(prompt) + list(continuation)
                    batch["decoder_target_tokens"][r, :len(targets)] = targets
                    batch["decoder_input_tokens"][r, 1:len(targets)] = targets[:-1]
                    batch["decoder_loss_weights"][r, len(prompt):len(targets)] = 1
                    batch["decoder_causal_attention"][r, :len(prompt) + 1] = 1
            with self.lock:
                params = self.raw_params
            scores = np.asarray(self._compiled_score(params, batch))
            results.extend(float(x) for x in scores[:len(chunk)])
        return results

    # ---------------------------------------------------------------- requests
    def submit(self, request: Request) -> bool:
        """Queues a request; False (not queued) when max_queue requests already wait."""
        with self.lock:
            if len(self.waiting) >= self.config.max_queue or self._stopping:
                return False
            self.waiting.append(request)
            self.lock.notify()
        return True

    def queue_depth(self) -> int:
        return len(self.waiting)

    def busy_slots(self) -> int:
        return sum(r is not None for r in self.requests)

    def swap_params(self, params: Any, step: int | None) -> None:
        """Serves `params` from now on: requests in flight finish on the old ones (admission pauses
        until they have), requests admitted later use the new ones."""
        decode_params = self._to_decode_layout(params)
        with self.lock:
            self._pending_params = (params, decode_params, step)
            self.lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="t5lite-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread after the current step; waiting and running requests end as cancelled."""
        with self.lock:
            self._stopping = True
            self.lock.notify()
        if self._thread is not None:
            self._thread.join()

    # ---------------------------------------------------------------- the loop
    def _run(self) -> None:
        reason = "cancelled"
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001  a device or runtime error: end every request now, not never
            self.failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc()
            reason = "error"
        with self.lock:
            self._stopping = True  # submit() refuses from now on
        for slot, request in enumerate(self.requests):
            if request is not None:
                self._free(slot, reason)
        with self.lock:
            waiting, self.waiting = list(self.waiting), collections.deque()
        for request in waiting:
            request.emit(Finished(reason, None))

    def _loop(self) -> None:
        while True:
            with self.lock:
                while (not self._stopping and not self.waiting and self.busy_slots() == 0
                       and self._pending_params is None):
                    self.lock.wait()
                if self._stopping:
                    break
                if self._pending_params is not None and self.busy_slots() == 0:
                    self.raw_params, self.params, self.params_step = self._pending_params
                    self._pending_params = None
            self._drop_ended()
            if self._pending_params is None:
                self._admit()
            if self.busy_slots():
                self._decode_step()

    def _ended(self, request: Request, now: float) -> str | None:
        if request.cancelled:
            return "cancelled"
        if request.deadline is not None and now > request.deadline:
            return "timeout"
        return None

    def _drop_ended(self) -> None:
        now = time.monotonic()
        for slot, request in enumerate(self.requests):
            if request is not None and (reason := self._ended(request, now)):
                self._free(slot, reason)
        with self.lock:
            ended = [(r, reason) for r in self.waiting if (reason := self._ended(r, now))]
            for request, _ in ended:
                self.waiting.remove(request)
        for request, reason in ended:
            request.emit(Finished(reason, None))

    def _free(self, slot: int, reason: str) -> None:
        request, self.requests[slot] = self.requests[slot], None
        request.emit(Finished(reason, request.params_step))

    def _admit(self) -> None:
        c = self.config
        while True:
            free = [s for s, r in enumerate(self.requests) if r is None]
            with self.lock:
                count = min(len(free), len(self.waiting), c.batches[-1])
                admitted = [self.waiting.popleft() for _ in range(count)]
            if not admitted:
                return
            rows = smallest_fitting(c.batches, len(admitted))
            length = smallest_fitting(c.buckets, max(len(r.prompt) for r in admitted))
            extra = 0 if self.encoder_decoder else 1
            prompts = np.zeros((rows, length + extra), np.int32)
            lengths = np.ones(rows, np.int32)
            slots = np.full(rows, c.slots, np.int32)  # out of range: padding rows write nothing
            keys = np.zeros((rows, 2), np.uint32)
            for row, (request, slot) in enumerate(zip(admitted, free, strict=False)):
                prompts[row, extra:extra + len(request.prompt)] = request.prompt
                lengths[row] = len(request.prompt) + extra
                slots[row] = slot
                keys[row] = (0, request.seed & 0xFFFFFFFF)  # jax.random.PRNGKey(seed), without a device call
                request.params_step = self.params_step
                self.requests[slot] = request
                self.generated[slot] = 0
                self.temperature[slot], self.top_k[slot], self.top_p[slot] = (
                    request.temperature, request.top_k, request.top_p)
                if self.encoder_decoder:
                    self.positions[slot], self.tokens[slot] = 0, 0  # BOS at position 0
                else:
                    self.positions[slot] = lengths[row] - 1
                    self.tokens[slot] = prompts[row, lengths[row] - 1]
            self.state = self._compiled_prefill[rows, length](self.params, self.state, prompts, lengths, slots, keys)

    def _decode_step(self) -> None:
        c = self.config
        want_top = np.bool_(any(r is not None and r.top_logprobs for r in self.requests))
        self.state, chosen, log_prob, top_ids, top_log_probs = self._compiled_step(
            self.params, self.state, self.tokens, self.positions, self.temperature, self.top_k, self.top_p, want_top)
        chosen, log_prob = np.asarray(chosen), np.asarray(log_prob)  # [steps, slots]
        top_ids, top_log_probs = np.asarray(top_ids), np.asarray(top_log_probs)
        for step in range(c.steps_per_call):
            self.steps += 1
            self.observe_step(self.busy_slots())
            for slot, request in enumerate(self.requests):
                if request is None:
                    continue
                token = int(chosen[step, slot])
                self.generated[slot] += 1
                if token == c.eos_id:
                    self._free(slot, "stop")
                    continue
                request.emit(Token(token, float(log_prob[step, slot]), tuple(int(t) for t in top_ids[step, slot]),
                                   tuple(float(x) for x in top_log_probs[step, slot])))
                self.positions[slot] += 1
                self.tokens[slot] = token
                if (self.generated[slot] >= request.max_new_tokens
                        or self.positions[slot] >= self.cache_length - 1):
                    self._free(slot, "length")
