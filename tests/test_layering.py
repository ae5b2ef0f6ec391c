"""Layering: the demo is a leaf. Nothing in fdfast/ (outside fdfast/demo/) or kernels/ imports fdfast.demo.

Every source file is parsed (ast, nothing imported), so a lazy import inside a function counts too. Caught:
``import fdfast.demo[.x]``, ``from fdfast.demo[.x] import y``, ``from fdfast import demo``, relative forms
(``from . import demo`` in fdfast/, ``from ..demo import x``) and ``importlib.import_module("fdfast.demo...")``
/ ``__import__`` / ``find_spec`` with a literal name. The library reaches the demo only through the
"fdfast.plugins" entry point.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = "fdfast.demo"
IMPORT_CALLS = {"import_module", "__import__", "find_spec", "import_string"}


def _module_name(path: Path) -> str:
    """Dotted name of a source file as installed: kernels/ is installed as fdfast.kernels."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["fdfast"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_demo(name: str | None) -> bool:
    return bool(name) and (name == DEMO or name.startswith(DEMO + "."))


def _resolve(module: str | None, level: int, current: str, is_package: bool) -> str:
    """Absolute module of ``from <level dots><module> import ...`` written in module ``current``."""
    if level == 0:
        return module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def demo_imports(source: str, current: str, is_package: bool = False) -> list[str]:
    """Every way ``source`` (the text of module ``current``) imports fdfast.demo: "line: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if _is_demo(a.name)]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module, node.level, current, is_package)
            if _is_demo(target):
                found.append(f"{node.lineno}: from {target} import ...")
            else:
                found += [f"{node.lineno}: from {target} import {a.name}" for a in node.names
                          if _is_demo(f"{target}.{a.name}")]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if name in IMPORT_CALLS and isinstance(arg, ast.Constant) and isinstance(arg.value, str) \
                    and _is_demo(arg.value):
                found.append(f"{node.lineno}: {name}({arg.value!r})")
    return found


def _library_files() -> list[Path]:
    files = sorted((ROOT / "fdfast").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    return [f for f in files if (ROOT / "fdfast" / "demo") not in f.parents]


def test_nothing_outside_the_demo_imports_it():
    files = _library_files()
    assert len(files) >= 30 and ROOT / "fdfast" / "data" / "__init__.py" in files  # the walk sees the package
    assert not any("demo" in f.relative_to(ROOT).parts for f in files)
    bad = {}
    for f in files:
        hits = demo_imports(f.read_text(), _module_name(f), f.name == "__init__.py")
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    assert bad == {}, f"library modules import the demo (register through fdfast.plugins instead): {bad}"


@pytest.mark.parametrize("source,current,is_package,expected", [
    ("import fdfast.demo", "fdfast.train", False, 1),
    ("import fdfast.demo.photos as p", "fdfast.train", False, 1),
    ("def f():\n    from fdfast.demo import demo_image_dir", "fdfast.data", True, 1),
    ("from fdfast.demo.register import register", "fdfast.cli", False, 1),
    ("from fdfast import demo, io", "fdfast.cli", False, 1),
    ("from . import demo", "fdfast.cli", False, 1),
    ("from . import demo", "fdfast", True, 1),
    ("from .. import demo", "fdfast.models.teachers", False, 1),
    ("from ..demo.photos import demo_image_dir", "fdfast.data.files", False, 1),
    ("import importlib\nm = importlib.import_module('fdfast.demo')", "fdfast.models.teachers", False, 1),
    ("from importlib import import_module\nimport_module('fdfast.demo.dinov2_onnx')", "fdfast.x", False, 1),
    ("__import__('fdfast.demo')", "fdfast.x", False, 1),
    # not demo imports: the library's own modules, look-alike names, plain strings
    ("from fdfast import io, plugins\nimport fdfast.demography", "fdfast.cli", False, 0),
    ("from . import data", "fdfast", True, 0),
    ("from .demo import x", "fdfast.models", True, 0),  # fdfast.models.demo, not fdfast.demo
    ("release = 'fdfast.demo.dinov2_s14_weights()'", "fdfast.models.teachers", False, 0),
])
def test_the_checker_sees_every_import_form(source, current, is_package, expected):
    assert len(demo_imports(source, current, is_package)) == expected


def test_module_names_follow_the_install_layout():
    assert _module_name(ROOT / "kernels" / "fd_loss.py") == "fdfast.kernels.fd_loss"
    assert _module_name(ROOT / "fdfast" / "data" / "__init__.py") == "fdfast.data"
    assert _module_name(ROOT / "fdfast" / "io.py") == "fdfast.io"


def test_the_demo_is_reached_through_its_entry_point():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["fdfast.plugins"] == {"demo": "fdfast.demo.register:register"}
    from importlib import metadata

    installed = {ep.name: ep.value for ep in metadata.entry_points(group="fdfast.plugins")}
    assert installed.get("demo") == "fdfast.demo.register:register", (
        "the installed metadata lacks the demo entry point: run `pip install -e . --no-deps`")
