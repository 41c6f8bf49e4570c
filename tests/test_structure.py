"""The codebase's shape: no import cycles, entry points import no entry point, an import-light core.

Read statically from the source (every `import`, function-level ones included), so a new cycle or
a new heavy import fails here before anyone notices it at run time.
"""

import ast
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "t5lite")

# Importable on a machine with jax alone (a step benchmark on a GPU / TPU VM): no TensorFlow, no seqio.
CORE = ("t5lite.model.models", "t5lite.model.decoding", "t5lite.trainer", "t5lite.partitioning", "t5lite.optim",
        "t5lite.peft", "t5lite.adaptation", "t5lite.checkpoints", "t5lite.run_config")
# The corpus tools start without TensorFlow, seqio or jax.
CORPUS_TOOLS = ("t5lite.data.dedup", "t5lite.data.cleaning")


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, name)
    return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """t5lite modules that the file imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("t5lite"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n in modules} or {node.module}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _entry_points() -> set[str]:
    """Modules run as `python -m ...`: they define main() and a __main__ block."""
    out = set()
    for name, path in _modules().items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        runs = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        if has_main and runs:
            out.add(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_reader_sees_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_entry_points_import_no_entry_point():
    entries = _entry_points()
    assert {"t5lite.train", "t5lite.eval", "t5lite.infer", "t5lite.precompile", "t5lite.finetune"} <= entries
    graph = _graph()
    assert {e: sorted(graph[e] & entries) for e in entries if graph[e] & entries} == {}


def test_model_and_data_import_nothing_of_training():
    training = {"t5lite.train", "t5lite.trainer", "t5lite.optim", "t5lite.checkpoints", "t5lite.evaluation",
                "t5lite.adaptation", "t5lite.partitioning"}
    graph = _graph()
    upward = {m: sorted(graph[m] & training) for m in graph
              if m.startswith(("t5lite.model", "t5lite.data")) and graph[m] & training}
    assert upward == {}


def _loaded_after_import(modules) -> dict[str, bool]:
    code = (f"import sys, json\nfor m in {list(modules)!r}: __import__(m)\n"
            "print(json.dumps({k: k in sys.modules for k in ('tensorflow', 'seqio', 'jax')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_core_imports_neither_tensorflow_nor_seqio():
    loaded = _loaded_after_import(CORE)
    assert loaded == {"tensorflow": False, "seqio": False, "jax": True}


@pytest.mark.slow
def test_the_corpus_tools_import_neither_tensorflow_nor_jax():
    assert _loaded_after_import(CORPUS_TOOLS) == {"tensorflow": False, "seqio": False, "jax": False}
