"""Import boundaries between keyart's packages (docs/architecture.md, "Packages").

Every import statement counts, including those inside functions: a lazy import of an outer
package from the core is still a dependency of the core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# folder -> (import name, what it must never import)
OUTER = ("keyart.jobs", "keyart.models", "keyart.serving", "keyart.bench", "keyart.demo")
# The core may name pyspark lazily (contracts.Contract.spark_schema) and the simulator drives
# the endpoint with httpx; neither is imported when the core is.
RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "keyart": ("keyart", (*OUTER, "lightgbm", "onnxmltools", "airflow", "fastapi", "uvicorn")),
    "jobs": ("keyart.jobs", ("keyart.models", "keyart.serving", "keyart.bench", "keyart.demo",
                             "lightgbm", "onnxruntime", "mlflow", "airflow")),
    "models": ("keyart.models", ("keyart.jobs", "keyart.serving", "keyart.bench", "keyart.demo", "pyspark", "airflow")),
    "serving": ("keyart.serving", ("keyart.jobs", "keyart.models", "keyart.bench", "keyart.demo",
                                   "lightgbm", "pyspark", "onnxmltools", "airflow")),
    "dags": ("dags", ("keyart.jobs", "keyart.models", "keyart.serving", "keyart.bench", "keyart.demo",
                      "pyspark", "lightgbm", "mlflow", "onnxruntime")),
}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an import statement in ``source`` names (relative imports resolved
    against ``package``), plus ``pkg.name`` for ``from pkg import name``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(source: str, package: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(source, package)
                  if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_the_checker_sees_lazy_relative_and_from_imports():
    src = "def f():\n    from keyart import serving\n    import pyspark.sql\nfrom ..models import train\n"
    assert violations(src, "keyart.sim", ("keyart.serving", "keyart.models", "pyspark")) == [
        "keyart.models", "keyart.models.train", "keyart.serving", "pyspark.sql"]
    assert violations("from keyart import config, lake\n", "keyart", OUTER) == []


@pytest.mark.parametrize("folder", sorted(RULES))
def test_package_imports_stay_inside_its_boundary(folder):
    package, forbidden = RULES[folder]
    bad: dict[str, list[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        rel = path.relative_to(REPO / folder).with_suffix("")
        module = ".".join((package, *rel.parts)).removesuffix(".__init__")
        hits = violations(path.read_text(), module, forbidden)
        if hits:
            bad[str(path.relative_to(REPO))] = hits
    assert bad == {}, f"{folder}/ imports across its boundary: {bad}"


def test_every_folder_of_the_distribution_is_checked_or_outer():
    import tomllib

    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(mapping.values()) <= set(RULES) | {"bench", "demo"}
