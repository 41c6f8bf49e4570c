"""Fixtures shared by every test module, and one JAX compilation cache for the whole run."""

import json
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


# --- Data sets: the full public ones ($T5LITE_DATA_DIR) or the excerpts shipped with the tests ---------------

DATA_DIR_ENV = "T5LITE_DATA_DIR"  # = t5lite.data.downstream.DATA_DIR_ENV (not imported here: it imports TensorFlow)
EXCERPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "excerpts")
FULL_DATA_REASON = f"needs the full public data sets: set {DATA_DIR_ENV}=.../shared/data"


def _full_data_dir():
    """$T5LITE_DATA_DIR, unless it is unset or names the shipped excerpts."""
    path = os.environ.get(DATA_DIR_ENV)
    if not path or os.path.realpath(path) == os.path.realpath(EXCERPTS_DIR):
        return None
    return path


class DataDir(str):
    """A data directory (a str: its path) in the layout of t5lite/data/downstream.py, and whether it holds
    the full data sets (`full`) or the excerpts of tests/data/excerpts (README.md there)."""

    def __new__(cls, path, full):
        self = super().__new__(cls, path)
        self.full = full
        return self

    def path(self, *parts):
        return os.path.join(self, *parts)

    def rows(self, relative_path, full):
        """The rows `relative_path` holds: `full` in the full data sets, else the count the excerpt was cut
        to (MANIFEST.json, written by tests/data/make_excerpts.py). A test asserting it fails on either."""
        if self.full:
            return full
        with open(os.path.join(EXCERPTS_DIR, "MANIFEST.json"), encoding="utf-8") as f:
            return json.load(f)[relative_path]["rows"]


@pytest.fixture
def data_dir(monkeypatch):
    """Real rows for tests of loaders, formats and metrics: the full public data sets at $T5LITE_DATA_DIR
    when it is set, else the excerpts shipped in tests/data/excerpts. Sets $T5LITE_DATA_DIR to that
    directory for t5lite's loaders. Tests that need the full data sets (row counts of whole splits,
    published figures) are marked @pytest.mark.full_data instead: skipped when $T5LITE_DATA_DIR is unset."""
    full = _full_data_dir()
    directory = DataDir(full or EXCERPTS_DIR, full=bool(full))
    monkeypatch.setenv(DATA_DIR_ENV, directory)
    return directory


# The longest test, started first: the docs' commands, one after another (~20 minutes of one CPU).
_LONGEST_FIRST = ("test_docs_run.py::test_every_docs_command_runs",)


def pytest_collection_modifyitems(config, items):
    """Longest first, then the other slow tests, then the rest: pytest-xdist hands tests out in this
    order, and a long test started last would run on one worker while the others idle. Then, without
    the full data sets, the tests that need them are skipped."""
    def rank(item):
        if item.nodeid.endswith(_LONGEST_FIRST):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)  # stable: the collection order within each rank
    if _full_data_dir():
        return
    skip = pytest.mark.skip(reason=FULL_DATA_REASON)
    for item in items:
        if item.get_closest_marker("full_data"):
            item.add_marker(skip)
