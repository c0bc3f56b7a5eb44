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


def test_only_the_kernel_backend_imports_the_cuda_driver_and_nothing_imports_triton() -> None:
    """The device kernels ship built: one edge loads them, and no module compiles one at run time."""
    for module, imports in MODULES.items():
        if any(i == "cuda" or i.startswith("cuda.") for i in imports):
            assert module == "mx_orchestrator._backends.cuda_kernels", module
        assert not any(i == "triton" or i.startswith("triton.") for i in imports), module


def test_the_shipped_kernels_were_built_from_the_source_beside_them() -> None:
    """``scripts/build_kernels`` records the source's SHA-256: editing digests.cu without a rebuild
    fails here, not on a user's GPU."""
    import hashlib
    import json

    kernels = PACKAGE / "_kernels"
    listing = json.loads((kernels / "digests.json").read_text())
    assert listing["source_sha256"] == hashlib.sha256((kernels / "digests.cu").read_bytes()).hexdigest()
    assert "sm_90" in listing["files"] and any(a.startswith("compute_") for a in listing["files"])
    for name in listing["files"].values():
        assert (kernels / name).stat().st_size > 10_000, name


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


#: the modules a load runs through, each with one job (see ../shared/DESIGN.md)
LOAD_PATH = (
    "mx_orchestrator.pipeline",
    "mx_orchestrator.load",
    "mx_orchestrator.partreads",
    "mx_orchestrator.landing",
    "mx_orchestrator.holdings",
    "mx_orchestrator.evaluation",
    "mx_orchestrator.sourcing",
    "mx_orchestrator.settings",
    "mx_orchestrator.plan",
    "mx_orchestrator.parts",
    "mx_orchestrator.policy",
    "mx_orchestrator.outcomes",
    "mx_orchestrator.pullplan",
    "mx_orchestrator.peer",
    "mx_orchestrator.target",
    "mx_orchestrator._backends.pool",
)
#: "no module on the load path over ~400 lines"
MAX_LOAD_PATH_LINES = 450  # the driver: 415 lines of code and docs, a 35-line theory of operation


def _source(module: str) -> str:
    relative = Path(*module.split(".")).with_suffix(".py")
    return (PACKAGE.parent / relative).read_text()


def test_there_is_one_load_driver_and_one_attempt_loop() -> None:
    """Only the driver makes a plan and asks it for steps; there is no second driver module."""
    makers, steppers = set(), set()
    for path in PACKAGE.rglob("*.py"):
        if "testing" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = (
                    node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                )
                made_by = getattr(getattr(node.func, "value", None), "id", "")
                if name == "Planner" or (name == "of" and made_by == "Planner"):
                    makers.add(_module_name(path))
                if name == "next_step":
                    steppers.add(_module_name(path))
    assert makers == {"mx_orchestrator.load"} and steppers == {"mx_orchestrator.load"}
    assert "mx_orchestrator.striping" not in MODULES


def test_no_module_on_the_load_path_is_over_about_400_lines() -> None:
    lengths = {m: len(_source(m).splitlines()) for m in LOAD_PATH}
    assert all(n <= MAX_LOAD_PATH_LINES for n in lengths.values()), lengths


def test_the_driver_s_parts_never_import_the_driver() -> None:
    drivers = {"mx_orchestrator.load", "mx_orchestrator.pipeline"}
    for module in LOAD_PATH:
        if module in drivers:
            continue
        assert not MODULES[module] & drivers, module


def test_strategies_are_told_apart_by_protocol_not_by_class() -> None:
    """The driver asks whether a strategy reads parts (``PartCapable``), never which class it is."""
    tree = ast.parse(_source("mx_orchestrator.load"))
    checked = {
        node.args[1].id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", "") == "isinstance"
        and isinstance(node.args[1], ast.Name)
    }
    assert "PeerStrategy" not in checked and "PartCapable" in checked
