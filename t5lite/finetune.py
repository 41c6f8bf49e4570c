"""Merge a fine-tuning run's LoRA adapters into its base and write a normal params checkpoint.

    python -m t5lite.finetune --model_dir=runs/sst2_lora --output=runs/sst2_lora_merged [--step=N]

The output (checkpoints/<step>, config.gin, vocabulary.json) is read by t5lite.eval, t5lite.infer,
t5lite.hf_t5 and CheckpointConfig.initial_checkpoint_path like any training run. What trains
(full, frozen, LoRA, quantized base) is t5lite.adaptation.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m t5lite.finetune` runs this file as __main__; hand over to the importable module (as train.py does).
    import sys

    from t5lite import host_memory

    host_memory.restart_with_tunables("-m", "t5lite.finetune")  # faster malloc on CPU; see host_memory
    from t5lite import finetune as _finetune_module

    sys.exit(_finetune_module.main())

import argparse
from collections.abc import Sequence

import jax
import numpy as np

from t5lite import adaptation, checkpoints, fileio, gin_cli, partitioning, run_dir, trainer
from t5lite.data import vocab_record
from t5lite.errors import UserError, reports_user_errors
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model


def export_merged(model_dir: str, output: str, *, step: int | None = None) -> str:
    """Writes `output`/checkpoints/<step>, a params-only checkpoint of the model's params (LoRA factors
    merged into the dequantized base); beside it the run's vocabulary.json and config.gin.

    The run's own MODEL_DIR/config.gin rebuilds its model and adaptation, so its params (default:
    the latest checkpoint) restore exactly; the optimizer state is not read. Clears and re-parses gin.
    """
    config_path = run_dir.path(model_dir, run_dir.CONFIG)
    if not fileio.exists(config_path):
        raise UserError(f"{config_path} does not exist: pass the MODEL_DIR of a t5lite training run.")
    if fileio.exists(output):
        raise UserError(f"{output} already exists; choose a new --output directory.")
    gin_cli.parse_run_config(config_path)
    model, adapted = Model(TransformerConfig()), adaptation.make_adaptation()
    mesh = partitioning.make_mesh()
    source = run_dir.checkpoints_dir(model_dir)
    if step is None:
        step = checkpoints.latest_checkpoint_step(source)
    params = checkpoints.restore_params(source, step, trainer.abstract_params(
        model, mesh, partitioning.axis_rules("dp"), adapted))
    merged = jax.jit(adapted.model_params)(params)
    target = checkpoints.Checkpointer(run_dir.checkpoints_dir(output), save_every=1, keep=None, async_save=False)
    target.save(step, {"step": np.int32(step), "params": merged}, force=True)
    target.wait()
    target.close()
    vocab_record.copy(model_dir, output)
    # The run's gin, for what reads the export's model from it (t5lite.hf_t5).
    fileio.copy(config_path, run_dir.path(output, run_dir.CONFIG))
    return run_dir.checkpoint_path(output, step)


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge a fine-tuning run's LoRA adapters into its base and write "
                                     "a normal params checkpoint.")
    parser.add_argument("--model_dir", required=True, help="MODEL_DIR of the fine-tuning run")
    parser.add_argument("--output", required=True, help="a new directory; gets checkpoints/<step>")
    parser.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    args = parser.parse_args(argv)
    path = export_merged(args.model_dir, args.output, step=args.step)
    print(f"Wrote the merged params to {path}")
    return 0
