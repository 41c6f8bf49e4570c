"""Compile the sharded train step ahead of time for a TPU slice, on any machine (CPU only is fine).

    pip install -r requirements-tpu.txt     # libtpu: the TPU compiler
    python -m t5lite.precompile --gin_file=gin/base.gin --gin_file=gin/models/t5_1_1_xxl.gin \\
        --gin.TOPOLOGY=\\"v5p:4x4x4\\" --gin.BATCH_SIZE=256 --gin.TrainConfig.partitioning_preset=\\"fsdp\\"

The same gin files and bindings as t5lite.train (model, batch, lengths, preset, make_mesh sizes,
optimizer) plus TOPOLOGY = "<generation>:<chips per dimension>", e.g. "v5e:2x2", "v4:4x4x4".
Nothing is initialised and no data is read: the step is lowered from shapes alone. Reports per
chip: memory (arguments, temporaries, outputs; total vs the chip's HBM), the compiler's FLOPs and
HBM bytes next to the analytic model FLOPs, a roofline step time from them (compute- or HBM-bound;
communication not included), and the MFU that implies against the chip's peak: an optimistic
estimate to measure a real run against (the compile-only cost model may undercount bytes too).

`--decode` compiles what t5lite.eval / t5lite.infer decode with instead (same model, preset and
mesh; batch BATCH_SIZE, inputs and TASK_FEATURE_LENGTHS["targets"] new tokens, DecodeConfig's
method): per chip, the parameters, their decoding copy (split per layer, matmul weights in the
compute dtype; t5lite.eval keeps both while it also scores), the caches and other temporaries, and
whether it all fits.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from t5lite import precompile as _precompile_module  # gin registers the importable module only

    sys.exit(_precompile_module.main())

import dataclasses
import os
import re
import sys
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5lite import gin_cli, inference, partitioning, trainer
from t5lite.data import pipeline
from t5lite.errors import UserError, reports_user_errors
from t5lite.model import flops
from t5lite.model.config import TransformerConfig
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model
from t5lite.observability import PEAK_BF16_FLOPS
from t5lite.run_config import DataConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class TpuChip:
    peak_bf16_flops: float  # per chip, FLOP/s
    hbm_bytes: int  # per chip
    hbm_bytes_per_s: float  # per chip


GIB = 2**30
# Published per-chip figures: peak bf16 dense FLOP/s, HBM capacity and bandwidth.
TPU_CHIPS = {
    "v4": TpuChip(PEAK_BF16_FLOPS["v4"], 32 * GIB, 1228e9),
    "v5e": TpuChip(PEAK_BF16_FLOPS["v5e"], 16 * GIB, 819e9),
    "v5p": TpuChip(PEAK_BF16_FLOPS["v5p"], 95 * GIB, 2765e9),
    "v6e": TpuChip(PEAK_BF16_FLOPS["v6e"], 32 * GIB, 1640e9),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # e.g. "v5e:2x2"
    generation: str  # a key of TPU_CHIPS
    chips: int


def parse_topology(name: str) -> Topology:
    """"v5e:2x2" -> Topology; an unknown generation or a malformed shape is a UserError."""
    match = re.fullmatch(r"(\w+):(\d+(?:x\d+)*)", name)
    if not match or match.group(1) not in TPU_CHIPS:
        raise UserError(f"Unknown TPU topology {name!r}: write <generation>:<chips per dimension> with a "
                        f"generation of {sorted(TPU_CHIPS)}, e.g. 'v5e:2x2', 'v5e:16x16', 'v4:2x2x1', 'v5p:4x4x4'.")
    return Topology(name, match.group(1), int(np.prod([int(d) for d in match.group(2).split("x")])))


def topology_devices(topology: Topology) -> list[jax.Device]:
    """Compile-only devices of the slice (libtpu's compiler, no TPU needed)."""
    from jax.experimental import topologies  # noqa: PLC0415  (libtpu is optional)

    try:
        import libtpu  # noqa: F401, PLC0415
    except ImportError as e:
        raise UserError("precompile needs libtpu (the TPU compiler): pip install -r requirements-tpu.txt") from e
    try:
        # One device per chip, as on a real v4 / v5p VM (megacore); their default is one per core.
        options = {"chip_config_name": "megacore"} if topology.generation in ("v4", "v5p") else {}
        return list(topologies.get_topology_desc(topology.name, "tpu", **options).devices)
    except jax.errors.JaxRuntimeError as e:
        raise UserError(f"libtpu rejected the topology {topology.name!r}: {e}") from e


def tpu_model_config() -> TransformerConfig:
    """The gin-configured model as it runs on TPU ("auto" dtype is bfloat16 there; this process is on CPU)."""
    config = TransformerConfig()
    return dataclasses.replace(config, dtype="bfloat16") if config.dtype == "auto" else config


def lower_train_step(devices: Sequence[jax.Device], config: TransformerConfig) -> jax.stages.Lowered:
    """The train step t5lite.train runs on these devices, lowered from shapes: the same builder
    (trainer.build_train_program) from the same gin-configured TrainConfig."""
    run = TrainConfig()
    program = trainer.build_train_program(config, run, partitioning.make_mesh(devices=devices))
    model_type = pipeline.model_type(config.is_encoder_decoder, run.data.prefix_lm, run.preference.enabled)
    return program.lower(pipeline.batch_feature_shapes(dict(run.data.task_feature_lengths), model_type=model_type,
                                                       batch_size=run.data.batch_size))


def compile_train_step(devices: Sequence[jax.Device], config: TransformerConfig) -> jax.stages.Compiled:
    """The train step t5lite.train would run on these (TPU) devices, compiled from shapes (gin-configured)."""
    return lower_train_step(devices, config).compile()


def compile_decode(devices: Sequence[jax.Device], config: TransformerConfig) -> tuple[jax.stages.Compiled, ...]:
    """(split per layer, predict) as t5lite.eval / infer run them on these devices, compiled from shapes."""
    run = TrainConfig()
    data = run.data
    model = Model(config)
    lengths = dict(data.task_feature_lengths)
    mesh = partitioning.make_mesh(devices=devices)
    rules = partitioning.axis_rules(run.partitioning_preset)
    partitioning.check_batch_size(data.batch_size, mesh)
    run = inference.BatchInference(
        model, mesh, rules, batch_size=data.batch_size, bidirectional_prompt=data.prefix_lm,
        decode_config=dataclasses.replace(DecodeConfig(), max_decode_length=lengths["targets"]))
    shapes = pipeline.batch_feature_shapes(lengths, model_type=pipeline.model_type(config.is_encoder_decoder,
                                                                                   data.prefix_lm),
                                           batch_size=run.batch_size)
    return run.compile_from_shapes(trainer.abstract_params(model, mesh, rules), shapes)


def decode_report(to_decode_layout: jax.stages.Compiled, predict: jax.stages.Compiled, topology: Topology,
                  config: TransformerConfig) -> dict[str, float]:
    """Per-chip memory of decoding: parameters, their decoding copy, predict's temporaries."""
    split = to_decode_layout.memory_analysis()
    memory = predict.memory_analysis()
    report = {
        "param_bytes": split.argument_size_in_bytes,
        # Unscanned float32 params are already laid out for decoding: decode_params returns them.
        "split_bytes": split.output_size_in_bytes if config.scan_layers or config.compute_dtype != jnp.float32 else 0,
        "batch_bytes": memory.argument_size_in_bytes - split.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "code_bytes": memory.generated_code_size_in_bytes,
        "hbm_bytes": TPU_CHIPS[topology.generation].hbm_bytes,
    }
    report["total_bytes"] = sum(report[k] for k in ("param_bytes", "split_bytes", "batch_bytes", "temp_bytes",
                                                    "output_bytes", "code_bytes"))
    return report


def format_decode_report(report: dict[str, float], topology: Topology) -> str:
    data, decode = DataConfig(), DecodeConfig()
    gib = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    fits = "fits" if report["total_bytes"] <= report["hbm_bytes"] else "DOES NOT FIT"
    beams = f" x {decode.num_beams} beams" if decode.method == "beam" else ""
    return "\n".join([
        f"topology {topology.name}: {topology.chips} chips, {gib(report['hbm_bytes'])} HBM per chip",
        f"decoding (t5lite.eval / infer): batch {data.batch_size}{beams}, {decode.method}, "
        f"{data.task_feature_lengths['targets']} new tokens",
        f"memory per chip: parameters {gib(report['param_bytes'])}, decoding copy {gib(report['split_bytes'])}, "
        f"caches and temporaries {gib(report['temp_bytes'])}, batch and outputs "
        f"{gib(report['batch_bytes'] + report['output_bytes'])}, code {gib(report['code_bytes'])}",
        f"total {gib(report['total_bytes'])} of {gib(report['hbm_bytes'])}: {fits}",
    ])


def model_flops_per_chip(config: TransformerConfig, topology: Topology) -> float:
    """Analytic model FLOPs of the gin-configured train step (no rematerialisation) per chip."""
    data = DataConfig()
    lengths = dict(data.task_feature_lengths)
    if config.is_encoder_decoder:
        inputs_length, targets_length = lengths["inputs"], lengths["targets"]
    else:  # a prefix-LM example is inputs and targets in one decoder sequence
        inputs_length, targets_length = 0, sum(lengths.values())
    return flops.train_step_flops(config, data.batch_size, inputs_length, targets_length) / topology.chips


def step_report(compiled: jax.stages.Compiled, unrolled: jax.stages.Compiled, topology: Topology,
                model_flops: float) -> dict[str, float]:
    """Per-chip (= per-device) memory of `compiled` and the compiler's cost analysis of `unrolled`
    (the same step without nn.scan: XLA's cost analysis counts a loop body once), as numbers.
    model_flops: the analytic model FLOPs per chip, the numerator of MFU."""
    chip = TPU_CHIPS[topology.generation]
    memory = compiled.memory_analysis()
    cost = unrolled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    report = {
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "code_bytes": memory.generated_code_size_in_bytes,
    }
    # Donated state buffers are reused for the outputs (alias), so they count once.
    report["total_bytes"] = (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                             + report["temp_bytes"] + report["code_bytes"])
    report["hbm_bytes"] = chip.hbm_bytes
    report["flops"] = float(cost["flops"])
    report["bytes_accessed"] = float(cost["bytes accessed"])
    # libtpu's compile-only cost model leaves optimal_seconds unset (negative); a roofline stands in:
    # compute- or HBM-bound, whichever is slower (no ICI time). The compiler's FLOP count includes
    # rematerialisation but, for the larger models, is far below the analytic count (T5-large on
    # v5e: 7.9 vs 23.5 TFLOP per chip), so it misses work: the compute time takes the larger one.
    report["model_flops"] = model_flops
    report["step_seconds"] = max(max(report["flops"], model_flops) / chip.peak_bf16_flops,
                                 report["bytes_accessed"] / chip.hbm_bytes_per_s)
    # MFU counts model FLOPs only, so it is at most 100% whatever the compiler counted.
    report["mfu"] = model_flops / (report["step_seconds"] * chip.peak_bf16_flops)
    return report


def format_report(report: dict[str, float], topology: Topology) -> str:
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    fits = "fits" if report["total_bytes"] <= report["hbm_bytes"] else "DOES NOT FIT"
    return "\n".join([
        f"topology {topology.name}: {topology.chips} chips, {TPU_CHIPS[topology.generation].peak_bf16_flops / 1e12:.0f}"
        f" TFLOP/s bf16 and {gib(report['hbm_bytes'])} HBM per chip",
        f"memory per chip: arguments {gib(report['argument_bytes'])}, temporaries {gib(report['temp_bytes'])}, "
        f"outputs {gib(report['output_bytes'])} ({gib(report['alias_bytes'])} aliased to donated arguments), "
        f"code {gib(report['code_bytes'])}",
        f"total {gib(report['total_bytes'])} of {gib(report['hbm_bytes'])}: {fits}",
        f"compiler cost analysis per chip: {report['flops'] / 1e12:.4f} TFLOP and "
        f"{report['bytes_accessed'] / GIB:.2f} GiB of HBM traffic per step; model FLOPs (analytic, no "
        f"rematerialisation) {report['model_flops'] / 1e12:.4f} TFLOP",
        f"roofline step time {report['step_seconds'] * 1e3:.2f} ms (compute or HBM bound, communication not "
        f"included) -> MFU at most {report['mfu']:.1%}",
    ])


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    decode = "--decode" in argv
    argv = [a for a in argv if a != "--decode"]
    # Compiling needs no TPU: do not wait for the lock of a process (any jax with libtpu) holding one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    args, bindings = gin_cli.parse_args(argv, description=__doc__)
    if args.compilation_cache_dir is not None:
        raise UserError("t5lite.precompile compiles for a TPU slice to report its memory and time; it opens no "
                        "compilation cache of its own. Drop --compilation_cache_dir.")
    if not any(b.startswith("TOPOLOGY ") for b in bindings):
        raise UserError('Give the TPU slice to compile for, e.g. --gin.TOPOLOGY=\\"v5e:2x2\\".')
    gin_cli.parse_gin(args.gin_file, bindings, gin_cli.search_paths(args))
    topology = parse_topology(gin.query_parameter("%TOPOLOGY"))
    devices = topology_devices(topology)
    config = tpu_model_config()
    try:
        if decode:
            report = decode_report(*compile_decode(devices, config), topology, config)
            print(format_decode_report(report, topology), flush=True)
            return 0 if report["total_bytes"] <= report["hbm_bytes"] else 1
        compiled = compile_train_step(devices, config)
        unrolled = (compile_train_step(devices, dataclasses.replace(config, scan_layers=False))
                    if config.scan_layers else compiled)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler refuses a program that cannot fit: that is the answer, not a crash.
        print(f"topology {topology.name}: DOES NOT FIT: {str(e).splitlines()[0]}", flush=True)
        return 1
    report = step_report(compiled, unrolled, topology, model_flops_per_chip(config, topology))
    print(format_report(report, topology), flush=True)
    return 0
