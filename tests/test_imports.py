"""The import graph: dependencies run one way and nothing imports itself in a circle.

recipes (``training/``) -> training machinery (``keras_alexnet.training``) -> model API
and data (the rest of ``keras_alexnet``); the server (``serving/``) imports nothing of
the library. Every import statement counts, including those inside functions.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("keras_alexnet", "training", "serving")


def _modules():
    """``{dotted module name: path}`` of every Python file of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name, path, modules):
    """The project modules that module ``name`` imports, anywhere in its body."""
    targets = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from a import b` imports the module a.b when there is one, else a.
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                          for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:  # `import a.b.c` of a package
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(name):
    if name.startswith("serving"):
        return "server"
    if name == "training" or name.startswith("training."):
        return "recipes"
    if name.startswith("keras_alexnet.training"):
        return "machinery"
    return "model"


ALLOWED = {
    "recipes": {"recipes", "machinery", "model"},
    "machinery": {"machinery", "model"},
    "model": {"model"},
    "server": {"server"},
}


def test_the_graph_is_found():
    graph = _graph()
    # Known edges, so that a broken scanner cannot pass the tests below by finding nothing.
    assert "keras_alexnet.training.loop" in graph["training.train"]
    assert "keras_alexnet.training.run_dir" in graph["keras_alexnet.training.loop"]
    assert "keras_alexnet.files" in graph["keras_alexnet.export"]
    assert "keras_alexnet.training.mean_image" in graph["keras_alexnet.training.loop"]  # lazy


def test_dependencies_run_one_way():
    wrong = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                   if _layer(b) not in ALLOWED[_layer(a)])
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_there_are_no_import_cycles():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_package_and_the_recipes_config_load_without_tensorflow():
    """`keras_alexnet` loads its public names on first use, so the recipes refuse a bad
    flag before TensorFlow starts (seconds, and its log lines, on every typo)."""
    import subprocess
    import sys

    script = ("import sys, keras_alexnet, keras_alexnet.paper, keras_alexnet.training.config\n"
              "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
              "keras_alexnet.AlexNet\n"
              "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True).stdout.splitlines()
    assert out == ["[]", "['keras', 'tensorflow']"]
    refuse = ("import sys\nfrom training import train\ntry:\n"
              "    train.main(['--no-such-flag'])\nexcept SystemExit as e:\n"
              "    print(e.code, 'tensorflow' in sys.modules)\n")
    refused = subprocess.run([sys.executable, "-c", refuse], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
    assert refused.stdout.split() == ["2", "False"], refused.stderr
    assert "unrecognized arguments: --no-such-flag" in refused.stderr
