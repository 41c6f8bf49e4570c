"""The layout of a run directory (MODEL_DIR): the one place its file names are spelled.

    MODEL_DIR/
      config.gin             every gin binding as parsed (files + --gin. flags)
      operative_config.gin   every parameter value the run used, defaults included
      model-info.txt         model config, parameter table with shardings
      metrics.jsonl          train and eval metrics, one JSON object a line, one per group and step
      metrics.superseded.jsonl  rows of steps a crashed attempt wrote past its last checkpoint (re-run)
      tensorboard/<group>/   the same metrics as TensorBoard events
      vocabulary.json        the vocabulary of each feature (t5lite.data.vocab_record)
      checkpoints/<step>/    orbax checkpoints and their checksums.json (t5lite.checkpoints)
      eval_results.json      the final evaluation of `python -m t5lite.train`
      eval/step_<step>.json  evaluations of `python -m t5lite.eval`
      profile/               jax.profiler traces (--profile_steps)
      host-<process>.jsonl   per-host step records (LoopConfig.write_host_records)

An export (t5lite.export, t5lite.finetune, t5lite.hf_t5) writes the same layout: checkpoints/<step>,
config.gin and vocabulary.json, so eval, infer and training read it like a training run.
"""

from __future__ import annotations

import os

CONFIG = "config.gin"
OPERATIVE_CONFIG = "operative_config.gin"
MODEL_INFO = "model-info.txt"
METRICS = "metrics.jsonl"
METRICS_SUPERSEDED = "metrics.superseded.jsonl"
TENSORBOARD = "tensorboard"
VOCABULARY = "vocabulary.json"
CHECKPOINTS = "checkpoints"
EVAL_RESULTS = "eval_results.json"
EVAL = "eval"
PROFILE = "profile"


def path(model_dir: str, name: str) -> str:
    """MODEL_DIR/name; `name` is one of this module's constants."""
    return os.path.join(model_dir, name)


def checkpoints_dir(model_dir: str) -> str:
    return os.path.join(model_dir, CHECKPOINTS)


def checkpoint_path(model_dir: str, step: int) -> str:
    return os.path.join(model_dir, CHECKPOINTS, str(step))


def host_records(model_dir: str, process_index: int) -> str:
    return os.path.join(model_dir, f"host-{process_index}.jsonl")


def model_dir_of(checkpoints_or_checkpoint: str) -> str:
    """MODEL_DIR of MODEL_DIR/checkpoints or MODEL_DIR/checkpoints/<step> (else the path itself)."""
    path = checkpoints_or_checkpoint.rstrip("/")
    if os.path.basename(path).isdigit():
        path = os.path.dirname(path)
    return os.path.dirname(path) if os.path.basename(path) == CHECKPOINTS else path
