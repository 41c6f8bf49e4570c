"""The user docs (README.md, docs/*.md) stay true: links resolve, the README stays short, every docs page
is linked from it, and every shell command in them parses or says what it needs.

Commands are read from code blocks (fenced without a language or with sh/bash/shell/console, or indented
by 4 spaces) and from inline code that starts with `python -m t5lite.`, `python bench/` or
`python launch/`. A line continued with `\\` is one command; `a && b` is two.

Marker syntax: an HTML comment on the line before a code block (a blank line between is allowed) says
what running the block needs; a reader sees it in the Markdown source, nowhere else:

    <!-- needs: tpu -->        a TPU VM or slice (launch/tpu_vm.sh, jax[tpu])
    <!-- needs: gpu -->        a GPU
    <!-- needs: data -->       the full public data sets ($T5LITE_DATA_DIR)
    <!-- needs: download -->   something downloaded first (e.g. a Hugging Face checkpoint)
    <!-- needs: files -->      files the page shows or an earlier command writes, not in the repo
    <!-- needs: cloud -->      a cloud project (a Dataflow runner, a gs:// bucket)

Several needs: `<!-- needs: tpu, data -->`.

What is checked (parsing only; nothing is run, so the test takes seconds):
- `python -m t5lite.X ...`: t5lite/X.py exists; the arguments parse with X.main's own argparse parser;
  for the gin entry points (those that call t5lite.gin_cli.parse_args) every --gin_file resolves and the
  gin files plus --gin.NAME=VALUE bindings parse with gin, in a subprocess per module that imports only
  t5lite.X, so a binding of a configurable the command would not import fails. Placeholders are
  replaced first: $VAR by the value the block assigns it (else "x"), <...> by 1.
- `python -m M` (M not t5lite): M is importable. `python PATH.py`: the script exists.
- `pip install -r F [-e .]`: F exists. `launch/local.py ... -- CMD` and `launch/tpu_vm.sh ... -- CMD`:
  the script exists and CMD is checked like any command.
- Blocks marked tpu, gpu, cloud or data are checked all the same (parsing needs none of them). Blocks marked
  files or download reference files not in the repo: only their modules and scripts must exist.
- Any other command (tensorboard, gcloud, pip install PACKAGE, ...) must be in a marked block.
The commands that the test suite runs for real (the quick start's train command, the new-task guide,
the notebooks) stay tested where they are run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))
README_MAX_LINES = 200
NEEDS = {"tpu", "gpu", "data", "download", "files", "cloud"}
UNPARSEABLE_NEEDS = {"download", "files"}  # their commands name files that are not in the repo
MARKER = re.compile(r"^\s*<!--\s*needs:\s*([^>]*?)\s*-->\s*$")
SHELL_FENCES = {"", "sh", "bash", "shell", "console"}
COMMAND_WORDS = {"python", "python3", "pip", "pip3", "bash", "sh", "tensorboard", "gcloud", "pytest"}
SCRIPT = re.compile(r"^(\./)?[\w.-]+(/[\w.-]+)+\.(py|sh)$")
INLINE_COMMAND = re.compile(r"^python (-m t5lite\.|bench/|launch/)")
SCRIPT_NEEDS = {"launch/tpu_vm.sh": "tpu"}  # scripts that cannot run without what they name
GIN_FILE_DIRS = ("", "gin")  # gin_cli's search paths: the repo root (the commands run there) and gin/


@dataclass
class Block:
    path: str
    line: int  # 1-based line of the block's first line
    lines: list[str]
    needs: set[str] = field(default_factory=set)
    marker_text: str | None = None


@dataclass
class Command:
    where: str  # "docs/x.md:12"
    words: list[str]
    needs: set[str]


# --- Reading the Markdown -------------------------------------------------------------------------------


def _read(path: str) -> list[str]:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read().split("\n")


def _marker_before(lines: list[str], index: int) -> str | None:
    """The needs-marker text on the nearest non-blank line before lines[index], if any."""
    i = index - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    if i >= 0:
        m = MARKER.match(lines[i])
        if m:
            return m.group(1)
    return None


def code_blocks(path: str) -> list[Block]:
    """Fenced (any language) and indented code blocks of a Markdown file; fenced ones carry their language
    in lines[0] as '```lang'."""
    lines, blocks, i = _read(path), [], 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^ {0,3}(```+|~~~+)\s*(\S*)", line)
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].lstrip().startswith(fence.group(1)):
                end += 1
            blocks.append(Block(path, i + 1, [f"```{fence.group(2)}"] + lines[i + 1:end],
                                marker_text=_marker_before(lines, i)))
            i = end + 1
            continue
        starts_indented = line.startswith("    ") and line.strip() and (
            i == 0 or not lines[i - 1].strip() or MARKER.match(lines[i - 1]))
        if starts_indented:
            indent = len(line) - len(line.lstrip())
            end = i
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) >= indent):
                end += 1
            body = [ln[indent:] for ln in lines[i:end]]
            while body and not body[-1].strip():
                body.pop()
            blocks.append(Block(path, i + 1, body, marker_text=_marker_before(lines, i)))
            i = end
            continue
        i += 1
    for block in blocks:
        if block.marker_text is not None:
            block.needs = {n.strip() for n in block.marker_text.split(",") if n.strip()}
    return blocks


def _prose(path: str) -> str:
    """The file without code blocks and inline code (where links and headings live)."""
    text = "\n".join(_read(path))
    text = re.sub(r"^ {0,3}```.*?^ {0,3}```[^\n]*$", "", text, flags=re.S | re.M)
    text = re.sub(r"(^|\n\n)((?: {4}.*\n?)+)", r"\1", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _block_commands(block: Block) -> list[Command]:
    if block.lines and block.lines[0].startswith("```"):
        if block.lines[0][3:] not in SHELL_FENCES:
            return []
        body, first = block.lines[1:], block.line + 1
    else:
        body, first = block.lines, block.line
    commands, assigned, pending, pending_line = [], {}, "", 0
    for offset, raw in enumerate(body):
        if not pending:
            pending_line = first + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text, pending = pending + raw, ""
        words = _shell_words(text, assigned)
        if words is None:  # prose in a code block (an apostrophe), or a broken command
            if _is_command(text.split()):
                commands.append(Command(f"{block.path}:{pending_line}", ["<unparseable shell>", text], block.needs))
            continue
        for part in _split_and(words):
            part = _strip_assignments(part, assigned)
            if part:
                commands.append(Command(f"{block.path}:{pending_line}", part, block.needs))
    return commands


def _shell_words(text: str, assigned: dict[str, str]) -> list[str] | None:
    def value(m):
        return assigned.get(m.group(1) or m.group(2), "x")

    text = re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)
    text = re.sub(r"<[^<>\n]+>", "1", text)
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return None


def _split_and(words: list[str]) -> list[list[str]]:
    parts, current = [], []
    for w in words:
        if w in ("&&", "||", ";"):
            parts.append(current)
            current = []
        else:
            current.append(w)
    return [*parts, current]


def _strip_assignments(words: list[str], assigned: dict[str, str]) -> list[str]:
    """Drops leading NAME=value words (recording them) and `export NAME=value` lines."""
    if words and words[0] == "export":
        for w in words[1:]:
            name, _, val = w.partition("=")
            assigned[name] = val
        return []
    i = 0
    while i < len(words) and re.match(r"^[A-Za-z_]\w*=", words[i]):
        name, _, val = words[i].partition("=")
        if i == len(words) - 1:  # a plain assignment line: CKPT=...
            assigned[name] = val
        i += 1
    return words[i:]


def inline_commands(path: str) -> list[Command]:
    commands = []
    for n, line in enumerate(_read(path), 1):
        for span in re.findall(r"`([^`\n]+)`", line):
            words = span.split()
            min_words = 4 if words[1:2] == ["-m"] else 3  # `python -m t5lite.eval` alone names a module
            if INLINE_COMMAND.match(span) and "..." not in words and len(words) >= min_words:
                parsed = _shell_words(span, {})
                commands.append(Command(f"{path}:{n}", parsed or ["<unparseable shell>", span], set()))
    return commands


def all_commands() -> list[Command]:
    commands = []
    for path in DOC_FILES:
        for block in code_blocks(path):
            commands.extend(_block_commands(block))
        commands.extend(inline_commands(path))
    return commands


# --- What a command is ----------------------------------------------------------------------------------


def _is_command(words: list[str]) -> bool:
    return bool(words) and (words[0] in COMMAND_WORDS or bool(SCRIPT.match(words[0])))


def _module_file(module: str) -> str | None:
    base = os.path.join(REPO, *module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__main__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _gin_file_resolves(name: str) -> bool:
    return any(os.path.isfile(os.path.join(REPO, d, name)) for d in GIN_FILE_DIRS)


def classify(command: Command) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(problems found without importing anything, t5lite commands to parse in a subprocess)."""
    words, problems, parses = command.words, [], []
    parse = not (command.needs & UNPARSEABLE_NEEDS)
    if words[0] == "<unparseable shell>":
        return [f"the shell cannot split: {words[1]!r}"], []
    if words[0] in ("python", "python3"):
        if len(words) >= 3 and words[1] == "-m":
            module, args = words[2], words[3:]
            if module.split(".")[0] == "t5lite":
                if _module_file(module) is None:
                    problems.append(f"no module {module} (t5lite/{module[7:].replace('.', '/')}.py)")
                elif parse:
                    problems += [f"--gin_file={f} is neither under the repo root nor gin/"
                                 for f in _gin_files(args) if not _gin_file_resolves(f)]
                    parses.append((module, args))
            elif importlib.util.find_spec(module.split(".")[0]) is None:
                problems.append(f"python -m {module}: not importable")
            return problems, parses
        if len(words) >= 2 and SCRIPT.match(words[1]):
            return _script(words[1:], command, problems, parses)
        return [f"not a command this test knows: {' '.join(words)}"], []
    if SCRIPT.match(words[0]):
        return _script(words, command, problems, parses)
    if words[0] in ("pip", "pip3") and words[1:2] == ["install"]:
        rest, unknown = words[2:], []
        while rest:
            if rest[0] == "-r" and len(rest) > 1:
                if not os.path.isfile(os.path.join(REPO, rest[1])):
                    problems.append(f"pip install -r {rest[1]}: no such file")
                rest = rest[2:]
            elif rest[:2] == ["-e", "."]:
                rest = rest[2:]
            else:
                unknown.append(rest.pop(0))
        if unknown and not command.needs:
            problems.append(f"pip install {' '.join(unknown)}: installs from a registry; mark the block")
        return problems, parses
    if not command.needs:
        problems.append(f"{words[0]}: not checkable here; mark the block with <!-- needs: ... -->")
    return problems, parses


def _script(words, command, problems, parses):
    if not os.path.isfile(os.path.join(REPO, words[0])):
        problems.append(f"no script {words[0]}")
    need = SCRIPT_NEEDS.get(words[0].removeprefix("./"))
    if need and need not in command.needs:
        problems.append(f"{words[0]} runs only with <!-- needs: {need} --> before its block")
    if "--" in words:  # launch/local.py / launch/tpu_vm.sh ... -- CMD
        inner = Command(command.where, words[words.index("--") + 1:], command.needs)
        if inner.words:
            more_problems, more_parses = classify(inner)
            problems += more_problems
            parses += more_parses
    return problems, parses


def _gin_files(args: list[str]) -> list[str]:
    files, it = [], iter(args)
    for a in it:
        if a.startswith("--gin_file="):
            files.append(a.split("=", 1)[1])
        elif a == "--gin_file":
            files.append(next(it, ""))
    return files


# --- The tests ------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    anchors, seen, in_fence = set(), {}, False
    for line in _read(path):
        if re.match(r"^ {0,3}```", line):
            in_fence = not in_fence
        m = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_relative_links_point_at_existing_files_and_anchors():
    bad = []
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(path)):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(os.path.join(REPO, resolved)):
                bad.append(f"{path}: ({target}): no file {resolved}")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
                bad.append(f"{path}: ({target}): no heading #{anchor} in {resolved}")
    assert not bad, "\n".join(bad)


def test_readme_is_short():
    n = len(open(os.path.join(REPO, "README.md"), encoding="utf-8").read().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to a docs/ page"


def test_every_docs_page_is_linked_from_the_readme_and_starts_with_a_summary():
    readme = _prose("README.md")
    for path in DOC_FILES[1:]:
        assert f"({path})" in readme, f"README.md does not link {path}"
        lines = _read(path)
        assert lines[0].startswith("# "), f"{path}: starts with a '# Title' line"
        summary = lines[2] if len(lines) > 2 else ""
        assert summary and not summary.startswith(("#", "    ", "|", "-", "```")), (
            f"{path}: the title is followed by a one-paragraph summary")


def test_markers_name_known_needs_and_precede_code_blocks():
    bad = []
    for path in DOC_FILES:
        blocks_after = {b.line for b in code_blocks(path)}
        lines = _read(path)
        for n, line in enumerate(lines, 1):
            m = MARKER.match(line)
            if not m:
                continue
            unknown = {x.strip() for x in m.group(1).split(",")} - NEEDS
            if unknown:
                bad.append(f"{path}:{n}: unknown needs {sorted(unknown)} (known: {sorted(NEEDS)})")
            nxt = n
            while nxt < len(lines) and not lines[nxt].strip():
                nxt += 1
            if nxt + 1 not in blocks_after:
                bad.append(f"{path}:{n}: a needs-marker must be followed by a code block")
    assert not bad, "\n".join(bad)


def test_every_command_is_checkable_or_marked():
    commands = [c for c in all_commands() if _is_command(c.words) or c.words[0] == "<unparseable shell>"]
    assert len(commands) >= 20, f"found only {len(commands)} commands: is the block reader broken?"
    bad = []
    for command in commands:
        problems, _ = classify(command)
        bad += [f"{command.where}: {p}" for p in problems]
    assert not bad, "\n".join(bad)


def test_t5lite_commands_parse():
    """Every checkable `python -m t5lite.X` command parses: flags with X's own parser, gin files and
    bindings with gin (see _parse_groups)."""
    groups: dict[str, list[tuple[str, str, list[str]]]] = {}
    for command in all_commands():
        if not _is_command(command.words):
            continue
        for module, args in classify(command)[1]:
            # gin's registry is global: a gin entry point gets a process of its own; the rest share one
            group = module if _is_gin_entry_point(module) else "argparse only"
            groups.setdefault(group, []).append((module, command.where, args))
    assert {"t5lite.train", "t5lite.eval", "t5lite.infer"} <= set(groups), sorted(groups)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--parse"], input=json.dumps(groups),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    try:
        failures = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        failures = [["(all commands)", f"the parse subprocess failed:\n{done.stderr[-3000:]}"]]
    assert not failures, "\n".join(f"{where}: {error}" for where, error in failures)


# --- The parse subprocess -------------------------------------------------------------------------------


class _Parsed(BaseException):
    """Raised once a command's flags (and gin) parsed: main() stops before doing anything."""


def _is_gin_entry_point(module: str) -> bool:
    with open(_module_file(module), encoding="utf-8") as f:
        return "gin_cli.configure(" in (text := f.read()) or "gin_cli.parse_args(" in text


def _parse_in_this_process(commands: list[tuple[str, str, list[str]]]) -> list[list[str]]:
    """Calls module.main(args) for each (module, where, args) with argparse stopped right after parsing;
    for the gin entry points (t5lite.gin_cli.parse_args) the gin files and bindings are parsed first."""
    import gin

    from t5lite import gin_cli

    original_parse_args = argparse.ArgumentParser.parse_args
    original_gin_parse_args = gin_cli.parse_args
    inside_gin_cli = []

    def parse_args(self, args=None, namespace=None):
        result = original_parse_args(self, args, namespace)
        if not inside_gin_cli:
            raise _Parsed
        return result

    def gin_parse_args(argv, description):
        inside_gin_cli.append(True)
        try:
            args, bindings = original_gin_parse_args(argv, description)
        finally:
            inside_gin_cli.pop()
        gin_cli.parse_gin(args.gin_file, bindings, gin_cli.search_paths(args))
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_args
    gin_cli.parse_args = gin_parse_args
    failures = []
    for module_name, where, args in commands:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001  (any import failure is the finding)
            failures.append([where, f"import {module_name}: {type(e).__name__}: {e}"])
            continue
        gin.clear_config()
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = module.main(list(args))
            failures.append([where, f"exit {code} before its flags parsed: {out.getvalue().strip()[-1500:]}"])
        except _Parsed:
            pass
        except SystemExit as e:
            failures.append([where, f"argparse: exit {e.code}: {out.getvalue().strip()[-1500:]}"])
        except Exception as e:  # noqa: BLE001
            failures.append([where, f"{type(e).__name__}: {e}"])
    return failures


def _parse_groups(groups: dict[str, list[tuple[str, str, list[str]]]]) -> list[list[str]]:
    """Imports what every gin entry point imports (t5lite.train: jax, TensorFlow, seqio) once, then parses
    each group in a forked child, so a group sees only the gin configurables its own module registers."""
    with contextlib.suppress(Exception):  # a failing import is reported by the children, per command
        importlib.import_module("t5lite.train")
    failures = []
    for group in sorted(groups):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: parse, report, exit without running the parent's cleanup
            os.close(read_end)
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(_parse_in_this_process(groups[group])))
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as report:
            text = report.read()
        _, status = os.waitpid(pid, 0)
        try:
            failures += json.loads(text)
        except ValueError:
            failures.append([f"({group})", f"the parse child died (wait status {status})"])
    return failures


if __name__ == "__main__" and sys.argv[1:] == ["--parse"]:
    print(json.dumps(_parse_groups(json.load(sys.stdin))))
