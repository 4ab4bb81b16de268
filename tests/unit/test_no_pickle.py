"""No code of eddy's can unpickle: no pickle-family import, no torch.load, no PICKLED_BYTE_ARRAY state, no
weights_only=False or allow_pickle=True. Read from the syntax tree, so comments and docs may name them."""

from __future__ import annotations

import ast

from deploy.settings import REPO_ROOT

PACKAGES = ("streams", "features", "models", "lakehouse", "deploy", "pipelines")
MODULES = frozenset({"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"})
CALLS = frozenset({("torch", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"), ("np", "load"),
                   ("numpy", "load")})
NAMES = frozenset({"PICKLED_BYTE_ARRAY", "read_pickle"})
KEYWORDS = {("weights_only", False), ("allow_pickle", True)}


def unpickling(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each way `tree` could unpickle."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in MODULES:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Attribute):
            if node.attr in NAMES:
                found.append((node.lineno, node.attr))
            elif isinstance(node.value, ast.Name) and (node.value.id, node.attr) in CALLS:
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
        elif isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant):
            if (node.arg, node.value.value) in KEYWORDS:
                found.append((node.lineno, f"{node.arg}={node.value.value}"))
    return found


def test_the_check_finds_each_way_in():
    source = "\n".join(["import pickle", "from cloudpickle import loads", "torch.load(f)",
                        "Types.PICKLED_BYTE_ARRAY()", "torch.load(f, weights_only=False)", "np.load(f, allow_pickle=True)",
                        "# torch.load in a comment is fine", "x = 'pickle'"])
    assert [what for _, what in unpickling(ast.parse(source))] == [
        "import pickle", "from cloudpickle import ...", "torch.load", "PICKLED_BYTE_ARRAY", "torch.load",
        "weights_only=False", "np.load", "allow_pickle=True"]


def test_no_product_code_unpickles():
    files = [p for package in PACKAGES for p in sorted((REPO_ROOT / package).rglob("*.py"))]
    assert len(files) > 50
    found = [f"{path.relative_to(REPO_ROOT)}:{line}: {what}"
             for path in files for line, what in unpickling(ast.parse(path.read_text(), str(path)))]
    assert found == []
