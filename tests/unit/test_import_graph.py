"""The package's imports go one way (DESIGN.md, principle 10).

Every module of ``sapo_megatron`` is parsed with ``ast``: module-level imports, imports inside functions and
``TYPE_CHECKING`` blocks (a type named from a higher layer is still knowledge of that layer), absolute and
relative, ``from pkg import submodule`` included. Importing ``a.b.c`` also runs ``a/__init__.py`` and
``a/b/__init__.py``, so those packages are edges too (except the importer's own packages, which Python has
already started). The graph must have no cycle, and every edge between two top-level parts must go down
``LAYERS``. A lazy import never hides a cycle from this test: it only defers a heavy optional dependency.
"""

from __future__ import annotations

import ast
import collections
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "sapo_megatron"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE

# A top-level part (a module or a subpackage of sapo_megatron) may import parts of a strictly lower rank, and
# itself; parts of one rank are siblings that know nothing of each other.
LAYERS: dict[str, int] = {
    # Plain data and utilities, no Megatron, no vLLM: the schema, torch.distributed helpers, the device rule,
    # the console.
    "config": 0,
    "collectives": 0,
    "device": 0,
    "console": 0,
    # Built only on those: pure-torch losses, advantages and input checks, data-parallel shares, the tiny test
    # model, prompt sources, starting processes (free ports, torchrun), which rollout servers and the CLI share.
    "algorithms": 1,
    "sharding": 1,
    "models": 1,
    "data": 1,
    "launch": 1,
    # The compact routing record that the actor, the rollout and the diagnostics all speak (checked with the
    # algorithms' input checks); rewards, which read the prompt sources' answers; the bridge, which maps
    # Megatron <-> HF names and layouts and moves weights, and knows nothing of the actor or the engines it serves.
    "routing_layout": 2,
    "rewards": 2,
    "bridge": 2,
    # The two sides of training: the Megatron actor (built through the bridge) and the vLLM rollout (fed by
    # the bridge's weight sync). Neither imports the other.
    "actor": 3,
    "rollout": 3,
    # Metrics over what the actor and the rollout produced.
    "diagnostics": 4,
    # Applications of everything below.
    "trainer": 5,
    "planner": 5,
    "convert": 5,
    "dashboard": 5,
    # The command line dispatches to the applications.
    "cli": 6,
}


def module_files() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


def _owning_module(name: str, modules) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (``a.b.func`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, dict[str, list[str]]]:
    """importer -> {imported module: ["file:line", ...]} over the package's own modules."""
    modules = module_files()
    graph: dict[str, dict[str, list[str]]] = {name: {} for name in modules}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own_package = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = own_package[: len(own_package) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub; `from mod import func` imports mod.
                targets = [f"{source}.{alias.name}" for alias in node.names]
                targets = [t if t in modules else source for t in targets]
            for target in targets:
                if target != PACKAGE and not target.startswith(PACKAGE + "."):
                    continue
                owner = _owning_module(target, modules)
                assert owner is not None, f"{path}:{node.lineno} imports {target}, which is not in the package"
                importer_packages = set(_ancestors(name)) | ({name} if is_package else set())
                for imported in [*_ancestors(owner), owner]:
                    if imported != name and imported not in importer_packages:
                        where = f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}"
                        graph[name].setdefault(imported, []).append(where)
    return graph


def find_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _one_cycle(graph, component: list[str]) -> list[str]:
    """A shortest closed path through the component's first module, for the failure message."""
    members = set(component)
    start = component[0]
    previous = {start: None}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node]):
            if succ not in members:
                continue
            if succ == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
            if succ not in previous:
                previous[succ] = node
                queue.append(succ)
    return component


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    # A module-level import, a function-level one, and the package __init__ implied by a submodule import.
    assert "sapo_megatron.config" in graph["sapo_megatron.cli"]
    assert "sapo_megatron.trainer" in graph["sapo_megatron.cli"]  # imported inside the `train` command
    assert "sapo_megatron.bridge" in graph["sapo_megatron.rollout.weight_transfer"]


def _cycle_report(graph) -> str:
    lines = []
    for component in find_cycles(graph):
        cycle = _one_cycle(graph, component)
        steps = [f"  {a} -> {b}  ({', '.join(graph[a][b])})" for a, b in zip(cycle, cycle[1:])]
        lines.append(f"cycle through {', '.join(component)}:\n" + "\n".join(steps))
    return "\n".join(lines)


def part_graph(graph) -> dict[str, dict[str, list[str]]]:
    """The module graph collapsed onto top-level parts (``actor``, ``bridge``, ...)."""
    parts: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)
    for importer, imported in graph.items():
        src = part_of(importer)
        parts[src]
        for target, where in imported.items():
            dst = part_of(target)
            if dst != src:
                parts[src].setdefault(dst, []).extend(where)
                parts[dst]
    return dict(parts)


def test_no_import_cycle_between_modules():
    report = _cycle_report(import_graph())
    assert not report, "import cycles between modules of sapo_megatron:\n" + report


def test_no_import_cycle_between_parts():
    # Two modules can avoid a cycle while their packages form one (bridge.qwen3_moe -> actor.cpu_compat while
    # actor.model -> bridge.qwen3_moe): the parts still cannot be understood, tested or layered one at a time.
    report = _cycle_report(part_graph(import_graph()))
    assert not report, "import cycles between the parts of sapo_megatron:\n" + report


def test_every_part_has_a_layer():
    parts = {part_of(module) for module in module_files()} - {""}
    assert parts == set(LAYERS), f"parts without a layer: {sorted(parts - set(LAYERS))}; stale: {sorted(set(LAYERS) - parts)}"


def test_package_init_imports_nothing():
    # Importing `sapo_megatron` (which every submodule import does) must stay free.
    assert import_graph()[PACKAGE] == {}


def test_private_modules_stay_in_their_package():
    # A `_name` module is its package's business: what another part needs is public (algorithms.inputs).
    private = []
    for importer, imported in sorted(import_graph().items()):
        for target, where in sorted(imported.items()):
            package, _, leaf = target.rpartition(".")
            if leaf.startswith("_") and not (importer == package or importer.startswith(package + ".")):
                private.append(f"  {importer} -> {target}  at {', '.join(where)}")
    assert not private, "private modules imported from outside their package:\n" + "\n".join(private)


def test_function_level_imports_of_the_package_say_why():
    # A lazy import only defers a heavy dependency (torch, megatron-core, vLLM, transformers): the comment on the
    # import (or just above its group) says which. Anything else belongs at the top of the module.
    silent = []
    for name, (path, _) in module_files().items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        import_lines: set[int] = set()
        lazy = []
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    import_lines.update(range(node.lineno, node.end_lineno + 1))
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if getattr(node, "level", 0) or (module or "").startswith(PACKAGE):
                        lazy.append(node)
        for node in lazy:
            said = any("#" in lines[i - 1] for i in range(node.lineno, node.end_lineno + 1))
            line = node.lineno - 1
            while not said and line >= 1:
                text = lines[line - 1].strip()
                if text.startswith("#"):
                    said = True
                elif not (text == "" or line in import_lines):
                    break
                line -= 1
            if not said:
                silent.append(f"  {path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not silent, "function-level imports of the package without a comment saying why:\n" + "\n".join(silent)


def test_light_entry_points_do_not_import_torch():
    # What the lazy imports above buy: `sapo-megatron plan|config|dashboard|--help` start without torch.
    code = (
        "import sys, sapo_megatron.cli, sapo_megatron.planner, sapo_megatron.dashboard, sapo_megatron.convert;"
        "print(sorted(m for m in ('torch', 'megatron', 'vllm', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_imports_go_down_the_layers():
    graph = import_graph()
    upward = []
    for importer, imported in sorted(graph.items()):
        src = part_of(importer)
        for target, where in sorted(imported.items()):
            dst = part_of(target)
            if not src or not dst or src == dst:
                continue
            if LAYERS[dst] >= LAYERS[src]:
                upward.append(f"  {importer} ({src}, {LAYERS[src]}) -> {target} ({dst}, {LAYERS[dst]})  at {', '.join(where)}")
    assert not upward, "imports that do not go down the layers:\n" + "\n".join(upward)
