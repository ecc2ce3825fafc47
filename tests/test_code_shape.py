"""Code others can read: no function in the package longer than a screen."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "msr_train"
MAX_LINES = 60


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named steps: " + "; ".join(long)


def test_the_repository_points_nowhere_outside_itself():
    root = PACKAGE.parent
    files = [p for pattern in ("*.md", "*.py", "*.yaml", "*.toml")
             for p in root.rglob(pattern)
             if not {".venv", "outputs", ".git", "build"} & set(p.parts) and p != Path(__file__)]
    assert [str(p) for p in files if "../shared" in p.read_text()] == []
