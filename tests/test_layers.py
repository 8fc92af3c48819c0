"""The layering is enforced: import-linter's contracts (run by ``make lint``) break on a
wrong-way import, and they cover every module of ``gateway`` outside ``gateway.core``, so a
new component cannot blur the layers unnoticed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def contracts() -> list[dict[str, object]]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        data = tomllib.load(f)
    result: list[dict[str, object]] = data["tool"]["importlinter"]["contracts"]
    return result


def upper_gateway_modules() -> set[str]:
    names = set()
    for path in (ROOT / "gateway").iterdir():
        if path.name.startswith("_") and path.name != "__main__.py":
            continue
        if path.suffix == ".py":
            names.add(f"gateway.{path.stem}")
        elif path.is_dir() and (path / "__init__.py").exists() and path.name != "core":
            names.add(f"gateway.{path.name}")
    return names


def test_every_module_above_core_is_forbidden_to_drivers_and_core() -> None:
    forbidding = [c for c in contracts() if c["type"] == "forbidden"]
    assert len(forbidding) == 2
    for contract in forbidding:
        listed = set(contract["forbidden_modules"])  # type: ignore[call-overload]
        missing = upper_gateway_modules() - listed
        assert not missing, f"add {sorted(missing)} to {contract['name']!r} in pyproject.toml"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("gateway", "drivers"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("drivers/sim.py", "from gateway.hub import Hub", "drivers is not allowed to import"),
        ("gateway/hub.py", "import drivers.sim", "Illegal imports of protected package drivers"),
        ("gateway/core/reading.py", "import gateway.supervisor", "gateway.core is not allowed"),
    ],
)
def test_a_wrong_way_import_breaks_a_contract(
    tree: Path, module: str, line: str, broken: str
) -> None:
    with (tree / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout
