"""The persistent compilation cache: compiled programs kept on disk across runs.

A restarted run (after a preemption or a crash, or to evaluate another checkpoint) compiles the same
train, eval and decode programs again: seconds for a small model on a CPU, minutes for a large one
on a TPU pod. JAX can keep the executables on disk, keyed by the program, its devices and shardings,
the jax / XLA versions and the compiler flags, and load them instead. train, eval and infer turn it
on (gin_cli.configure) for every program that took at least a second to compile (JAX's threshold,
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`); a changed model or batch shape is another key, so a
stale entry is never used, only left on disk (see Size).

Where, in order: --compilation_cache_dir=DIR; else $JAX_COMPILATION_CACHE_DIR; else
~/.cache/t5lite/jax-compilation-cache. --compilation_cache_dir=none turns it off. A gs:// path
shares one cache between the hosts of a pod.

Size: that default directory, which only t5lite writes, is kept under 4 GiB (least recently used
entries go first). Other directories get JAX's own setting, $JAX_COMPILATION_CACHE_MAX_SIZE in bytes
(default -1: no limit), because JAX can limit a directory only if every process writing to it does:
a writer without a limit records no access times, and a writer with one then fails to write (seen
with jax 0.10.2: "Error writing persistent compilation cache entry ... -atime").

The cache is trusted: a program read from it runs as is. As JAX warns, never point it at a directory
that people you do not trust can write.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from t5lite import fileio
from t5lite.errors import UserError

DEFAULT_DIR = os.path.join("~", ".cache", "t5lite", "jax-compilation-cache")
DEFAULT_MAX_BYTES = 4 * 2**30
_OFF = ("", "none")


def enable(directory: str | None = None) -> str | None:
    """Points JAX's persistent compilation cache at `directory` (None: $JAX_COMPILATION_CACHE_DIR, else
    DEFAULT_DIR, limited to DEFAULT_MAX_BYTES; "none": off) and returns the directory in use, or None
    when off. Call it before the first compilation. A directory given explicitly must be writable
    (UserError); an unwritable default means no cache, with a note: the run does not need one."""
    explicit = directory is not None
    if directory is None:
        directory = jax.config.jax_compilation_cache_dir or os.path.expanduser(DEFAULT_DIR)
    if directory.strip().lower() in _OFF:
        _configure(None)
        return None
    directory = fileio.absolute(directory)
    try:
        fileio.check_writable_dir(directory)
    except fileio.ERRORS as e:
        reason = getattr(e, "strerror", None) or e
        if explicit:
            raise UserError(f"--compilation_cache_dir {directory!r} is not writable ({reason}). Choose another "
                            "directory, or --compilation_cache_dir=none to compile without a cache.") from e
        print(f"Compiling without a persistent cache: {directory} is not writable ({reason}).", flush=True)
        _configure(None)
        return None
    # Decided by the path, not by how it was reached: a second call in one process finds the default
    # directory in jax.config and must keep its limit (an unlimited writer there breaks limited ones).
    _configure(directory, limit=directory == fileio.absolute(os.path.expanduser(DEFAULT_DIR)))
    return directory


def _configure(directory: str | None, limit: bool = False) -> None:
    jax.config.update("jax_enable_compilation_cache", directory is not None)
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", directory)
        max_bytes = os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE")
        jax.config.update("jax_compilation_cache_max_size",
                          int(max_bytes) if max_bytes else DEFAULT_MAX_BYTES if limit else -1)
    # JAX opens its cache once, at the first compilation; a second call in the same process (a
    # notebook, a test) must reopen it for the new settings to apply.
    jax_cache.reset_cache()
