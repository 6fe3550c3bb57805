"""The layout page and the package structure: docs/layout.md is what the code says, and the layers import only
downwards (no cycles, no module importing a script)."""

import ast
import glob
import os

from fixtures.layout import ROOT, first_sentence, render

SCRIPTS = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}


def test_layout_page_lists_every_module_with_its_docstring():
    with open(os.path.join(ROOT, "docs", "layout.md")) as f:
        page = f.read()
    assert page == render(), "docs/layout.md is stale: run `python -m fixtures.layout > docs/layout.md`"
    for path in glob.glob(os.path.join(ROOT, "utils", "*", "*.py")):
        if not path.endswith("__init__.py"):
            assert f"`{os.path.relpath(path, ROOT)}`" in page


def test_first_sentence_keeps_abbreviations_inside():
    assert first_sentence("DeMe (Ma et al. 2025): one.\nTwo.") == "DeMe (Ma et al. 2025): one."
    assert first_sentence("No period at all") == "No period at all"


def imports_of(path):
    """The project modules a file imports, as dotted names relative to the repository root."""
    with open(path) as f:
        tree = ast.parse(f.read())
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                found |= {module} | {f"{module}.{a.name}" for a in node.names}
            elif node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_utils_imports_no_script_and_has_no_cycles():
    graph = {}
    for path in glob.glob(os.path.join(ROOT, "utils", "**", "*.py"), recursive=True):
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        deps = imports_of(path)
        assert not deps & SCRIPTS, f"{name} imports a script: {deps & SCRIPTS}"
        graph[name] = {d for d in deps if d.startswith("utils.") and d != name}
    modules = set(graph)
    graph = {m: {d if d in modules else d.rsplit(".", 1)[0] for d in deps} & modules for m, deps in graph.items()}

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        for dep in graph[node]:
            visit(dep, [*stack, node])

    for module in modules:
        visit(module, [])
    # the methods never reach into a model family: a script hands one in
    assert not any(d.startswith("utils.families") for m, deps in graph.items() if m.startswith("utils.methods")
                   for d in deps)
