"""The package's layers depend one way: the model never reaches into the training callbacks, and the
data code never into the model (the tokenizer and the bad-sample protocol are shared utilities)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aclip"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (absolute names)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import; the package imports by absolute name"
            imported.add(node.module or "")
    return imported


@pytest.mark.parametrize(
    ("layer", "forbidden"), [("modules", "aclip.callbacks"), ("datamodules", "aclip.modules")]
)
def test_a_layer_does_not_import_the_one_above_it(layer, forbidden):
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files, f"aclip/{layer} holds no modules"
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            name for name in imported_modules(path) if name == forbidden or name.startswith(f"{forbidden}.")
        )
        for path in files
    }
    assert not {path: names for path, names in offenders.items() if names}
