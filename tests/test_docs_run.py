"""Every shell command of the docs runs, for real, as a user would type it in their own directory.

tests/test_docs.py reads the commands out of README.md and docs/*.md and checks that they parse; this
test runs them. Each command runs in a scratch "user directory" (not the repo: PYTHONPATH names it, as
in CI; its gin files are found by name) in the order: training commands first (in the docs' order; they
write the runs/ directories the others read), then every other command in the docs' order.

What is changed before a command runs, and why:
- A training run (`t5lite.train`, a sweep's trials, the same under launch/local.py) gets SHRINK's
  bindings appended: the same program for 4 steps instead of hundreds (evaluation, checkpointing and
  logging included); a random or Bayesian sweep runs 2 of its `--trials`. `t5lite.eval` decodes 8
  examples in batches of 8 instead of 64 (or all, the
  benchmark suite's 32 a batch); `--watch` stops 1 s after the
  last checkpoint is evaluated instead of waiting for more.
- `t5lite.precompile` compiles the tiny model (gin/models/t5_1_1_tiny.gin appended) for the same
  topology, batch, lengths and sharding: the docs' T5 1.1 Large takes over 10 minutes of this
  machine's 2 CPUs to compile, and what is tested here is the command, its flags and its report.
- A path `.../checkpoints/<N>` that does not exist (the docs cite step 600 of the default run) is
  replaced by the newest checkpoint of that run directory.
- A sweep runs 1 trial of a random or Bayesian study (not the docs' 16), and 2 folds of a
  cross-validation (not 5). A `--gin.BATCH_SIZE` over 16 becomes 16 (T5 1.1 Small's batch of 64 is
  minutes of this machine's 2 CPUs a step).
- `launch/` and `bench/` scripts are found in the repo.
- A command that shards over more devices than a CPU has (`make_mesh.*=4`) runs on 8 simulated
  devices.
The input files a user would bring are written first (FIXTURES: prompts.txt, raw.txt.gz).

Not run here, and why (each also parsed by tests/test_docs.py):
- blocks marked tpu, gpu, download, files or cloud (a TPU VM, a GPU, a Hugging Face download, a file the
  user writes, a cloud project); data-marked blocks run when T5LITE_DATA_DIR is set (CI), else are skipped;
- templates, where `...` stands for the user's paths;
- `python bench/...`: benchmarks, minutes of a quiet machine each, whose figures are what
  docs/performance.md records; the commands that set up a virtual environment and install
  (`python3 -m venv`, `pip install`) and the README's test command, which is the command CI runs.
- RUN_BY_TESTS: commands whose entry point and gin file a dedicated end-to-end test already runs (its
  name is the reason given), so CI does not pay for the same minutes twice; the flags of these commands
  are still parsed by tests/test_docs.py, and test_run_by_tests_names_tests_that_run_the_command checks
  that the named test file runs that entry point with that gin file.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_docs  # noqa: E402  (the docs' command reader)

REPO = test_docs.REPO
SHRINK_TRAIN = ["--gin.TRAIN_STEPS=4", "--gin.LoopConfig.log_every=2", "--gin.EvalConfig.every=4",
                "--gin.EvalConfig.batches=1", "--gin.EvalConfig.infer_examples=16", "--gin.CheckpointConfig.every=2"]
SHRINK = {
    "t5lite.train": SHRINK_TRAIN,
    "t5lite.sweep": [f"--gin={b.removeprefix('--gin.')}" for b in SHRINK_TRAIN],
    "t5lite.eval": ["--gin.evaluate.num_examples=8", "--gin.evaluate.batch_size=8", "--gin.evaluate.loss_batches=1"],
    "t5lite.precompile": ["--gin_file=gin/models/t5_1_1_tiny.gin"],
}
SHRINK_WATCH = ["--gin.evaluate.watch_interval_s=0.5", "--gin.evaluate.watch_timeout_s=1.0"]
NOT_RUN_NEEDS = {"tpu", "gpu", "download", "files", "cloud"}
FIXTURES = {
    "prompts.txt": "The quick brown fox\nA summary of the play:\nTo be or not to be\n",
}
RAW_TEXT = ("<p>The Tragedy of Hamlet, Prince of Denmark, is a play by William Shakespeare.</p>\n"
            "Click here to accept cookies\n"
            "It is Shakespeare's longest play, written between 1599 and 1601, and among the most "
            "powerful and influential tragedies in the English language.\n") * 20
COMMAND_TIMEOUT_S = 600
MAX_BATCH_SIZE = 16
# (entry point: a module or a launch/ script, the command's gin file or None for any) -> the test file
# that runs it end to end; see the module docstring.
RUN_BY_TESTS = {
    ("launch/local.py", None): "tests/test_multihost.py",
    ("t5lite.precompile", None): "tests/test_precompile.py",
    ("t5lite.eval", "gin/runs/benchmarks.gin"): "tests/test_benchmarks.py",
    ("t5lite.train", "gin/runs/dpo.gin"): "tests/test_preference.py",
    ("t5lite.train", "gin/runs/grpo.gin"): "tests/test_grpo.py",
    ("t5lite.train", "gin/runs/chat_sft_decoder_only.gin"): "tests/test_chat.py",
    # tests/test_sweep.py runs a Bayesian sweep on two workers and resumes it; a grid differs only in how
    # its trials are drawn (unit-tested there). The cross-validation sweep (one worker) is run here.
    ("t5lite.sweep", "--workers"): "tests/test_sweep.py",
    ("t5lite.sweep", "--grid"): "tests/test_sweep.py",
}


def _module(words: list[str]) -> str | None:
    return words[2] if len(words) > 2 and words[0] in ("python", "python3") and words[1] == "-m" else None


def _inner(words: list[str]) -> list[str]:
    """The command launch/local.py runs (after `--`), else the command itself."""
    return words[words.index("--") + 1:] if "--" in words else words


def _run_by_test(words: list[str]) -> str | None:
    """The test file of RUN_BY_TESTS that runs this command end to end, or None. The key's second part
    is None (any), the command's first --gin_file, or a flag the command passes."""
    entry = "launch/local.py" if "launch/local.py" in words[:2] else _module(words)
    gin_files = [w.removeprefix("--gin_file=") for w in words if w.startswith("--gin_file=")]
    flags = {w.split("=")[0] for w in words if w.startswith("--")}
    for (key_entry, key_arg), test_file in RUN_BY_TESTS.items():
        if key_entry == entry and (key_arg is None or key_arg in flags or gin_files[:1] == [key_arg]):
            return test_file
    return None


def _skip_reason(command: test_docs.Command) -> str | None:
    words = command.words
    run_by = _run_by_test(words)
    if run_by:
        return f"run end to end by {run_by}"
    if command.needs & NOT_RUN_NEEDS:
        return f"needs {sorted(command.needs & NOT_RUN_NEEDS)}"
    if "data" in command.needs and not os.environ.get("T5LITE_DATA_DIR"):
        return "needs the full data sets (T5LITE_DATA_DIR)"
    if words[0] in ("pip", "pip3", "pytest") or words[1:3] in (["-m", "venv"], ["-m", "pytest"]):
        return "sets up or tests the environment (CI runs these)"
    if any("..." in w for w in words):
        return "a template ('...' stands for the user's paths)"
    if any(w.startswith("bench/") for w in words[:2]):
        return "a benchmark (docs/performance.md)"
    return None


def runnable_commands() -> tuple[list[test_docs.Command], list[tuple[str, str]]]:
    """(commands to run in order, [(where, why not run)])."""
    seen, train, rest, skipped = set(), [], [], []
    for command in test_docs.all_commands():
        if not test_docs._is_command(command.words):
            continue
        key = tuple(command.words)
        if key in seen:
            continue
        seen.add(key)
        reason = _skip_reason(command)
        if reason:
            skipped.append((command.where, reason))
        elif _module(_inner(command.words)) in ("t5lite.train", "t5lite.sweep"):
            train.append(command)
        else:
            rest.append(command)
    return train + rest, skipped


def _newest_checkpoint(arg: str, cwd: str) -> str:
    """`--x=runs/base/checkpoints/600` -> the newest step of runs/base when 600 does not exist."""
    def replace(m: re.Match) -> str:
        path = m.group(0)
        if os.path.exists(os.path.join(cwd, path)):
            return path
        directory = os.path.join(cwd, m.group(1))
        steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit()) if os.path.isdir(directory) else []
        return f"{m.group(1)}/{steps[-1]}" if steps else path

    return re.sub(r"([\w./-]*checkpoints)/(\d+)", replace, arg)


def prepared(words: list[str], cwd: str) -> tuple[list[str], dict[str, str]]:
    """The command as this test runs it (see the module docstring) and its extra environment."""
    module = _module(_inner(words))  # before `python` becomes this interpreter's path
    words = [_newest_checkpoint(w, cwd) for w in words]
    if words[0] in ("python", "python3"):
        words = [sys.executable, *words[1:]]
        if len(words) > 1 and test_docs.SCRIPT.match(words[1]):
            words[1] = os.path.join(REPO, words[1])
    inner = _inner(words)
    if inner[0] in ("python", "python3"):
        inner[0] = sys.executable
    words = words[:len(words) - len(inner)] + inner
    words += SHRINK.get(module, [])
    if module == "t5lite.sweep":  # 1 trial of a random or Bayesian study, 2 folds of a cross-validation
        words = [("--trials=1" if w.startswith("--trials=") else "--cv_folds=2" if w.startswith("--cv_folds=") else w)
                 for w in words]
    words = [_at_most(w, "--gin.BATCH_SIZE=", MAX_BATCH_SIZE) for w in words]
    if module == "t5lite.eval" and "--watch" in inner:
        words += SHRINK_WATCH
    env = {}
    if any(re.match(r"--gin\.make_mesh\.\w+=[2-9]", w) for w in inner):
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return words, env


def _at_most(word: str, prefix: str, limit: int) -> str:
    """`--gin.BATCH_SIZE=64` -> `--gin.BATCH_SIZE=16` (prefix and limit), any other word as it is."""
    if word.startswith(prefix) and word[len(prefix):].isdigit() and int(word[len(prefix):]) > limit:
        return f"{prefix}{limit}"
    return word


def _write_fixtures(cwd: str) -> None:
    for name, text in FIXTURES.items():
        with open(os.path.join(cwd, name), "w", encoding="utf-8") as f:
            f.write(text)
    with gzip.open(os.path.join(cwd, "raw.txt.gz"), "wt", encoding="utf-8") as f:
        f.write(RAW_TEXT)


def test_training_commands_are_shrunk_and_run_with_this_interpreter(tmp_path):
    words, env = prepared(["python", "-m", "t5lite.train", "--gin_file=gin/base.gin"], str(tmp_path))
    assert words == [sys.executable, "-m", "t5lite.train", "--gin_file=gin/base.gin", *SHRINK_TRAIN] and not env
    words, env = prepared(["python", "launch/local.py", "--num_processes=2", "--", "python", "-m", "t5lite.eval",
                           "--gin.make_mesh.data=4", "--watch"], str(tmp_path))
    assert words[:2] == [sys.executable, os.path.join(REPO, "launch/local.py")]
    assert words[4:7] == [sys.executable, "-m", "t5lite.eval"] and words[-2:] == SHRINK_WATCH
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_run_by_tests_names_tests_that_run_the_command():
    """Each RUN_BY_TESTS entry matches a docs command, and its test file runs that entry point (and gin
    file) end to end: the skip cannot outlive the test it relies on."""
    _, skipped = runnable_commands()
    reasons = {why for _, why in skipped}
    for (entry, arg), test_file in RUN_BY_TESTS.items():
        assert f"run end to end by {test_file}" in reasons, (entry, arg)
        with open(os.path.join(REPO, test_file), encoding="utf-8") as f:
            source = f.read()
        assert (entry.removesuffix(".py").split("/")[-1] if "/" in entry else entry) in source, (entry, test_file)
        assert arg is None or arg.startswith("--") or arg in source, (arg, test_file)
        assert "pytest.mark.slow" in source, test_file


def test_sweeps_and_large_batches_are_shrunk(tmp_path):
    words, _ = prepared(["python", "-m", "t5lite.sweep", "--trials=16", "--cv_folds=5", "--gin.BATCH_SIZE=64",
                         "--gin.BATCH_SIZE_X=64"], str(tmp_path))
    assert words[3:6] == ["--trials=1", "--cv_folds=2", "--gin.BATCH_SIZE=16"] and "--gin.BATCH_SIZE_X=64" in words


def test_runnable_commands_cover_every_entry_point_the_docs_show():
    commands, skipped = runnable_commands()
    modules = {_module(_inner(c.words)) for c in commands}
    expected = {"t5lite.train", "t5lite.eval", "t5lite.infer", "t5lite.hf_t5", "t5lite.export",
                "t5lite.data.cleaning", "t5lite.data.dedup", "t5lite.data.inspect"}
    assert expected <= modules, sorted(filter(None, modules))
    assert all(reason for _, reason in skipped)


@pytest.mark.slow
def test_every_docs_command_runs(tmp_path):
    cwd = str(tmp_path)
    _write_fixtures(cwd)
    env_base = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    env_base.pop("XLA_FLAGS", None)
    commands, skipped = runnable_commands()
    failures, timings = [], []
    for command in commands:
        words, extra_env = prepared(command.words, cwd)
        t0 = time.monotonic()
        try:
            done = subprocess.run(words, cwd=cwd, env={**env_base, **extra_env}, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S)
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            code, output = f"none: still running after {COMMAND_TIMEOUT_S} s", f"{e.stdout or ''}{e.stderr or ''}"
        timings.append(f"{time.monotonic() - t0:6.1f} s  {command.where}  {' '.join(command.words)[:100]}")
        if code != 0:
            failures.append(f"{command.where}: exit {code}: {' '.join(words)}\n{str(output)[-2500:]}")
    print("\n".join(timings + [f"not run: {where}: {why}" for where, why in skipped]))
    assert not failures, "\n\n".join(failures)
