"""Code others can read: no function in the package longer than a screen."""

import ast
import re
import subprocess
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


#: Words that tell how the project was made rather than what it is (its work log's units and
#: tracker numbers); provenance is a date, a commit and a command. Spelled in pieces so that
#: this file passes its own test; pytest's fixture scope is the one allowed use.
HISTORY_WORDS = re.compile("|".join([r"\bsess" r"ions?\b", r"\biss" r"ues? ?#?[0-9]+", r"(?<![&\w])#[0-9]{2}\b",
                                     r"\bround t" r"wo\b", r"\bst" r"op [0-9]+"]), re.IGNORECASE)
ALLOWED_HISTORY_WORDS = ('scope="sess' 'ion"',)


def tracked_text_files() -> list[Path]:
    root = PACKAGE.parent
    try:
        names = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
        paths = [root / n for n in names]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist)
        paths = [p for p in root.rglob("*") if p.is_file() and not {".venv", "outputs", ".git"} & set(p.parts)]
    texts = []
    for path in paths:
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # images, deleted files
        texts.append(path)
    return texts


def test_no_file_speaks_of_how_the_project_was_made():
    found = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for allowed in ALLOWED_HISTORY_WORDS:
                line = line.replace(allowed, "")
            if match := HISTORY_WORDS.search(line):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {match.group(0)!r}")
    assert not found, "say the date, the commit or the command instead: " + "; ".join(found[:20]) + \
        (f" (and {len(found) - 20} more)" if len(found) > 20 else "")


def package_imports() -> dict[str, set[str]]:
    """msr_train's modules -> the msr_train modules each imports, imports inside
    functions included (``from . import x`` counts as the module x where it is one)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [node.module or ""])
                deps |= {base.rstrip(".")} | {f"{base.rstrip('.')}.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("msr_train"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("msr_train")}
        graph[module] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_circle_in_the_package():
    graph, circles = package_imports(), []

    def visit(module, path):
        for dep in graph[module]:
            if dep in path:
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in done:
                done.add(dep)
                visit(dep, path + [dep])
    for start in graph:
        done = {start}
        visit(start, [start])
    # A package imports its own modules (methods/__init__ registers every method): not a circle.
    circles = [c for c in circles if not all(m.startswith(c.split(" -> ")[0] + ".") or m == c.split(" -> ")[0]
                                             for m in c.split(" -> "))]
    assert not circles, circles


def test_msr_compare_does_not_load_torch():
    import subprocess
    import sys
    code = "import sys, msr_train.compare; assert 'torch' not in sys.modules, 'torch'; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "ok", res.stderr
