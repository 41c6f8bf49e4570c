"""Compiled peak memory of the LoRA / QLoRA train step: float32 base against int8 / int4 / NF4, with the
quantized base dequantized for the whole model at once (the reference path) or layer by layer inside
the scanned stack (what t5lite runs).

    python bench/qlora_memory.py [--batch 8 --inputs 512 --targets 114] [--remat none] [--vocab 32128]
        [--no_train_in_full]

Shape: T5 v1.1 base (gin/models/t5_1_1_base.gin, the 32128-row T5 vocabulary), float32, AdamW, the
LoRA of gin/runs/finetune_lora.gin (rank 8 on every attention and MLP kernel, norms and logits_dense
trained in full; --no_train_in_full: the factors alone). Only compiles (no state, no execution): XLA's
memory analysis of the step as t5lite jits it (the state donated). Peak = argument + temp bytes;
the ratio is to float32 LoRA's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5lite import adaptation, partitioning, trainer  # noqa: E402
from t5lite.model import weights  # noqa: E402
from t5lite.model.config import TransformerConfig  # noqa: E402
from t5lite.model.models import Model  # noqa: E402

T5_1_1_BASE = TransformerConfig(vocab_size=32128, emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048,
                                num_encoder_layers=12, num_decoder_layers=12, dtype="float32")
RECIPE = dict(patterns=(r"(query|key|value|out|wi_0|wi_1|wo)$",), rank=8, alpha=16.0,
              train_in_full=(r"norm/scale$", r"logits_dense$"))


@dataclasses.dataclass(frozen=True)
class WholeModelDequantized(adaptation.LoraAdaptation):
    """The reference path: the step's network reads model_params, the whole base dequantized and
    merged before the forward pass (t5lite before layerwise dequantization)."""

    def step_params(self, state_params, trainable=None, rng=None):
        return weights.materialize(super().step_params(state_params, trainable, rng))


def variants(recipe: dict) -> list[tuple[str, adaptation.LoraAdaptation]]:
    out = [("float32 LoRA", adaptation.LoraAdaptation(**recipe))]
    for name, bits, codebook in (("int8", 8, "int"), ("int4", 4, "int"), ("NF4", 4, "nf4")):
        quantized = dict(recipe, base_bits=bits, codebook=codebook)
        out.append((f"{name}, whole model", WholeModelDequantized(**quantized)))
        out.append((f"{name}, layer by layer", adaptation.LoraAdaptation(**quantized)))
    return out


def step_memory(config: TransformerConfig, lora: adaptation.LoraAdaptation, batch: int, inputs: int,
                targets: int) -> tuple[int, int, float]:
    """(argument bytes, temp bytes, compile seconds) of the jitted train step."""
    model, tx = Model(config), optax.adamw(1e-3)
    mesh, rules = partitioning.make_mesh(), partitioning.axis_rules("dp")
    lengths = {"inputs": inputs, "targets": targets}
    init = trainer.make_sharded_init(model, tx, model.input_shapes(batch, lengths), mesh, rules, lora)
    step = trainer.jit_train_step(model, tx, optax.constant_schedule(1e-3), init, mesh, rules,
                                  loss_config=trainer.LossConfig(), use_dropout=False, adaptation=lora)
    features = {"encoder_input_tokens": (batch, inputs), "decoder_input_tokens": (batch, targets),
                "decoder_target_tokens": (batch, targets), "decoder_loss_weights": (batch, targets)}
    sharding = partitioning.batch_sharding(mesh)
    data = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=sharding) for k, s in features.items()}
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(init.abstract_state, data, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
    analysis = compiled.memory_analysis()
    return analysis.argument_size_in_bytes, analysis.temp_size_in_bytes, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--targets", type=int, default=114)
    parser.add_argument("--remat", default="none", choices=("none", "minimal", "full"))
    parser.add_argument("--vocab", type=int, default=T5_1_1_BASE.vocab_size)
    parser.add_argument("--no_train_in_full", action="store_true", help="LoRA factors alone")
    args = parser.parse_args()
    recipe = dict(RECIPE, train_in_full=()) if args.no_train_in_full else RECIPE
    config = dataclasses.replace(T5_1_1_BASE, remat_policy=args.remat, vocab_size=args.vocab)
    print(f"T5 v1.1 base shape, vocab {args.vocab}, batch {args.batch}, {args.inputs} / {args.targets} tokens, "
          f"remat {args.remat}, trained in full: {list(recipe['train_in_full'])}, {jax.devices()[0].platform}; "
          "MiB = 2^20 bytes", flush=True)
    print("| base | arguments MiB | temp MiB | peak MiB | peak / float32 LoRA |")
    print("|---|---|---|---|---|")
    reference = None
    for name, lora in variants(recipe):
        arguments, temp, seconds = step_memory(config, lora, args.batch, args.inputs, args.targets)
        peak = arguments + temp
        reference = reference or peak
        print(f"| {name} | {arguments / 2**20:,.0f} | {temp / 2**20:,.0f} | {peak / 2**20:,.0f} | "
              f"{100 * peak / reference:.0f}% |", flush=True)
        print(f"  {name}: compiled in {seconds:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
