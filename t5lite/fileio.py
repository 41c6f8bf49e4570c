"""Files in MODEL_DIR on a local disk or a bucket (gs://, s3://, ...), through _gfile().

On a TPU pod MODEL_DIR is a bucket every worker shares: Python's open / os.makedirs would write a
local directory named "gs:" on each worker instead. Orbax reads and writes checkpoints in buckets
itself; everything else t5lite writes next to them (config, metrics, model info, eval results)
goes through these functions.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import uuid
from typing import IO


def _gfile():
    """tf.io.gfile, imported on the first use of a bucket: local paths never load TensorFlow, so the
    model, trainer and checkpoints run on a machine with jax alone."""
    import tensorflow as tf  # noqa: PLC0415

    return tf.io.gfile


def __getattr__(name: str):
    # ERRORS: what a failed file operation raises: OSError locally, tf.errors.OpError (e.g.
    # PermissionDeniedError) on a bucket, which only a process that has loaded TensorFlow can meet.
    if name == "ERRORS":
        tf = sys.modules.get("tensorflow")
        return (OSError, tf.errors.OpError) if tf is not None else (OSError,)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_remote(path: str) -> bool:
    """True for URLs such as gs://bucket/dir (anything with a scheme), False for local paths."""
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (so that it does not depend on the working directory); URLs as given."""
    return path if is_remote(path) else os.path.abspath(path)


def join(*parts: str) -> str:
    return os.path.join(*parts)  # "/"-separated on every OS t5lite runs on, URLs included


def open_file(path: str, mode: str = "r") -> IO:
    """Like open(); "a" (append) works on buckets too, by rewriting the object (keep such files small)."""
    if is_remote(path):
        return _gfile().GFile(path, mode)
    return open(path, mode, encoding=None if "b" in mode else "utf-8")


def copy(source: str, destination: str) -> None:
    """Copies a file's bytes (either side local or a bucket), overwriting `destination`."""
    with open_file(source, "rb") as src, open_file(destination, "wb") as dst:
        dst.write(src.read())


def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def check_writable_dir(path: str) -> None:
    """Creates directory `path` and proves it writable with a probe file; raises one of ERRORS if not."""
    makedirs(path)
    probe = join(path, f".write_test-{uuid.uuid4().hex}")  # hosts sharing the directory must not race
    with open_file(probe, "w") as f:
        f.write("ok")
    remove(probe)


def check_creatable_dir(path: str) -> None:
    """A local directory `path` could be created: its nearest existing parent is a writable directory.
    Raises one of ERRORS (as makedirs would) if not; creates nothing."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "Permission denied", parent)


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def remove(path: str) -> None:
    if is_remote(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def files_under(path: str) -> list[str]:
    """Every file below directory `path`, as sorted "/"-separated paths relative to it."""
    if is_remote(path):
        walked = ((root, files) for root, _, files in _gfile().walk(path))
    else:
        walked = ((root, files) for root, _, files in os.walk(path))
    found = []
    for root, files in walked:
        relative = os.path.relpath(root, path) if not is_remote(path) else root[len(path):].strip("/")
        found += [name if relative in ("", ".") else f"{relative}/{name}" for name in files]
    return sorted(found)


def free_bytes(path: str) -> int | None:
    """Free bytes on the local disk holding `path` (its nearest existing parent); None for buckets."""
    if is_remote(path):
        return None
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def rename(source: str, destination: str) -> None:
    """Moves a file or directory (on buckets: a copy then a delete, not atomic)."""
    if is_remote(source):
        _gfile().rename(source, destination, overwrite=False)
    else:
        os.replace(source, destination)
