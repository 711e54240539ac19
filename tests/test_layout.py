"""The package's shape: imports run one way, with no cycle, and every module says its job.

    cli -> {pipeline, profile} -> {fusions, quantize, verify, io} -> passes

(``errors`` is read by every layer; the package's ``__init__`` only names the public API, lazily.)
Imports are read from the source (inside functions too), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flashnorm_onnx"

#: Each top-level part of the package and the parts it may import.
LAYERS = {
    "passes": set(),
    "io": {"passes"},
    "verify": {"passes"},
    "fusions": {"passes"},
    "quantize": {"passes"},
    "pipeline": {"passes", "io", "verify", "fusions", "quantize"},
    "profile": {"verify", "io", "passes"},
    "cli": {"pipeline", "profile", "io", "quantize"},
}
SHARED = {"errors", "memory", ""}  # the error types, available memory, the package root (its __version__)


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (a ``from P import name`` of a submodule counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("flashnorm_onnx")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flashnorm_onnx"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def part(module: str) -> str:
    rest = module.split(".")[1:]
    return rest[0] if rest else ""


def test_no_import_cycles():
    g = graph()
    # the package root names the API lazily (PEP 562): it is no layer, and importing it loads nothing
    g = {m: {d for d in deps if d != "flashnorm_onnx"} for m, deps in g.items() if m != "flashnorm_onnx"}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_imports_run_one_way():
    wrong = []
    for module, deps in graph().items():
        here = part(module)
        if here in SHARED or here not in LAYERS and here not in ("__main__",):
            continue
        allowed = LAYERS.get(here, set(LAYERS)) | {here} | SHARED
        wrong += [f"{module} -> {d}" for d in deps if part(d) not in allowed and d != "flashnorm_onnx"]
    assert not wrong, wrong


def test_the_passes_import_only_onnx_ir_and_numpy():
    outside = []
    for name, path in modules().items():
        if part(name) != "passes":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for n in names:
                top = n.split(".")[0]
                if top not in ("onnx_ir", "numpy", "ml_dtypes", "flashnorm_onnx", "__future__") and not _stdlib(top):
                    outside.append(f"{name}: {n}")
                if top == "flashnorm_onnx" and not (n.startswith("flashnorm_onnx.passes") or n == "flashnorm_onnx"):
                    outside.append(f"{name}: {n}")
    assert not outside, outside


def _stdlib(name: str) -> bool:
    import sys

    return name in sys.stdlib_module_names


def test_every_module_states_its_job_in_its_first_line():
    missing = [name for name, path in modules().items()
               if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()]
    assert not missing, missing
