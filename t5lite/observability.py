"""What a training run reports about its own efficiency: MFU, step and data-wait time, compile
time, memory, and an optional JAX profiler trace of a range of steps.

MFU = model FLOPs of one step (t5lite.model.flops) / step seconds / (peak FLOP/s per device x
devices). The peak comes from a table keyed by device kind (bfloat16 dense datasheet figures,
the dtype training runs in on accelerators). A CPU has no datasheet peak, and a matmul timed at
start-up measures the machine's load as much as its cores (on a busy 2-core host it read low
enough to show 82-95% MFU), so on CPU no MFU is reported unless `peak_flops_per_device.override`
(gin) gives the peak; the override also replaces the table.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import gin
import jax

from t5lite.errors import UserError
from t5lite.model import flops
from t5lite.model.config import TransformerConfig

# Dense bfloat16 FLOP/s per chip (per GPU), from the vendors' datasheets (precompile.py uses them too).
PEAK_BF16_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12,
                   "H100": 989e12,  # SXM, dense (no sparsity)
                   "H200": 989e12,  # the H100's compute with more, faster HBM
                   "A100": 312e12}
# jax's device_kind -> a key of PEAK_BF16_FLOPS, matched as substrings, most specific first
# ("TPU v5 lite" is a v5e, "TPU v5" alone a v5p).
DEVICE_KINDS = (("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"),
                ("TPU v5p", "v5p"), ("TPU v5", "v5p"), ("TPU v4", "v4"), ("H100", "H100"), ("H200", "H200"),
                ("A100", "A100"))


@functools.cache
def measured_cpu_peak(size: int = 1536, budget_seconds: float = 1.0) -> float:
    """FLOP/s of a jitted [size, size] float32 matmul on the CPU: the best of as many timings as fit
    in about `budget_seconds`. Measured once per process (cached): it costs about a second.

    For benchmarks that compare runs measured in the same process (bench/), not for MFU: it moves
    with the machine's load, so it is no peak."""
    import jax.numpy as jnp  # noqa: PLC0415

    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), cpu)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile outside the timing
    best, deadline = float("inf"), time.perf_counter() + budget_seconds
    while time.perf_counter() < deadline or best == float("inf"):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


@gin.configurable
def peak_flops_per_device(device_kind: str, platform: str, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override` (gin: peak_flops_per_device.override) if set, else the
    table; None on CPU (no MFU), where no datasheet peak exists. Raises UserError for an accelerator
    the table lacks."""
    if override:
        return float(override)
    for kind, chip in DEVICE_KINDS:
        if kind.lower() in device_kind.lower():
            return PEAK_BF16_FLOPS[chip]
    if platform == "cpu":
        return None
    raise UserError(f"No peak FLOP/s known for device kind {device_kind!r}; set it with "
                    "--gin.peak_flops_per_device.override=<FLOP/s per device> to get MFU.")


def total_peak_flops(devices: Sequence[jax.Device]) -> float | None:
    """Peak FLOP/s of all `devices`, None if unknown (CPU without an override: no MFU). CPU devices
    of one process share the host's cores, so a CPU peak counts once per process, not once per
    (virtual) CPU device."""
    first = devices[0]
    per_device = peak_flops_per_device(first.device_kind, first.platform)
    if per_device is None:
        return None
    if first.platform == "cpu":
        return per_device * len({d.process_index for d in devices})
    return per_device * len(devices)


def memory_in_use_bytes(device: jax.Device) -> float:
    """Bytes in use on `device` as its backend reports them; on CPU (no memory_stats) the host
    process's resident set size."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_in_use" in stats:
        return float(stats["bytes_in_use"])
    return float(host_rss_bytes())


def host_rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_host_rss_bytes()


def peak_host_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def parse_profile_steps(spec: str | None) -> tuple[int, int] | None:
    """"A:B" -> (A, B), the first and last step (1-based, inclusive) to trace; None/"" -> None."""
    if not spec:
        return None
    first, sep, last = str(spec).partition(":")
    try:
        a, b = int(first), int(last)
    except ValueError:
        a = b = -1
    if not sep or a < 1 or b < a:
        raise UserError(f"--profile_steps={spec!r}: write FIRST:LAST with 1 <= FIRST <= LAST, e.g. "
                        "--profile_steps=5:8 traces steps 5 to 8.")
    return a, b


class StepProfiler:
    """Runs jax.profiler over steps A..B (1-based, inclusive) of the loop, trace in `log_dir`.

    Call before_step(step) before step `step` is dispatched and after_step(step, outputs) after it;
    the trace stops once step B's outputs are ready, so its device work is inside the trace.
    """

    def __init__(self, steps: tuple[int, int] | None, log_dir: str, enabled: bool = True):
        self.steps, self.log_dir, self.enabled = steps, log_dir, enabled and steps is not None
        self.active = False

    def before_step(self, step: int) -> None:
        if self.enabled and not self.active and self.steps[0] <= step <= self.steps[1]:
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        """Ends a trace still open (a run that stopped before step B)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            print(f"Wrote a profiler trace of steps {self.steps[0]}-{self.steps[1]} to {self.log_dir}", flush=True)


# jax.monitoring events whose durations make up the compile time of a jitted function's first call.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # a program loaded from the persistent cache


class CompileClock:
    """Seconds this process has spent tracing, lowering and compiling (summed jax.monitoring
    events), and the programs it loaded from the persistent compilation cache instead of compiling.
    The difference of two readings around a first call is that call's compile time, separate from
    its run time (on a cache hit: tracing, lowering and loading)."""

    _seconds = 0.0
    _cache_hits = 0
    _registered = False

    @classmethod
    def _listen_duration(cls, event: str, duration_secs: float, **_) -> None:
        if event in COMPILE_EVENTS:
            cls._seconds += duration_secs

    @classmethod
    def _listen_event(cls, event: str, **_) -> None:
        if event == CACHE_HIT_EVENT:
            cls._cache_hits += 1

    @classmethod
    def _register(cls) -> None:
        if not cls._registered:  # jax has no unregister: listen once per process
            jax.monitoring.register_event_duration_secs_listener(cls._listen_duration)
            jax.monitoring.register_event_listener(cls._listen_event)
            cls._registered = True

    @classmethod
    def read(cls) -> float:
        cls._register()
        return cls._seconds

    @classmethod
    def cache_hits(cls) -> int:
        cls._register()
        return cls._cache_hits


@dataclasses.dataclass
class IntervalTimer:
    """One logging interval of training: its steps and tokens, the wall seconds they took, and
    of those the seconds spent waiting for data; reported per step with MFU and memory.

    Time spent on other work inside the interval (compiling, evaluating) is left out with
    exclude(), so the rates are those of training alone, wherever in the interval it fell."""

    step_flops: float
    peak_flops: float | None  # None: no MFU (a CPU without peak_flops_per_device.override)
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        self._start_interval()

    def _start_interval(self) -> None:
        self.start, self.steps, self.real_tokens, self.all_tokens = self.clock(), 0, 0, 0
        self.data_wait_s = 0.0

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait_s += seconds

    def add_step(self, real_tokens: int, all_tokens: int) -> None:
        self.steps += 1
        self.real_tokens += real_tokens
        self.all_tokens += all_tokens

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` of the interval's wall time, spent on something else, out of its rates."""
        self.start += seconds

    def metrics(self, device: jax.Device) -> dict[str, float]:
        """The interval's rates and per-step figures; then starts the next interval.

        step_seconds is wall time per step, data wait included: MFU is what the run achieved
        (left out when the peak is unknown)."""
        elapsed_s = self.clock() - self.start
        step_s = elapsed_s / self.steps
        out = {"steps_per_s": self.steps / elapsed_s, "tokens_per_s": self.all_tokens / elapsed_s,
               "real_tokens_per_s": self.real_tokens / elapsed_s,
               "step_seconds": step_s, "data_wait_seconds": self.data_wait_s / self.steps,
               "memory_bytes_in_use": memory_in_use_bytes(device)}
        if self.peak_flops:
            out["mfu"] = self.step_flops / step_s / self.peak_flops
        self._start_interval()
        return out


def timed_next(iterator, timer: IntervalTimer) -> Mapping:
    """next(iterator), its time added to the timer's data wait."""
    start = time.perf_counter()
    batch = next(iterator)
    timer.add_data_wait(time.perf_counter() - start)
    return batch


def train_step_flops(config: TransformerConfig, input_shapes: Mapping[str, tuple[int, ...]]) -> float:
    """Model FLOPs of one training step on a batch of the model's `input_shapes` (Model.input_shapes)."""
    batch, targets = input_shapes["decoder_input_tokens"]
    inputs = input_shapes["encoder_input_tokens"][1] if "encoder_input_tokens" in input_shapes else 0
    return flops.train_step_flops(config, batch, inputs, targets)
