"""The pytest plugin stands on quotafs's public API only (as pyfakefs's fixtures stand on
one public class): what it imports from quotafs, and no `_private` attribute of anything
but its own objects."""

from __future__ import annotations

import ast
from pathlib import Path

import quotafs
from quotafs.testing import plugin

# The public faces: the package's __all__, and the top-level modules users import
# (errors and exit codes, sizes, the mount options the marker takes, SIGTERM handled as
# Ctrl-C around a sweep's runs).
PUBLIC_MODULES = {"quotafs.errors", "quotafs.units", "quotafs.options", "quotafs.interrupts"}


def wrong_imports(tree: ast.Module) -> list[str]:
    wrong: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            wrong += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.startswith("quotafs.") and a.name not in PUBLIC_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("quotafs"):
            if node.module == "quotafs":
                wrong += [f"line {node.lineno}: from quotafs import {a.name}"
                          for a in node.names if a.name not in quotafs.__all__]
            elif node.module not in PUBLIC_MODULES:
                wrong.append(f"line {node.lineno}: from {node.module} import ...")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "quotafs" and node.attr not in quotafs.__all__):
            wrong.append(f"line {node.lineno}: quotafs.{node.attr}")
    return wrong


def private_reaches(tree: ast.Module) -> list[str]:
    # self._x is the plugin's own state; anything else with one underscore is someone's
    # private API (mount._process, api._start, loopext4._find_tools, ...).
    return [f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")]


def _plugin_tree() -> ast.Module:
    return ast.parse(Path(plugin.__file__).read_text(), filename=plugin.__file__)


def test_the_plugin_imports_only_public_quotafs_names() -> None:
    assert wrong_imports(_plugin_tree()) == []


def test_the_plugin_reaches_for_no_private_attribute() -> None:
    assert private_reaches(_plugin_tree()) == []


def test_the_checks_catch_what_the_plugin_used_to_do() -> None:
    old = ast.parse("from quotafs.client import api\n"
                    "from quotafs.reference import loopext4\n"
                    "import quotafs\n"
                    "mount, own = api._start(1, None, None, {})\n"
                    "status = mount._process.returncode\n"
                    "loopext4._find_tools()\n"
                    "quotafs.PACKAGE_PARENT\n")
    assert wrong_imports(old) == ["line 1: from quotafs.client import ...",
                                  "line 2: from quotafs.reference import ...",
                                  "line 7: quotafs.PACKAGE_PARENT"]
    assert sorted(private_reaches(old)) == ["line 4: ._start", "line 5: ._process",
                                            "line 6: ._find_tools"]
