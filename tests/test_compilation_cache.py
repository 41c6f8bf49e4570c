"""The persistent compilation cache: where it goes, when it is off, and a restarted run loading its
train step from it instead of compiling."""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

from t5lite import compilation_cache, gin_cli
from t5lite.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_compilation_cache_max_size",
             "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture(autouse=True)
def restore_jax_cache_settings():
    """These tests change process-wide JAX settings; the rest of the run keeps its own cache."""
    saved = {name: getattr(jax.config, name) for name in _SETTINGS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.jax_cache.reset_cache()


def _a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


def test_explicit_directory_is_created_and_used_with_jax_size_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    directory = str(tmp_path / "cache")
    assert compilation_cache.enable(directory) == directory
    assert os.path.isdir(directory) and os.listdir(directory) == []  # the write probe is gone
    assert jax.config.jax_compilation_cache_dir == directory
    assert jax.config.jax_enable_compilation_cache
    assert jax.config.jax_compilation_cache_max_size == -1
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "123456789")
    compilation_cache.enable(directory)
    assert jax.config.jax_compilation_cache_max_size == 123456789


def test_without_a_flag_jax_setting_wins_over_the_default_which_alone_is_limited(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    monkeypatch.setattr(compilation_cache, "DEFAULT_DIR", str(tmp_path / "default"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "from_env"))
    assert compilation_cache.enable() == str(tmp_path / "from_env")
    assert jax.config.jax_compilation_cache_max_size == -1
    jax.config.update("jax_compilation_cache_dir", None)
    assert compilation_cache.enable() == str(tmp_path / "default")
    assert jax.config.jax_compilation_cache_max_size == compilation_cache.DEFAULT_MAX_BYTES
    # A second run in the same process (a notebook: train, then eval) finds the default in jax.config.
    assert compilation_cache.enable() == str(tmp_path / "default")
    assert jax.config.jax_compilation_cache_max_size == compilation_cache.DEFAULT_MAX_BYTES


def test_a_directory_shared_with_unlimited_writers_keeps_taking_entries(tmp_path, monkeypatch):
    """JAX fails every write of a size-limited cache to a directory that a writer without a limit
    has used (no access-time files); t5lite must not limit such a directory."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_compilation_cache_max_size", -1)
    compilation_cache.jax_cache.reset_cache()
    def entries():
        return len([f for f in os.listdir(tmp_path) if f.endswith("-cache")])

    x = jnp.ones(7)
    jax.jit(lambda x: x * 3 + 1)(x).block_until_ready()  # another program's entries, written with no limit
    before = entries()
    assert before >= 1
    assert compilation_cache.enable() == str(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Error writing persistent compilation cache entry" is a warning
        jax.jit(lambda x: x * 5 - 2)(x).block_until_ready()
    assert entries() == before + 1


@pytest.mark.parametrize("off", ["none", "None", ""])
def test_none_turns_the_cache_off(off, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    assert compilation_cache.enable(off) is None
    assert not jax.config.jax_enable_compilation_cache


def test_unwritable_explicit_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"--compilation_cache_dir .*a_file/cache.* is not writable.*=none"):
        compilation_cache.enable(str(_a_file(tmp_path) / "cache"))


def test_unwritable_default_directory_runs_without_a_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compilation_cache, "DEFAULT_DIR", str(_a_file(tmp_path) / "cache"))
    jax.config.update("jax_compilation_cache_dir", None)
    assert compilation_cache.enable() is None
    assert not jax.config.jax_enable_compilation_cache
    assert "Compiling without a persistent cache" in capsys.readouterr().out


def test_precompile_refuses_the_flag():
    from t5lite import precompile

    assert precompile.main(["--gin_file=gin/base.gin", "--gin.TOPOLOGY='v5e:2x2'",
                            "--compilation_cache_dir=/tmp/x"]) != 0


def test_flag_is_parsed():
    args, _ = gin_cli.parse_args(["--gin_file=gin/base.gin", "--compilation_cache_dir=none"], "")
    assert args.compilation_cache_dir == "none"


@pytest.mark.slow
def test_a_restarted_run_loads_its_train_step_from_the_cache(tmp_path):
    """Two runs of the same tiny model in fresh processes: the first compiles the train step and
    writes it to the cache, the second (another MODEL_DIR) loads it and says so."""
    cache = str(tmp_path / "cache")
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # a tiny model compiles in < 1 s
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def run(name):
        command = [sys.executable, "-m", "t5lite.train", "--gin_file=gin/base.gin",
                   "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
                   "--gin.BATCH_SIZE=4", "--gin.TRAIN_STEPS=2", "--gin.EvalConfig.batches=1",
                   f"--gin.MODEL_DIR='{tmp_path / name}'", f"--compilation_cache_dir={cache}"]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    first = run("first")
    assert "Compiled the train step" in first
    entries = os.listdir(cache)
    assert any(e.endswith("-cache") for e in entries), entries
    second = run("second")
    assert "Loaded the train step from the compilation cache" in second
