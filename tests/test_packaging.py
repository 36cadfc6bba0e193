"""Packaging: the wheel carries every package of the source tree, and ``import clearance`` stays light."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = (
    "typer",
    "rich",
    "click",
    "redis",
    "yaml",
    "genai_prices",
    "langchain",
    "langchain_core",
    "langgraph",
    "agents",
    "openai",
    "llama_index",
    "opentelemetry",
)


def source_packages() -> set[str]:
    """Every folder with an ``__init__.py`` under core/ (clearance) and integrations/ (clearance.integrations)."""
    found: set[str] = set()
    for top, package in (("core", "clearance"), ("integrations", "clearance/integrations")):
        for init in (ROOT / top).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / top).as_posix()
            found.add(package if relative == "." else f"{package}/{relative}")
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("clearance-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_contains_every_source_package(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    in_wheel = {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
    assert source_packages() <= in_wheel, source_packages() - in_wheel
    assert "clearance/py.typed" in names
    for lua in (ROOT / "core" / "stores" / "lua").glob("*.lua"):
        assert f"clearance/stores/lua/{lua.name}" in names


def test_wheel_contains_every_module(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for top, package in (("core", "clearance"), ("integrations", "clearance/integrations")):
        for module in (ROOT / top).rglob("*.py"):
            assert f"{package}/{module.relative_to(ROOT / top).as_posix()}" in names, module


def test_import_is_light() -> None:
    code = "import clearance, sys, json; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True).stdout)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert heavy == [], f"import clearance pulled in {heavy}"


def test_console_script_declared() -> None:
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "clearance"]
    assert script.value == "clearance.cli:main"
