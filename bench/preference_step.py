"""Preference-tuning step time against an SFT step of the same model and batch, in one process.

    python bench/preference_step.py [--model_gin gin/models/t5_1_1_mini.gin] [--batch 16] [--inputs 128]
        [--targets 32] [--rounds 5] [--steps 3] [--adaptations full,lora] [--objectives dpo,simpo]

Every configuration is the train step `python -m t5lite.train` builds (trainer.build_train_program)
from gin/runs/dpo.gin (full fine-tuning) or gin/runs/dpo_lora.gin (LoRA), then --model_gin, then
the bindings BATCH_SIZE, TASK_FEATURE_LENGTHS, INITIAL_CHECKPOINT = None and
PreferenceConfig.objective (None: the LM loss, "SFT"). So an SFT row and a preference row differ
only in the objective: same model, optimizer (AdamW, clipped), adaptation, dropout (0).

    sft      B examples: prompt in the encoder, answer in the decoder (the packed features that
             t5lite.train feeds, one example per row; --unpacked_sft: without segment ids and positions)
    sft 2B   2B examples: as many answers as B pairs carry (the per-sequence comparison)
    dpo      B pairs: the prompt once per row, a chosen and a rejected answer; the policy's forward
             and backward over both answers plus the reference's forward
    simpo    B pairs, no reference forward

A decoder-only --model_gin runs every configuration with DataConfig.prefix_lm = True (prompt + answer
in one sequence, loss on the answer). Batches are random int32 token ids in the shapes
pipeline.batch_feature_shapes gives (every answer position real; no data pipeline); the state comes
from the program's init_fn. Each step is compiled and run once before timing; then --rounds rounds
run --steps steps of every configuration, one configuration after the other (interleaved, so machine
load falls on all alike), each step blocked on. The table gives the median over all timed steps.
FLOPs: XLA's cost analysis of the same step lowered without nn.scan (it counts a loop body once).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5lite import gin_cli, host_memory, partitioning, trainer  # noqa: E402
from t5lite.data import pipeline  # noqa: E402
from t5lite.model.config import TransformerConfig  # noqa: E402
from t5lite.run_config import TrainConfig  # noqa: E402

ADAPTATION_GIN = {"full": "gin/runs/dpo.gin", "lora": "gin/runs/dpo_lora.gin"}


@dataclasses.dataclass(frozen=True)
class Case:
    adaptation: str  # a key of ADAPTATION_GIN
    objective: str | None  # PreferenceConfig.objective; None: the LM loss (SFT)
    batch: int  # examples (SFT) or pairs per step

    def label(self, base_batch: int) -> str:
        if self.objective is None:
            return "sft" if self.batch == base_batch else f"sft {self.batch // base_batch}B"
        return self.objective


@dataclasses.dataclass
class Built:
    step: jax.stages.Compiled
    state: trainer.TrainState
    batch: dict[str, jax.Array]
    flops: float  # XLA's count for one step, unrolled layers
    compile_s: float
    times: list[float] = dataclasses.field(default_factory=list)  # seconds per timed step
    round_medians: list[float] = dataclasses.field(default_factory=list)


def parse_case_gin(case: Case, args, scan_layers: bool = True) -> None:
    """gin as `python -m t5lite.train --gin_file=<adaptation gin> --gin_file=<model gin> --gin.X=...` sets it."""
    bindings = [f"BATCH_SIZE = {case.batch}",
                f"TASK_FEATURE_LENGTHS = {{'inputs': {args.inputs}, 'targets': {args.targets}}}",
                "INITIAL_CHECKPOINT = None",  # random params: the step's cost does not depend on them
                f"PreferenceConfig.objective = {case.objective!r}"]
    if not scan_layers:
        bindings.append("TransformerConfig.scan_layers = False")
    gin.clear_config()
    gin_cli.parse_gin([ADAPTATION_GIN[case.adaptation], args.model_gin], bindings)
    if not TransformerConfig().is_encoder_decoder:  # SFT and pairs alike read prompt + answer
        gin.clear_config()
        gin_cli.parse_gin([ADAPTATION_GIN[case.adaptation], args.model_gin], [*bindings, "DataConfig.prefix_lm = True"])


def program_and_shapes(case: Case, args, scan_layers: bool = True
                       ) -> tuple[trainer.TrainProgram, dict[str, tuple[int, int]], TransformerConfig, TrainConfig]:
    parse_case_gin(case, args, scan_layers)
    config, run = TransformerConfig(), TrainConfig()
    program = trainer.build_train_program(config, run, partitioning.make_mesh())
    model_type = pipeline.model_type(config.is_encoder_decoder, run.data.prefix_lm, run.preference.enabled)
    # The features get_batches yields in t5lite.train (SFT: packed, as it reads them; pairs never are).
    shapes = pipeline.batch_feature_shapes(dict(run.data.task_feature_lengths), model_type=model_type,
                                           batch_size=run.data.batch_size, pack=not args.unpacked_sft)
    return program, shapes, config, run


def random_batch(shapes: dict[str, tuple[int, int]], vocab_size: int, targets: int, seed: int = 0
                 ) -> dict[str, np.ndarray]:
    """Random int32 features of these shapes: token ids in [2, vocab), one example per row, every answer
    position weighted; in a prompt + answer sequence (decoder-only) the answer is the last `targets`."""
    rng = np.random.default_rng(seed)
    batch = {}
    for name, (rows, length) in shapes.items():
        position = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
        answer = position >= length - targets
        if name.endswith("loss_weights"):
            value = answer
        elif name.endswith("causal_attention"):  # the prompt, attended both ways
            value = ~answer
        elif name.endswith("segment_ids"):
            value = np.ones((rows, length))
        elif name.endswith("positions"):
            value = position
        else:
            value = rng.integers(2, vocab_size, (rows, length))
        batch[name] = np.ascontiguousarray(value, dtype=np.int32)
    return batch


def xla_flops(lowered: jax.stages.Lowered) -> float:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def build(case: Case, args) -> Built:
    """The compiled step of `case`, its state and batch, run once (compile and first-run allocations)."""
    program, shapes, config, run = program_and_shapes(case, args)
    t = time.perf_counter()
    step = program.lower(shapes).compile()
    compile_s = time.perf_counter() - t
    mesh = program.mesh
    state = program.init.init_fn(jax.random.PRNGKey(run.seed))
    batch = partitioning.shard_batch(random_batch(shapes, config.vocab_size, args.targets), mesh)
    state, metrics = step(state, batch, jax.random.PRNGKey(0))
    jax.block_until_ready(metrics)
    if not np.isfinite(float(metrics["loss"])) or float(metrics["update_skipped"]):
        raise RuntimeError(f"{case}: the warm-up step's loss is {float(metrics['loss'])}, skipped "
                           f"{float(metrics['update_skipped'])}")
    unrolled, unrolled_shapes, _, _ = program_and_shapes(case, args, scan_layers=False)
    flops = xla_flops(unrolled.lower(unrolled_shapes))
    gin.clear_config()
    return Built(step, state, batch, flops, compile_s)


def time_steps(built: Built, steps: int) -> None:
    key = jax.random.PRNGKey(0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        built.state, metrics = built.step(built.state, built.batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    built.times += times
    built.round_medians.append(float(np.median(times)))


def main() -> None:
    # Time the step in the process t5lite.train would run it in (its malloc settings).
    host_memory.restart_with_tunables(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_gin", default="gin/models/t5_1_1_mini.gin")
    parser.add_argument("--batch", type=int, default=16, help="B: examples of an SFT step, pairs of a preference step")
    parser.add_argument("--inputs", type=int, default=128, help="prompt tokens")
    parser.add_argument("--targets", type=int, default=32, help="answer tokens")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each configuration per round")
    parser.add_argument("--adaptations", default="full,lora")
    parser.add_argument("--objectives", default="dpo,simpo")
    parser.add_argument("--unpacked_sft", action="store_true",
                        help="SFT batches without segment ids and positions (as eval reads them)")
    args = parser.parse_args()

    b = args.batch
    cases = [Case(a, objective, batch) for a in args.adaptations.split(",")
             for objective, batch in [(None, b), (None, 2 * b), *[(o, b) for o in args.objectives.split(",")]]]
    load_before = os.getloadavg()
    started = time.time()
    built = {}
    for case in cases:
        built[case] = build(case, args)
        print(f"built {case.adaptation} {case.label(b)}: compiled in {built[case].compile_s:.1f} s", flush=True)
    for r in range(args.rounds):
        for case in cases:
            time_steps(built[case], args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{c.adaptation} {c.label(b)} {built[c].round_medians[-1] * 1e3:.0f}" for c in cases) + " ms", flush=True)
    load_after = os.getloadavg()

    print(f"\nmodel gin {args.model_gin}; SFT batches {'unpacked' if args.unpacked_sft else 'packed'}; "
          f"B={b}, {args.inputs} prompt + {args.targets} answer tokens; "
          f"{args.rounds} rounds x {args.steps} steps; jax {jax.__version__}, {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after; {time.time() - started:.0f} s")
    print("ratios: step time (XLA FLOPs) over SFT of the same adaptation with B examples, and with 2B "
          "(as many answers as B pairs)")
    header = (f"{'adaptation':10s} {'step':9s} {'rows':>4s} {'median ms':>9s} {'rounds ms':>11s} {'vs sft B':>8s} "
              f"{'vs sft 2B':>9s} {'GFLOPs':>7s} {'FLOPs vs B':>10s} {'vs 2B':>6s}")
    print(header)
    for case in cases:
        x = built[case]
        sft = built[Case(case.adaptation, None, b)]
        sft2 = built[Case(case.adaptation, None, 2 * b)]
        med = float(np.median(x.times))
        rows = case.batch * (2 if case.objective else 1)  # sequences through the policy
        spread = f"{min(x.round_medians) * 1e3:.0f}-{max(x.round_medians) * 1e3:.0f}"
        print(f"{case.adaptation:10s} {case.label(b):9s} {rows:4d} {med * 1e3:9.0f} {spread:>11s} "
              f"{med / np.median(sft.times):7.2f}x {med / np.median(sft2.times):8.2f}x {x.flops / 1e9:7.1f} "
              f"{x.flops / sft.flops:9.2f}x {x.flops / sft2.flops:5.2f}x")


if __name__ == "__main__":
    main()
