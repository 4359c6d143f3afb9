"""The package's layers depend one way (DESIGN.md section 3, README "What is here"): every module imports
only from its own layer or the ones below it, lazily or not, and no import circle remains.

The layers, from the top: entry points, tasks, training glue, data and evaluation, model parts, utilities.
`LAYERS` places every module: a folder whose modules share a layer is one entry, a module of its own
overrides its folder's (`aclip.modules.aclip`, the LightningModule, is training glue among the model
parts). An import is an arrow from the importing file to the module it names (a `from package import
name` names the submodule where `name` is one); the packages above that module run first, but are not
arrows of the importer's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ENTRY_POINTS, TASKS, TRAINING, DATA_AND_EVALUATION, MODEL_PARTS, UTILITIES = range(1, 7)
LAYER_NAMES = {
    ENTRY_POINTS: "entry points",
    TASKS: "tasks",
    TRAINING: "training glue",
    DATA_AND_EVALUATION: "data and evaluation",
    MODEL_PARTS: "model parts",
    UTILITIES: "utilities",
}

LAYERS = {
    "train": ENTRY_POINTS,
    "evaluate": ENTRY_POINTS,
    "aclip.cli": ENTRY_POINTS,
    "aclip": TASKS,  # the package: `aclip.load`
    "aclip.api": TASKS,
    "aclip.tasks": TASKS,
    "aclip.trained": TASKS,
    "aclip.export": TASKS,
    "aclip.config": TASKS,
    "aclip.renamed": TASKS,
    "aclip.recompose": TASKS,
    "aclip.compute": TASKS,
    "aclip.summary": TASKS,
    "aclip.modules.aclip": TRAINING,
    "aclip.callbacks": TRAINING,
    "aclip.loggers": TRAINING,
    "aclip.datamodules": DATA_AND_EVALUATION,
    "aclip.evaluation": DATA_AND_EVALUATION,
    "aclip.modules": MODEL_PARTS,
    "aclip.initialize": MODEL_PARTS,
    "aclip.specs": UTILITIES,
    "aclip.tokenizer": UTILITIES,
    "aclip.checkpointing": UTILITIES,
    "aclip.open_clip_format": UTILITIES,
    "aclip.flop_counter": UTILITIES,
    "aclip.distributed": UTILITIES,
    "aclip.console": UTILITIES,
    "aclip.errors": UTILITIES,
    "aclip.resolvers": UTILITIES,
}


def module_files() -> dict[str, Path]:
    """Every module of the package, and the two entry scripts, by module name (a package by its own)."""
    files = {"train": ROOT / "train.py", "evaluate": ROOT / "evaluate.py"}
    for path in sorted((ROOT / "aclip").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()


def layer_of(module: str) -> int | None:
    """The layer of `module`'s entry in `LAYERS`, else its folder's (None: neither has one; the entry
    `aclip` is the package's own `__init__`, not a folder's)."""
    while module not in LAYERS and module.count(".") > 1:
        module = module.rpartition(".")[0]
    return LAYERS.get(module)


def imported_modules(path: Path) -> set[str]:
    """The package's modules `path` imports, at the top or inside a function (absolute names)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import; the package imports by absolute name"
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `from aclip.evaluation import Evaluation`: the package
                name = name.rpartition(".")[0]
            if name:
                imported.add(name)
    return imported


IMPORTS = {module: imported_modules(path) - {module} for module, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert not sorted(module for module in MODULES if layer_of(module) is None)


def test_every_entry_names_a_module_or_folder():
    assert not sorted(name for name in LAYERS if name not in MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_no_layer_above_its_own(module):
    layer = layer_of(module)
    upward = sorted(
        f"{name} ({LAYER_NAMES[layer_of(name)]})"
        for name in IMPORTS[module]
        if layer is not None and layer_of(name) is not None and layer_of(name) < layer
    )
    assert not upward, f"{module} ({LAYER_NAMES[layer]}) imports a layer above its own: {upward}"


def test_no_import_circle():
    """No module reaches itself through imports, lazy ones included (Tarjan's strongly connected
    components of the import graph: every component is one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for name in sorted(IMPORTS[module]):
            if name not in index:
                visit(name)
                low[module] = min(low[module], low[name])
            elif name in stack:
                low[module] = min(low[module], index[name])
        if low[module] == index[module]:
            component = [stack.pop()]
            while component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize(
    ("layer", "forbidden"), [("modules", "aclip.callbacks"), ("datamodules", "aclip.modules")]
)
def test_a_layer_does_not_import_the_one_above_it(layer, forbidden):
    """Beyond the order: the LightningModule (a model part's neighbour) drives no callback, and the data
    code needs no model part (the tokenizer and the bad-sample protocol are shared utilities)."""
    files = sorted((ROOT / "aclip" / layer).rglob("*.py"))
    assert files, f"aclip/{layer} holds no modules"
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            name for name in imported_modules(path) if name == forbidden or name.startswith(f"{forbidden}.")
        )
        for path in files
    }
    assert not {path: names for path, names in offenders.items() if names}
