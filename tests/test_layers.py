"""The package's import graph runs one way: from the model up to the algorithms and the toy world.

Every import of a nanoalign module counts, function-level ones included (ast.walk sees them all), so a cycle
cannot hide behind a lazy import. Layers, lowest first; a module may import its own layer or lower ones, never a
higher one, and no two modules may import each other through any path. `__main__` modules are command-line entry
points and may import anything below them.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanoalign"
LAYERS = [
    {"model", "tokenizer", "chat", "logps", "lora", "checkpoint", "config", "plot", "precision", "fsdp"},  # nothing above
    {"hf", "hf.config", "hf.weights", "hf.tokenizer", "hf.peft", "hf.gguf"},   # Hugging Face formats
    {"loading"},                                                               # spec -> model, the one place
    {"data", "rollout", "reference", "scorers", "judge", "rundir", "report"},           # data and what the loop feeds on
    {"trainer"},                                                               # THE loop
    {"algos"},                                                                 # algos/*: one file per algorithm
    {"toy", "oaif"},                                                           # toy/*, recipes on real models
]


def module_name(path):
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name):
    for i, layer in enumerate(LAYERS):
        if name in layer or name.split(".")[0] in layer and name.split(".")[0] in ("algos", "toy"):
            return i
    return None


def imports(path, modules):
    """The nanoalign modules that `path` imports anywhere in its body (package-relative names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "nanoalign":
                continue
            name = target.removeprefix("nanoalign").removeprefix(".")
            while name and name not in modules:  # `from nanoalign.hf.weights import load_hf_model` -> hf.weights
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    files.pop("", None)  # nanoalign/__init__.py
    return {m: imports(p, files) - {m} for m, p in files.items()}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if layer_of(m) is None and not m.endswith("__main__"))
    assert not unplaced, f"modules without a layer in tests/test_layers.py: {unplaced}"


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in graph.items() if not m.endswith("__main__")
              for t in targets if None not in (layer_of(t), layer_of(m)) and layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state = {}  # module -> "active" while on the DFS stack, "done" after

    def visit(m, path):
        state[m] = "active"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "active":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_function_level_imports(tmp_path):
    """A lazy import inside a function is an edge too (the old cycles hid behind ten of them)."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from nanoalign.loading import load_model\n    import nanoalign.model\n")
    assert imports(source, {"loading", "model"}) == {"loading", "model"}
