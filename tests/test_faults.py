"""Fault injection: what a run does when its disk fills, its checkpoints are damaged, its parameters
overflow or its user mistypes. Each test asserts the message, the exit code and that the run's
existing files are unchanged (or, for a damaged checkpoint, only renamed out of the way).

Every test starts from a copy of one real tiny run (4 steps, checkpoints at steps 2 and 4).
kill -9 at a random step and SIGTERM are in tests/test_train.py; a save into a directory that has
become a file (an I/O error for a user who is not root) in tests/test_checkpoints.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from t5lite import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=8",
        "--gin.LoopConfig.log_every=1", "--gin.EvalConfig.batches=1", "--gin.EvalConfig.every=1000",
        "--gin.make_schedule.warmup_steps=10", "--gin.CheckpointConfig.every=2"]
# SGD at 1e39, beyond float32's range: the loss and gradients of the first step are finite, so its
# update is applied, and it makes the parameters infinite (or NaN where a gradient is 0).
OVERFLOWING = ["--gin.make_optimizer.name='sgd'", "--gin.make_schedule.name='constant'",
               "--gin.make_schedule.learning_rate=1e39"]

pytestmark = pytest.mark.slow


def _command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _train(model_dir, *extra, steps=4, timeout=600, **popen):
    args = _command("t5lite.train", *TINY, f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}", *extra)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, **popen)


def _tree_digest(path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under `path` (the run's files, to prove them unchanged)."""
    digests = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                digests[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def _steps(model_dir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(model_dir, "checkpoints")) if n.isdigit())


def _one_line_error(result, *patterns: str) -> str:
    """The run failed with exit 2 and one 'error: ...' line matching every pattern, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    return errors[0]


def _flip_a_byte(path: str) -> None:
    """Flips the bits of one byte in the middle of the file: its size does not change."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert os.path.getsize(path) == size


def _largest_file(directory: str) -> str:
    files = [os.path.join(root, n) for root, _, names in os.walk(directory) for n in names]
    return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> str:
    model_dir = str(tmp_path_factory.mktemp("base") / "run")
    done = _train(model_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _steps(model_dir) == [2, 4]
    for step in (2, 4):
        assert checkpoints.verify_checksums(os.path.join(model_dir, "checkpoints", str(step)))
    return model_dir


@pytest.fixture
def run_copy(base_run, tmp_path) -> str:
    model_dir = str(tmp_path / "run")
    shutil.copytree(base_run, model_dir)
    return model_dir


# --- The keep policy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_refused_before_anything_is_deleted(run_copy, keep):
    before = _tree_digest(run_copy)
    result = _train(run_copy, f"--gin.CheckpointConfig.keep={keep}", steps=6)
    _one_line_error(result, rf"CheckpointConfig.keep must be a positive integer, got {keep}", "None keeps every")
    assert _tree_digest(run_copy) == before


# --- Damaged checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("item", ["state", "data_iterator"])
def test_a_flipped_byte_is_found_named_and_the_previous_checkpoint_used(run_copy, item):
    damaged = _largest_file(os.path.join(run_copy, "checkpoints", "4", item))
    _flip_a_byte(damaged)
    name = os.path.relpath(damaged, os.path.join(run_copy, "checkpoints", "4"))

    if item == "state":  # eval reads the params only: it refuses the damaged step, writes nothing
        evaluated = subprocess.run(
            _command("t5lite.eval", "--gin_file=gin/runs/eval.gin", f"--gin.MODEL_DIR='{run_copy}'",
                     f"--gin.CHECKPOINT_PATH='{run_copy}/checkpoints/4'", "--gin.evaluate.num_examples=2",
                     "--gin.evaluate.loss_batches=1"),
            cwd=REPO, capture_output=True, text=True, timeout=600)
        _one_line_error(evaluated, "is damaged", re.escape(name))
        assert not os.path.exists(os.path.join(run_copy, "eval", "step_4.json"))

    resumed = _train(run_copy, steps=6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"checkpoints/4 is damaged: {re.escape(name)} differs from the bytes saved", resumed.stderr)
    assert re.search(r"Resumed from .*/checkpoints/2", resumed.stdout)
    assert os.path.isdir(os.path.join(run_copy, "checkpoints", "4.unreadable"))  # kept for inspection
    assert _steps(run_copy) == [2, 4, 6]  # step 4 trained again from step 2


def test_a_missing_metadata_file_is_named(run_copy):
    os.remove(os.path.join(run_copy, "checkpoints", "4", "state", "_METADATA"))
    resumed = _train(run_copy, steps=6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoints/4 is damaged: state/_METADATA is missing" in resumed.stderr
    assert "pytree" not in resumed.stderr.lower()


def test_every_checkpoint_damaged_is_said_so_and_nothing_is_renamed(run_copy):
    for step in (2, 4):
        _flip_a_byte(_largest_file(os.path.join(run_copy, "checkpoints", str(step), "state")))
    before = _tree_digest(run_copy)
    result = _train(run_copy, steps=6)
    _one_line_error(result, "is damaged", "Every checkpoint .* is damaged or unreadable", "nothing was renamed")
    assert _tree_digest(run_copy) == before


# --- Non-finite parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_parameters_that_overflow_at_the_first_step_are_never_saved(tmp_path, on_nonfinite):
    model_dir = str(tmp_path / "run")
    result = _train(model_dir, *OVERFLOWING, f"--gin.LoopConfig.on_nonfinite='{on_nonfinite}'", steps=6)
    _one_line_error(result, "became NaN or infinite after the start", "No checkpoint holds them",
                    "Lower the learning rate")
    assert _steps(model_dir) == []


def test_parameters_that_overflow_later_leave_the_finite_checkpoints_alone(run_copy):
    before = _tree_digest(os.path.join(run_copy, "checkpoints"))
    # The run's own optimizer (Adafactor: its state must match the checkpoint's), at 1e39.
    result = _train(run_copy, *OVERFLOWING[1:], "--gin.LoopConfig.on_nonfinite='stop'", steps=8)
    _one_line_error(result, "became NaN or infinite after step 4", "continue from step 4")
    assert _tree_digest(os.path.join(run_copy, "checkpoints")) == before


# --- A full disk ------------------------------------------------------------------------------------------


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def _fill(directory: str) -> str:
    """Writes a file until the disk is full; -> its path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return path


def test_a_full_disk_loses_nothing_and_the_final_save_waits_for_space(tmp_path):
    disk = str(tmp_path / "disk")
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("needs root to mount a small tmpfs (a full disk); tests/test_checkpoints.py injects an "
                    "I/O error without it")
    try:
        model_dir = os.path.join(disk, "run")
        args = _command("t5lite.train", *TINY, f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=6",
                        "--gin.CheckpointConfig.retry_every_s=1")
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        stdout = []
        for line in proc.stdout:  # the run has written its config files when it prints its banner
            stdout.append(line)
            if line.startswith("t5lite: "):
                break
        filler = _fill(disk)  # from here on every write fails: metrics, checkpoints, operative config
        stderr = []
        deadline = time.time() + 300
        while time.time() < deadline:
            line = proc.stderr.readline()
            stderr.append(line)
            if line.startswith("Retrying the save of step 6"):
                break
        else:
            proc.kill()
            pytest.fail("".join(stderr)[-3000:])
        os.remove(filler)  # space again: the final save goes through
        out, err = proc.communicate(timeout=300)
        stdout.append(out)
        stderr.append(err)
        stderr = "".join(stderr)
        assert proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        assert re.search(r"ERROR: saving checkpoint step 2 to .* failed \(.*\)\. The disk has [\d.]+ MB free; a "
                         r"checkpoint needs about [\d.]+ MB\.", stderr), stderr[-3000:]
        assert "ERROR: cannot write the metrics of step" in stderr
        assert _steps(model_dir) == [6]
        assert checkpoints.verify_checksums(os.path.join(model_dir, "checkpoints", "6"))
        with open(os.path.join(model_dir, "metrics.jsonl")) as f:
            train_steps = [r["step"] for r in map(json.loads, f) if r["group"] == "train"]
        assert train_steps == [1, 2, 3, 4, 5, 6]  # kept in memory while the disk was full
    finally:
        subprocess.run(["umount", "-l", disk], capture_output=True)


# --- After a crash: one metrics row per step ---------------------------------------------------------------


def test_steps_re_run_after_a_kill_keep_one_metrics_row_each(tmp_path):
    model_dir = str(tmp_path / "run")
    extra = ["--gin.CheckpointConfig.every=10", "--gin.TRAIN_STEPS=40"]
    args = _command("t5lite.train", *TINY, f"--gin.MODEL_DIR='{model_dir}'", *extra)
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(model_dir, "metrics.jsonl")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            steps = [json.loads(line)["step"] for line in open(metrics)] if os.path.exists(metrics) else []
            done = [int(n) for n in os.listdir(os.path.join(model_dir, "checkpoints"))
                    if n.isdigit()] if os.path.isdir(os.path.join(model_dir, "checkpoints")) else []
            if done and max(steps, default=0) > max(done) + 2:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    resumed = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    keys = [(r["group"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), "a step has two rows"
    assert [s for g, s in keys if g == "train"] == list(range(1, 41))
    with open(os.path.join(model_dir, "metrics.superseded.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f]  # the crashed attempt's rows, kept aside


# --- User mistakes ----------------------------------------------------------------------------------------


def test_an_unquoted_string_binding_says_how_to_quote_it(tmp_path):
    result = subprocess.run(_command("t5lite.train", "--gin_file=gin/base.gin", "--gin.MODEL_DIR=runs/x"),
                            cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                            timeout=300)
    _one_line_error(result, r"--gin.MODEL_DIR=runs/x: the value is not a Python literal", "quotes")
    assert not os.path.exists(tmp_path / "runs")


def test_an_infer_output_path_under_a_regular_file_is_one_line(run_copy, tmp_path):
    (tmp_path / "prompts.txt").write_text("hello\n")
    (tmp_path / "a_file").write_text("not a directory")
    result = subprocess.run(
        _command("t5lite.infer", "--gin_file=gin/runs/infer.gin", f"--gin.MODEL_DIR='{run_copy}'",
                 f"--gin.infer.input_file='{tmp_path}/prompts.txt'",
                 f"--gin.infer.output_path='{tmp_path}/a_file/out.jsonl'"),
        cwd=REPO, capture_output=True, text=True, timeout=600)
    _one_line_error(result, "infer.output_path", "cannot be written")
