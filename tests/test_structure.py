"""The package's shape: imports flow one way through the layers below, with no cycle, and the few imports of
project modules inside functions each say why; and ruff, the lint gate, finds nothing.

Read from mymoe/ and data_tools/ with ast (nothing is imported). `from package import name` counts as an
import of the submodule when `name` is one, else of the package. Imports under `if TYPE_CHECKING:` count
too: a layer is a layer for the type checker as well.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mymoe", "data_tools")

# Lowest first. A module may import modules of its own layer or of a lower one. A module is placed by the
# longest entry that is it or a package above it.
LAYERS = [
    ["mymoe", "mymoe.config", "mymoe.tokenizer"],  # typed settings, no project imports
    ["mymoe.model", "mymoe.data"],  # plain PyTorch on one process; the .bin/.idx reader
    # whole-model tools: adapters, dense -> MoE, AdamW groups, a gated ensemble of whole models
    ["mymoe.peft", "mymoe.upcycle", "mymoe.optim", "mymoe.ensemble"],
    ["mymoe.parallel"],  # ranks, groups, dispatchers over torch.distributed, gradient reduction
    ["mymoe.checkpoint"],  # storage: sharded tensors, manifests, checksums; builds no model
    ["mymoe.convert"],  # formats: consolidated file, resharding, Hugging Face, Megatron names
    ["mymoe.load"],  # any source -> a whole model; what every command loads through
    [
        "mymoe.train",
        "mymoe.evaluate",
        "mymoe.generate",
        "mymoe.inference",
        "mymoe.convert.cli",
        "mymoe.convert.commands",
        "mymoe.convert.__main__",
        "mymoe.plan",
        "mymoe.planner",
        "mymoe.verify",
        "mymoe.equivalence",  # the commands
        "mymoe.ensemble.folder",
        "mymoe.ensemble.training",
        "mymoe.ensemble.evaluation",
        "mymoe.ensemble.cli",
        "mymoe.ensemble.commands",
        "mymoe.ensemble.__main__",
        "data_tools",
    ],
    ["data_tools.cli", "data_tools.__main__"],  # data_tools' command line over its commands
]
MAX_FUNCTION_LEVEL_IMPORTS = 9


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def imported_modules(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project modules one import statement loads (none for third-party ones)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = package_of(module).split(".")
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return sorted({name for name in names if name.split(".")[0] in PACKAGES})


def imports(module: str) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, the source lines that may hold its reason)."""
    source = MODULES[module].read_text()
    lines = source.splitlines()
    found = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                reason = "\n".join(lines[max(child.lineno - 2, 0) : child.end_lineno])
                found.extend((name, child.lineno, inside, reason) for name in imported_modules(module, child))
            walk(child, inside)

    walk(ast.parse(source), False)
    return found


def layer_of(module: str) -> int:
    best, layer = "", None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, layer = name, index
    assert layer is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return layer


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_reaches_up_a_layer():
    upward = []
    for module in MODULES:
        for target, line, _, _ in imports(module):
            if layer_of(target) > layer_of(module):
                upward.append(
                    f"{MODULES[module].relative_to(REPO)}:{line}: {module} (layer {layer_of(module)}) "
                    f"imports {target} (layer {layer_of(target)})"
                )
    assert not upward, "imports from a lower layer to a higher one:\n  " + "\n  ".join(upward)


def test_no_import_cycle():
    graph = {module: sorted({target for target, _, _, _ in imports(module) if target != module}) for module in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_few_function_level_imports_each_with_its_reason():
    late = [
        (module, target, line, reason)
        for module in MODULES
        for target, line, inside, reason in imports(module)
        if inside
    ]
    listing = "\n  ".join(f"{MODULES[m].relative_to(REPO)}:{line} imports {t}" for m, t, line, _ in late)
    assert len(late) <= MAX_FUNCTION_LEVEL_IMPORTS, (
        f"{len(late)} imports of project modules inside functions (at most {MAX_FUNCTION_LEVEL_IMPORTS}); "
        f"move them to the top of their module:\n  {listing}"
    )
    unexplained = [f"{MODULES[m].relative_to(REPO)}:{line}" for m, _, line, reason in late if "#" not in reason]
    assert not unexplained, (
        "a function-level import needs its reason in a comment on its line or the one above: " + ", ".join(unexplained)
    )


def test_the_walker_sees_cycles_and_layers():
    """The checks above would catch what they are for (guards against a walker that finds nothing)."""
    assert "mymoe.load" in {target for target, _, _, _ in imports("mymoe.train.loop")}
    assert layer_of("mymoe.convert.cli") > layer_of("mymoe.load") > layer_of("mymoe.convert.hf")
    assert layer_of("mymoe.checkpoint.manager") < layer_of("mymoe.convert.state")


def test_ruff_finds_nothing():
    """The lint gate of CI: `ruff check .` with pyproject.toml's rules (ruff comes with the test extra)."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e .[test])")
    done = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
