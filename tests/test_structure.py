"""The package's shape, pinned: I/O edges own their imports, no import circles, the loopback hub's pure parts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mx_orchestrator.testing.hub import Reply, parse_range

PACKAGE = Path(__file__).resolve().parent.parent / "mx_orchestrator"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth of the file), absolute names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_only_the_nixl_backend_imports_nixl_and_only_the_hub_backend_imports_huggingface_hub() -> None:
    for module, imports in MODULES.items():
        if any(i == "nixl" or i.startswith("nixl.") for i in imports):
            assert module == "mx_orchestrator._backends.nixl", module
        if any(i == "huggingface_hub" or i.startswith("huggingface_hub.") for i in imports):
            assert module == "mx_orchestrator._backends.hub", module


def test_the_core_never_imports_the_strategies_package() -> None:
    for module, imports in MODULES.items():
        assert not any(i == "strategies" or i.startswith("strategies.") for i in imports), module


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = {m: {i for i in imports if i in MODULES and i != m} for m, imports in MODULES.items()}
    # a package's __init__ re-exporting its submodules is not a circle of ideas: skip parent->child edges
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not t.startswith(module + ".")}

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            current = stack.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                stack.extend(graph.get(current, ()))
        return False

    circles = sorted((a, b) for a, targets in graph.items() for b in targets if reaches(b, a))
    assert circles == []


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 10)),
        ("bytes=5-", (5, 100)),
        ("bytes=-10", (90, 100)),
        ("bytes=90-200", (90, 100)),
        ("bytes=0-0", (0, 1)),
        ("items=0-9", None),
        ("bytes=0-1,5-6", None),
        ("bytes=abc", None),
        ("bytes=-", None),
    ],
)
def test_range_headers_are_parsed_as_rfc_9110_says(header: str | None, expected: object) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-200", "bytes=9-5"])
def test_unsatisfiable_ranges_are_416(header: str) -> None:
    reply = parse_range(header, 100)
    assert (
        isinstance(reply, Reply) and reply.status == 416 and reply.headers["Content-Range"] == "bytes */100"
    )
