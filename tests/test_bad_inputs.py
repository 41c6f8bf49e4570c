"""Bad inputs a user can give, across the entry points: each ends with one line that says what was
wrong (exit code 2) and writes nothing. The table is the list the closing notes count.

argparse's own errors (an unknown choice, a missing flag) are its usage line plus one error line,
also exit code 2; everything else is t5lite's "error: ..." line, without a traceback.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["t5lite.train", "--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin.BATCH_SIZE=8",
         "--gin.MODEL_DIR='{tmp}/run'"]
EVAL = ["t5lite.eval", "--gin_file=gin/runs/eval.gin", "--gin.MODEL_DIR='{tmp}/run'"]
INFER = ["t5lite.infer", "--gin_file=gin/runs/infer.gin", "--gin.MODEL_DIR='{tmp}/run'"]

# (name, command, a pattern the error line must match)
BAD_INPUTS = [
    ("unquoted string", ["t5lite.train", "--gin_file=gin/base.gin", "--gin.MODEL_DIR=runs/x"], "needs quotes"),
    ("missing gin file", ["t5lite.train", "--gin_file=gin/nope.gin"], "nope.gin"),
    ("no gin file", ["t5lite.train"], "No --gin_file"),
    ("gin typo", [*TRAIN, "--gin.LoopConfig.num_train_stepz=5"], "num_train_stepz"),
    ("old binding", [*TRAIN, "--gin.train.keep_checkpoints=2"], "CheckpointConfig.keep"),
    ("keep 0", [*TRAIN, "--gin.CheckpointConfig.keep=0"], "CheckpointConfig.keep must be a positive"),
    ("keep -1", [*TRAIN, "--gin.CheckpointConfig.keep=-1"], "CheckpointConfig.keep must be a positive"),
    ("checkpoint every 0", [*TRAIN, "--gin.CheckpointConfig.every=0"], "CheckpointConfig.every"),
    ("log every 0", [*TRAIN, "--gin.LoopConfig.log_every=0"], "LoopConfig.log_every"),
    ("eval every 0", [*TRAIN, "--gin.EvalConfig.every=0"], "EvalConfig.every"),
    ("negative steps", [*TRAIN, "--gin.TRAIN_STEPS=-5"], "num_train_steps"),
    ("retry every 0", [*TRAIN, "--gin.CheckpointConfig.retry_every_s=0"], "retry_every_s"),
    ("on_nonfinite", [*TRAIN, "--gin.LoopConfig.on_nonfinite='halt'"], "on_nonfinite"),
    ("microbatches", [*TRAIN, "--gin.LoopConfig.num_microbatches=3"], "num_microbatches"),
    ("unknown mixture", [*TRAIN, "--gin.MIXTURE_OR_TASK_NAME='t5lite_default_spam_corruption'"], "span_corruption"),
    ("model dir is a file", [*TRAIN[:-1], "--gin.MODEL_DIR='{tmp}/a_file'"], "not writable"),
    ("unknown preset", [*TRAIN, "--gin.TrainConfig.partitioning_preset='zero3'"], "zero3"),
    ("eval: no such checkpoint path", [*EVAL, "--gin.CHECKPOINT_PATH='{tmp}/nowhere'"], "does not exist"),
    ("eval: no checkpoint in the dir", [*EVAL, "--gin.CHECKPOINT_PATH='{tmp}/empty'"], "No checkpoint"),
    ("infer: no input", [*INFER, "--gin.infer.output_path='{tmp}/out.jsonl'", "--gin.CHECKPOINT_PATH='{tmp}/empty'"],
     "infer.input_file"),
    ("infer: bad mode", [*INFER, "--gin.infer.mode='guess'", "--gin.infer.output_path='{tmp}/out.jsonl'",
                         "--gin.infer.input_file='{tmp}/prompts.txt'"], "infer.mode"),
    ("export: not a checkpoint", ["t5lite.export", "--checkpoint={tmp}/empty", "--output={tmp}/out"],
     "not a t5lite checkpoint"),
    ("hf_t5: not a checkpoint", ["t5lite.hf_t5", "--checkpoint={tmp}/empty", "--output={tmp}/hf"],
     "checkpoint"),
    ("finetune: no run", ["t5lite.finetune", "--model_dir={tmp}/nowhere", "--output={tmp}/merged"], "nowhere"),
    ("dedup: missing input", ["t5lite.data.dedup", "--input={tmp}/missing.txt", "--output={tmp}/o.txt"],
     "missing.txt"),
    ("cleaning: missing input", ["t5lite.data.cleaning", "--input={tmp}/missing.txt", "--output={tmp}/o.txt"],
     "missing.txt"),
    ("inspect: unknown task", ["t5lite.data.inspect", "t5lite_default_spam"], "t5lite_default_spam"),
    ("train_vocab: unknown task", ["t5lite.data.train_vocab", "--task=nope_task", "--output={tmp}/spm"],
     "nope_task"),
    ("sweep: malformed grid", ["t5lite.sweep", "--gin_file=gin/base.gin", "--sweep_dir={tmp}/sweep",
                               "--grid=make_schedule.learning_rate", "--metric=x/loss"], "grid"),
    ("precompile: unknown topology", ["t5lite.precompile", "--gin_file=gin/base.gin", "--gin.TOPOLOGY='v9:1x1'"],
     "v9"),
]


def _run(command: list[str], tmp: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", *[a.replace("{tmp}", tmp) for a in command]]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def _user_dir(tmp_path) -> str:
    tmp_path.mkdir()
    (tmp_path / "a_file").write_text("a file, not a directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "prompts.txt").write_text("hello\n")
    return str(tmp_path)


def _files(path: str) -> set[str]:
    return {os.path.join(root, name) for root, _, names in os.walk(path) for name in names} | {
        os.path.join(root, d) for root, dirs, _ in os.walk(path) for d in dirs}


@pytest.mark.slow
def test_every_bad_input_is_one_line_and_writes_nothing(tmp_path):
    # Each case in its own user directory, so a case that writes is named.
    dirs = [_user_dir(tmp_path / str(i)) for i in range(len(BAD_INPUTS))]
    before = [_files(d) for d in dirs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda i: _run(BAD_INPUTS[i][1], dirs[i]), range(len(BAD_INPUTS))))
    unclear = []
    for (name, _, pattern), result, tmp, files in zip(BAD_INPUTS, results, dirs, before, strict=True):
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")
                 or re.match(r"^[\w.]+: error: ", line)]  # ours, or argparse's
        if (result.returncode != 2 or "Traceback" in result.stderr or len(lines) != 1
                or not re.search(pattern, lines[0])):
            unclear.append(f"{name}: exit {result.returncode}, error lines {lines}\n{result.stderr[-1500:]}")
        elif _files(tmp) != files:
            unclear.append(f"{name}: wrote {sorted(_files(tmp) - files)}")
    print(f"{len(BAD_INPUTS) - len(unclear)} of {len(BAD_INPUTS)} bad inputs give one clear line and write nothing")
    assert not unclear, "\n\n".join(unclear)
