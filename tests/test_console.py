"""What a user's console shows: no TPU-initialisation errors on a CPU machine, no seqio or gin noise,
t5lite's gin files found by name from any directory, progress with an ETA, and Ctrl-C that stops."""

import io
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr

import gin
import jax
import pytest

from t5lite import gin_cli, summaries
from t5lite.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_NOISE = ("TPU", "libtpu", "InitGoogle")


def _env(**overrides) -> dict[str, str]:
    """This environment for a child process, less the JAX_PLATFORMS that importing t5lite here may have set."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env.update(PYTHONPATH=REPO, **overrides)
    return env


def _python(code: str, cwd: str = REPO, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=_env(**env),
                          timeout=300)


def _no_accelerator_but_libtpu() -> bool:
    """libtpu installed (requirements-tpu.txt) on a machine with no TPU chip and no GPU: as this CPU machine."""
    import importlib.util  # noqa: PLC0415

    from jax._src import hardware_utils  # noqa: PLC0415

    return (importlib.util.find_spec("libtpu") is not None
            and hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0
            and not hardware_utils.has_visible_nvidia_gpu() and hardware_utils.num_available_amd_gpus(stop_at=1) == 0)


def test_no_tpu_initialisation_errors_where_there_is_no_tpu():
    """Every process printed libtpu's errors ("Failed to find host bounds for accelerator type", "unexpected
    worker hostname"...): jax starts libtpu when it is installed, chip or no chip. Importing t5lite first
    keeps JAX on the CPU where there is no TPU chip and no GPU."""
    done = _python("import t5lite, jax; print(jax.config.jax_platforms, jax.devices()[0].platform)")
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if any(word in line for word in TPU_NOISE)]
    assert noise == []
    if _no_accelerator_but_libtpu():
        assert done.stdout.split() == ["cpu", "cpu"]


def test_a_users_platform_choice_is_kept_and_import_stays_light():
    done = _python("import os, sys, t5lite; print(repr(os.environ['JAX_PLATFORMS']), 'jax' in sys.modules)",
                   JAX_PLATFORMS="")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["''", "False"]  # JAX_PLATFORMS="" (jax picks) stays; jax is not imported


def test_the_embedded_corpus_trains_without_seqios_uncached_source_warning(caplog):
    """seqio warns, for every uncached FunctionDataSource read shuffled, that restarts reshuffle poorly; the
    embedded corpus shuffles each split whole and restarts restore the iterator, so it does not apply."""
    with caplog.at_level(logging.WARNING):
        batches = pipeline.get_batches("t5lite_default_span_corruption", split="train", shuffle=True, seed=0,
                                       task_feature_lengths={"inputs": 32, "targets": 8},
                                       model_type="encoder_decoder", batch_size=2)
        next(batches)
    assert not [r for r in caplog.records if "uncached FunctionDataset" in r.getMessage()]


PARSE = """
import gin, json
from t5lite import gin_cli
out = {}
for files in (["base.gin"], ["gin/base.gin", "gin/models/t5_1_1_tiny.gin"], ["runs/eval.gin", "models/t5_1_1_tiny.gin"],
              ["mine.gin"]):
    gin.clear_config()
    gin_cli.parse_gin(files, [])
    query = gin.query_parameter
    out[" ".join(files)] = [query("TransformerConfig.emb_dim"), query("TRAIN_STEPS/macro.value")]
print(json.dumps(out))
"""


def test_t5lites_gin_files_are_found_by_name_from_any_directory_without_path_not_found_lines(tmp_path):
    """From a directory outside the checkout, gin/base.gin's `include 'gin/models/...'` logged "Path not found"
    once per search path it missed. A file in the current directory comes first and includes by name."""
    (tmp_path / "mine.gin").write_text("include 'base.gin'\nTRAIN_STEPS = 7\n")
    done = _python(PARSE, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "base.gin": [256, 600], "gin/base.gin gin/models/t5_1_1_tiny.gin": [64, 600],
        "runs/eval.gin models/t5_1_1_tiny.gin": [64, 600], "mine.gin": [256, 7]}
    assert "Path not found" not in done.stderr


def test_a_gin_file_found_nowhere_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(gin_cli.GinConfigError, match="'nope.gin' not found"):
        gin_cli.parse_gin(["nope.gin"], [])
    (tmp_path / "bad.gin").write_text("include 'models/nope.gin'\n")
    with pytest.raises(gin_cli.GinConfigError, match="models/nope.gin"):
        gin_cli.parse_gin(["bad.gin"], [])
    gin.clear_config()


def test_progress_lines_give_done_total_rate_and_eta():
    now = [0.0]
    lines = []
    progress = summaries.Progress("infer (predict)", total=100, every_s=10, clock=lambda: now[0],
                                  print_fn=lines.append)
    for _ in range(100):
        now[0] += 30.0 if progress.done == 0 else 0.5  # the first batch compiles: 30 s; then 2 batches/s
        progress.update()
    progress.finish()
    # The first line comes at 30 s (the first batch); the rate leaves the compilation out.
    assert lines[0] == "infer (predict): 1/100 batches"
    assert lines[1] == "infer (predict): 21/100 batches | 2.00 batches/s | ETA 40s"
    assert lines[-1] == "infer (predict): 100 batches in 1m20s"
    assert len(lines) == 6  # at 30, 40, 50, 60 and 70 s, then the total (the last batch at 79.5 s)


def test_a_short_loop_prints_no_progress():
    lines = []
    assert list(summaries.Progress("decode", total=3, print_fn=lines.append).track(range(3))) == [0, 1, 2]
    assert lines == []


def test_ctrl_c_is_one_line_and_exit_code_130():
    @summaries.stops_on_interrupt("infer: interrupted (Ctrl-C)")
    def main(argv=None):
        raise KeyboardInterrupt

    err = io.StringIO()
    with redirect_stderr(err):
        assert main() == 130
    assert err.getvalue() == "infer: interrupted (Ctrl-C)\n"


def test_ctrl_c_in_a_tracked_loop_stops_it_at_the_next_item():
    """The SIGINT handler only marks the request (a KeyboardInterrupt raised inside a finalizer would be
    dropped); the loop raises it between two items, and the entry point exits with 130."""
    seen, before = [], signal.getsignal(signal.SIGINT)

    @summaries.stops_on_interrupt("infer: interrupted (Ctrl-C)")
    def main(argv=None):
        for i in summaries.Progress("loop", total=10, enabled=False).track(range(10)):
            seen.append(i)
            if i == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return 0

    err = io.StringIO()
    with redirect_stderr(err):
        assert main() == 130
    assert seen == [0, 1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is before  # the runner's handler is back


@pytest.mark.slow
def test_ctrl_c_stops_inference_within_seconds(tmp_path):
    """SIGINT while `python -m t5lite.infer` decodes: it exits within seconds with code 130 and one line,
    keeping the records written (a rerun resumes after them)."""
    from test_eval import LENGTHS, _save_random_checkpoint  # noqa: PLC0415

    model_dir = str(tmp_path / "run")
    _save_random_checkpoint(model_dir, 1, seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"copy: line number {i}\n" for i in range(30_000)))
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "t5lite.infer", "--gin_file=runs/infer.gin", "--gin_file=models/t5_1_1_tiny.gin",
               f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
               f"--gin.infer.input_file='{prompts}'", f"--gin.infer.output_path='{output}'", "--gin.infer.batch_size=1"]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a SIGINT ignored here would stay so there
    try:
        process = subprocess.Popen(command, cwd=str(tmp_path), env=_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        lines, deadline = queue.Queue(), time.monotonic() + 300
        threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
        seen = []
        while not (seen and seen[-1].startswith("infer (predict): ")):  # the first progress line: decoding
            seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0)))
        assert "to predict" in "".join(seen) and " batches | " in seen[-1] and "ETA " in seen[-1], seen
        start = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
        seconds = time.monotonic() - start
    finally:
        process.kill()
    err = process.stderr.read()
    assert code == 130, err
    assert err.strip().splitlines()[-1].startswith("infer: interrupted (Ctrl-C)") and "Traceback" not in err
    assert seconds < 10, seconds  # about 1.5 s on a loaded 2-core CPU
    records = output.read_text().splitlines()
    assert 0 < len(records) < 30_000 and json.loads(records[-1])["index"] == len(records) - 1


@pytest.mark.slow
def test_a_train_run_from_another_directory_is_quiet(tmp_path):
    """One tiny training step from outside the checkout, t5lite's gin files by name: its stderr has no TPU
    errors, no seqio cache warning, no gin "Path not found", and the progress line no CPU MFU."""
    done = subprocess.run(
        [sys.executable, "-m", "t5lite.train", "--gin_file=base.gin", "--gin_file=models/t5_1_1_tiny.gin",
         f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=2",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.EvalConfig.batches=1"],
        capture_output=True, text=True, cwd=str(tmp_path), env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    assert "step 1/1 | loss" in done.stdout
    if jax.devices()[0].platform == "cpu":  # no peak_flops_per_device.override: no MFU
        assert "MFU" not in done.stdout
    for noise in (*TPU_NOISE, "uncached FunctionDataset", "Path not found"):
        assert noise not in done.stderr, noise
