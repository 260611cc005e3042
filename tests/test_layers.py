"""The package's layers: imports run one way (down), and no module takes part in an import circle.

The import graph is read from the sources with `ast` (every import, those inside functions
included: a lazy import is still a dependency), so the test needs no import to run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Layers from the bottom up, by module name prefix; a module may import its own layer and
# those below.  The bundled digit model's formats sit with the families (they define the digit
# family), its training, quality and demo scripts with the applications on top.
LAYERS = [
    ("kernels", ["vllm_sjdpp.kernels"]),
    ("config", ["vllm_sjdpp.config", "vllm_sjdpp.machine", "vllm_sjdpp.provenance"]),
    ("families", ["vllm_sjdpp.families", "vllm_sjdpp.digits.vq", "vllm_sjdpp.digits.tokens", "vllm_sjdpp.digits.data"]),
    ("guidance", ["vllm_sjdpp.guidance"]),
    ("engine", ["vllm_sjdpp.engine"]),
    ("serving", ["vllm_sjdpp.serving"]),
    ("applications", ["vllm_sjdpp.digits", "vllm_sjdpp.bench"]),
    ("patches", ["vllm_sjdpp.patches", "vllm_sjdpp.plugin", "vllm_sjdpp.cpu_alias", "vllm_sjdpp"]),
]
# Prefixes that name one module only (the package's own __init__), not everything below it.
EXACT = {"vllm_sjdpp"}
# Pairs of layers the order would allow but that stay apart: the engine step knows no guidance
# (guided models are vLLM models like any other), serving knows no engine (it talks to vLLM).
APART = {("engine", "guidance"), ("serving", "engine"), ("applications", "engine")}


def modules() -> dict[str, Path]:
    """Module name -> source file, for the package and its kernels (installed from kernels/)."""
    found = {}
    for base, package in ((ROOT / "vllm_sjdpp", "vllm_sjdpp"), (ROOT / "kernels", "vllm_sjdpp.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (resolved to the longest known module)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # each name: a submodule where there is one, else an attribute of the module
            imported = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in imported:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def layer_of(module: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            below = module.startswith(prefix + ".") and prefix not in EXACT
            if (module == prefix or below) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{module} belongs to no layer: add it to LAYERS"
    return level


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or across a pair kept apart."""
    name = lambda m: LAYERS[layer_of(m)][0]  # noqa: E731
    return sorted(
        f"{a} ({name(a)}) imports {b} ({name(b)})"
        for a, targets in edges.items() for b in targets
        if layer_of(b) > layer_of(a) or (name(a), name(b)) in APART
    )


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer_and_imports_run_down():
    edges = graph()
    assert len(edges) > 30  # the whole package was read
    assert upward_imports(edges) == []


def test_no_import_circles():
    assert circles(graph()) == []


def test_the_checks_see_an_upward_import_and_a_circle():
    """Broken variants: a family importing the engine, the engine importing guidance, a new
    top-level module nobody placed, and two modules importing each other."""
    edges = graph()
    edges["vllm_sjdpp.families.base"] = edges["vllm_sjdpp.families.base"] | {"vllm_sjdpp.engine.sampler"}
    edges["vllm_sjdpp.engine.runtime"] = edges["vllm_sjdpp.engine.runtime"] | {"vllm_sjdpp.guidance.cfg"}
    assert upward_imports(edges) == [
        "vllm_sjdpp.engine.runtime (engine) imports vllm_sjdpp.guidance.cfg (guidance)",
        "vllm_sjdpp.families.base (families) imports vllm_sjdpp.engine.sampler (engine)",
    ]
    with pytest.raises(AssertionError, match="vllm_sjdpp.emu3 belongs to no layer"):
        layer_of("vllm_sjdpp.emu3")
    edges["vllm_sjdpp.config"] = edges["vllm_sjdpp.config"] | {"vllm_sjdpp.families.base"}
    edges["vllm_sjdpp.families.base"] = edges["vllm_sjdpp.families.base"] | {"vllm_sjdpp.config"}
    assert any({"vllm_sjdpp.config", "vllm_sjdpp.families.base"} <= set(c) for c in circles(edges))


@pytest.mark.parametrize("source, expected", [
    ("from .jacobi_state import JacobiStates", {"vllm_sjdpp.engine.jacobi_state"}),
    ("from ..families import family_of", {"vllm_sjdpp.families"}),
    ("from ..families.janus import JanusFamily", {"vllm_sjdpp.families.janus"}),
    ("import vllm_sjdpp.kernels.step", {"vllm_sjdpp.kernels.step"}),
    ("from vllm.config import VllmConfig", set()),
])
def test_relative_and_absolute_imports_resolve(tmp_path, source, expected):
    path = tmp_path / "sampler.py"
    path.write_text(source + "\n")
    known = {"vllm_sjdpp.engine.jacobi_state", "vllm_sjdpp.families", "vllm_sjdpp.families.janus",
             "vllm_sjdpp.kernels", "vllm_sjdpp.kernels.step", "vllm_sjdpp.engine.sampler"}
    assert imports_of("vllm_sjdpp.engine.sampler", path, known) == expected
