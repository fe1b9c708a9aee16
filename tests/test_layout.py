"""The package layout the README's code map describes, checked on the source: parts never import a
stage, stages never import each other (`all` runs them, so it may), and no function is longer than
MAX_FUNCTION_LINES."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    return {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _imports(tree: ast.Module) -> set[str]:
    """Every module an import statement names, anywhere in the file (lazy imports included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_stage(name: str) -> bool:
    return name.startswith("pipeline.stages.")


def test_parts_never_import_stages_and_stages_never_each_other():
    offences = []
    for module, tree in _modules().items():
        for imported in _imports(tree):
            if not _is_stage(imported) or module in ("pipeline.stages.all", "pipeline.__main__"):
                continue
            if imported != module:
                offences.append(f"{module} imports {imported}")
    assert not offences, "\n".join(offences)


def test_the_check_sees_imports():
    tree = ast.parse("def f():\n    from pipeline.stages.train import run\n")
    assert "pipeline.stages.train" in _imports(tree) and _is_stage("pipeline.stages.train.run")


def test_no_function_is_longer_than_the_limit():
    long = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert not long, "\n".join(long)
