"""Command-line gin handling shared by the entry points.

    --gin_file=PATH           (repeatable; later files override earlier ones)
    --gin.NAME=VALUE          (repeatable; a binding or macro, applied after all files)
    --gin_search_paths=A,B    (where `include` and --gin_file look after the current directory,
                              before t5lite's gin/: base.gin, models/t5_1_1_tiny.gin, ...)
    --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                              (a multi-process run on CPU / GPU hosts; TPU pods need none of them)
    --compilation_cache_dir=DIR|none
                              (compiled programs kept across runs; see t5lite.compilation_cache)

Gin errors (a typo in a binding, an unknown configurable, a missing file) are turned into a
GinConfigError that names the problem, instead of a deep traceback.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import logging
import os
import re
from collections.abc import Sequence

import gin

from t5lite import compilation_cache, fileio
from t5lite.distributed import initialize_distributed
from t5lite.errors import UserError
from t5lite.run_config import MOVED_BINDINGS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where a --gin_file or an `include` is looked for after the current directory and --gin_search_paths:
# t5lite's own gin/ ("base.gin", "models/t5_1_1_tiny.gin" from any directory), then the root of the
# t5lite checkout ("gin/base.gin"; a `pip install -e .` keeps it beside the package).
DEFAULT_SEARCH_PATHS = (os.path.join(REPO_ROOT, "gin"), REPO_ROOT)


class _QuietGinPathProbes(logging.Filter):
    """gin asks each file reader at each search path whether an `include`d file is there, and its
    Python-package reader logs "Path not found" at every miss, also when a later path has the file.
    Those lines say nothing: a file found nowhere fails with gin's own error, naming the paths searched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "Path not found: %s" and record.name == "root"
                    and record.pathname.endswith(os.path.join("gin", "resource_reader.py")))


_QUIET_GIN_PATH_PROBES = _QuietGinPathProbes()


class GinConfigError(UserError):
    """A user error in gin files or bindings."""


def parse_args(argv: Sequence[str], description: str) -> tuple[argparse.Namespace, list[str]]:
    """Splits argv into known flags and `--gin.NAME=VALUE` bindings ("NAME = VALUE")."""
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith("--gin."):
            name, sep, value = arg[len("--gin."):].partition("=")
            if not sep:
                raise GinConfigError(f"{arg!r}: write --gin.NAME=VALUE, e.g. --gin.MODEL_DIR=\\\"runs/x\\\".")
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--gin_search_paths", default="", help="comma-separated include directories")
    parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (multi-process)")
    parser.add_argument("--num_processes", type=int, default=None, help="processes in the run (multi-process)")
    parser.add_argument("--process_id", type=int, default=None, help="this process, 0..num_processes-1")
    parser.add_argument("--compilation_cache_dir", default=None,
                        help="persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR, else "
                        f"{compilation_cache.DEFAULT_DIR}); 'none' turns it off")
    args = parser.parse_args(rest)
    return args, bindings


def configure(argv: Sequence[str], description: str) -> argparse.Namespace:
    """What train / eval / infer start with: the flags parsed, the multi-process run joined (before
    any JAX computation), the compilation cache opened, then the gin files and bindings applied.
    Returns the parsed flags."""
    args, bindings = parse_args(argv, description)
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    compilation_cache.enable(args.compilation_cache_dir)
    parse_gin(args.gin_file, bindings, search_paths(args))
    return args


def search_paths(args: argparse.Namespace) -> list[str]:
    """--gin_search_paths as a list."""
    return [p for p in args.gin_search_paths.split(",") if p]


def _resolve(path: str, search_paths: Sequence[str]) -> str:
    """The first search path's `path` that is a file (`path` itself if absolute)."""
    for base in search_paths:
        candidate = os.path.join(base, path)
        if os.path.isfile(candidate):
            return candidate
    raise GinConfigError(f"gin file {path!r} not found in {list(search_paths)}.")


def _configurable_names() -> list[str]:
    """Every registered configurable, by short name and by module-qualified name."""
    selectors = [name for name, _ in gin.config._REGISTRY.items()]  # noqa: SLF001  (no public listing)
    return sorted({s.rsplit(".", 1)[-1] for s in selectors} | set(selectors))


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()) -> None:
    """Parses files then bindings, finalizes the config; raises GinConfigError on user errors.

    A file (a --gin_file or an `include` in one) is looked for in the current directory (or at its
    absolute path), then in `search_paths`, then in DEFAULT_SEARCH_PATHS: t5lite's gin files are
    found by name from any directory."""
    logging.getLogger().addFilter(_QUIET_GIN_PATH_PROBES)  # gin logs on the root logger; added once
    paths = [*search_paths, *DEFAULT_SEARCH_PATHS]
    for p in paths:
        if p not in gin.config._LOCATION_PREFIXES:  # noqa: SLF001  (gin appends duplicates; no public listing)
            gin.add_config_file_search_path(p)
    if not gin_files:
        raise GinConfigError("No --gin_file given; start from --gin_file=gin/base.gin.")
    files = [_resolve(f, [".", *paths]) for f in gin_files]
    for attempt in range(3):
        try:
            gin.parse_config_files_and_bindings(files, bindings)
            return
        except (ValueError, KeyError, OSError, SyntaxError, ImportError) as e:
            if _is_ast_thread_race(e) and attempt < 2:
                continue  # the same files and bindings again: parsing is idempotent
            raise GinConfigError(_unquoted_string(bindings) if isinstance(e, SyntaxError) and _unquoted_string(bindings)
                                 else _explain(e)) from e


def _unquoted_string(bindings: Sequence[str]) -> str | None:
    """The message for a binding whose value is a bare word such as runs/x (the shell ate its quotes)."""
    for binding in bindings:
        name, _, value = binding.partition("=")
        value = value.strip()
        if not value or value[0] in "%@" or value in ("True", "False", "None"):
            continue  # a macro, a configurable reference or a constant gin parses itself
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            name = name.strip()
            return (f"gin cannot parse --gin.{name}={value}: the value is not a Python literal. A string "
                    f"needs quotes that reach gin past the shell: --gin.{name}=\\\"{value}\\\" or "
                    f"--gin.{name}=\"'{value}'\".")
    return None


def parse_run_config(path: str) -> None:
    """Replaces gin's bindings with those of a run's saved MODEL_DIR/config.gin (local or a bucket;
    it may import the user's task modules); a file gin cannot parse is a GinConfigError naming it."""
    gin.clear_config()
    with fileio.open_file(path) as f:
        text = f.read()
    try:
        gin.parse_config(text)
    except (ValueError, KeyError, OSError, SyntaxError, ImportError) as e:
        raise GinConfigError(f"{path}: {_explain(e)}") from e


def _is_ast_thread_race(error: Exception) -> bool:
    """A CPython 3.11 bug (seen on 3.11.7; cf. gh-106905): ast.literal_eval, which gin's parser calls, can
    fail spuriously while another thread (e.g. TF autograph in a tf.data thread) also builds an AST."""
    return "AST constructor recursion depth mismatch" in str(error)


def _explain(error: Exception) -> str:
    message = str(error).strip()
    moved = [f"{old} is now {new}" for old, new in MOVED_BINDINGS.items()
             if re.search(rf"\b{re.escape(old)}\b", message)]
    if moved:  # a binding of the old flat train(): name its new home
        return f"gin configuration error: {'; '.join(moved)} (t5lite/run_config.py). {message}"
    hint = ""
    # gin says e.g. "No configurable matching 'trian'." -> suggest registered names.
    if "No configurable matching" in message:
        wanted = message.split("'")[1] if "'" in message else ""
        close = difflib.get_close_matches(wanted, _configurable_names(), n=3)
        if close:
            hint = f" Did you mean: {', '.join(close)}?"
    return f"gin configuration error: {message}{hint}"
