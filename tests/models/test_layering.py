"""The one rule of the layout: the science layer imports no orchestration (docs/DESIGN.md)."""

import ast

from tests.helpers import REPOSITORY

FORBIDDEN = ("ray", "optuna", "mlflow", "msx.orchestrator")


def imported_modules(path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module)
    return modules


def test_models_imports_no_ray_optuna_mlflow_or_orchestrator():
    sources = sorted((REPOSITORY / "models").rglob("*.py"))
    assert len(sources) > 20
    offending = {
        f"{path.relative_to(REPOSITORY)}: {module}"
        for path in sources
        for module in imported_modules(path)
        if module.split(".")[0] in FORBIDDEN or module.startswith(FORBIDDEN)
    }
    assert not offending
