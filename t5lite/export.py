"""Params-only export of a training checkpoint, for release (no optimizer state, no data position).

    python -m t5lite.export --checkpoint=runs/base/checkpoints/900 --output=release/base [--dtype=bfloat16]

The output is an orbax StandardCheckpoint of the params tree (the same nesting as
TrainState.params), with floating-point arrays cast to `dtype`; read it with
ocp.StandardCheckpointer().restore(output). Beside the params it holds the run's config.gin (the
model's shapes) and vocabulary.json (what the model reads and writes), when the run has them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from t5lite import checkpoints, fileio, run_dir
from t5lite.data import vocab_record
from t5lite.errors import UserError, reports_user_errors

EXPORT_DTYPES = ("float32", "bfloat16")


def export_params(checkpoint: str, output: str, *, dtype: str = "float32") -> str:
    """Writes the params of `checkpoint`, floats cast to `dtype`, to the new directory `output`."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"Export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}.")
    output = os.path.abspath(output)
    if os.path.exists(output):
        raise UserError(f"{output} already exists; choose a new --output directory.")
    cast = lambda x: x.astype(jnp.dtype(dtype)) if jnp.issubdtype(x.dtype, jnp.floating) else x
    params = jax.tree_util.tree_map(cast, checkpoints.read_params(checkpoint))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(output, params)
    model_dir = run_dir.model_dir_of(fileio.absolute(checkpoint))
    config = run_dir.path(model_dir, run_dir.CONFIG)
    if fileio.exists(config):
        fileio.copy(config, run_dir.path(output, run_dir.CONFIG))
    vocab_record.copy(model_dir, output)
    return output


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="MODEL_DIR/checkpoints/<step>")
    parser.add_argument("--output", required=True, help="a new directory")
    parser.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES)
    args = parser.parse_args(argv)
    path = export_params(args.checkpoint, args.output, dtype=args.dtype)
    print(f"Exported the params of {args.checkpoint} as {args.dtype} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
