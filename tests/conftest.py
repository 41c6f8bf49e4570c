"""Fixtures shared by every test module, and one JAX compilation cache for the whole run."""

import os
import shutil
import tempfile

import gin
import pytest

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    """Many tests (and the train / eval / infer processes they start) compile the same tiny-model
    programs; a persistent cache shared by the run compiles each once. It is set in the environment
    before jax is imported, so worker processes (pytest-xdist) and subprocesses inherit it. A cache
    the user set is kept; the run's own is removed at the end."""
    if _CACHE_ENV in os.environ or hasattr(config, "workerinput"):
        return
    config._t5lite_jax_cache = tempfile.mkdtemp(prefix="t5lite-tests-jax-cache-")
    os.environ[_CACHE_ENV] = config._t5lite_jax_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny models compile in < 1 s
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    cache = getattr(config, "_t5lite_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        del os.environ[_CACHE_ENV]


@pytest.fixture(autouse=True)
def clean_gin():
    """Each test starts and ends with no gin bindings: t5lite's entry points parse gin globally."""
    gin.clear_config()
    yield
    gin.clear_config()
