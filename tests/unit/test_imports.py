"""The package's import graph: no cycle, pyfuse3 only in quotafs.daemon, and the client
side (command line, API, plugin, comparison) starts without pyfuse3 or trio."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import quotafs

PACKAGE = Path(quotafs.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _lazy_reexports(tree: ast.Module) -> set[int]:
    """The nodes of a package's module-level __getattr__ (PEP 562): `quotafs.mounted`
    imports quotafs.client.api when first asked for. That is the package's public face,
    not something its own modules depend on, so it is no edge of the graph."""
    return {id(inner) for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
            for inner in ast.walk(node)}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The nodes of `if TYPE_CHECKING:` blocks: imports for type checkers, never run."""
    return {id(inner) for node in ast.walk(tree)
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
            for inner in ast.walk(node)}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every import in the file, both the
    module-level ones and those inside functions; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    package = _module_name(path) if is_package else _module_name(path).rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    lazy = (_lazy_reexports(tree) if is_package else set()) | _type_checking_only(tree)
    out: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from quotafs.client import api` imports the module quotafs.client.api.
            out += [(f"{base}.{alias.name}", id(node) in top_level) for alias in node.names]
            out.append((base, id(node) in top_level))
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {target for target, _ in _imports(path)
                       if target in modules and target != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = _graph()
    assert "quotafs.client.control" in graph["quotafs.client.api"]
    # cmd_mount --fg imports the daemon inside the function: still an edge.
    assert "quotafs.daemon.serve" in graph["quotafs.cli.mount"]


def test_no_import_cycle() -> None:
    """Module-level and function-level imports alike: a function-level import does not
    make a cycle harmless, it only hides it."""
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_a_cycle_is_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_the_daemon_imports_pyfuse3() -> None:
    importers = sorted(_module_name(p) for p in PACKAGE.rglob("*.py")
                       if any(target.split(".")[0] == "pyfuse3" for target, _ in _imports(p)))
    assert importers and all(name.startswith("quotafs.daemon.") for name in importers), \
        importers


def test_nothing_imports_the_command_line() -> None:
    graph = _graph()
    users = sorted(name for name, targets in graph.items()
                   if not name.startswith("quotafs.cli") and name != "quotafs.__main__"
                   and any(t == "quotafs.cli" or t.startswith("quotafs.cli.")
                           for t in targets))
    assert users == []


def test_the_client_side_starts_without_pyfuse3_or_trio() -> None:
    """The command line (parsing every subcommand, as `quotafs status --help` does), the
    Python API, the pytest plugin and the comparison import neither pyfuse3 nor trio: they
    talk to the daemon through quotafs.protocol's names (trio is imported by the API's
    trio flavour only when it is used)."""
    code = (
        "import sys\n"
        "import quotafs.cli.main, quotafs.client.api, quotafs.testing.plugin\n"
        "import quotafs.compare.runner, quotafs.client.control\n"
        "from quotafs.cli.main import build_parser\n"
        "parser = build_parser()\n"
        "for argv in (['status', '/x'], ['fault', 'list', '/x'], ['events', '/x'],\n"
        "             ['set', '/x', '--limit', '1M'], ['umount', '/x']):\n"
        "    parser.parse_args(argv)\n"
        "try:\n"
        "    parser.parse_args(['status', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.splitlines()[-1:] == [""], result.stdout


# The layers of docs/architecture.md, from the bottom up: a module imports from its own
# part or from a lower layer. Within a layer the parts are independent, except the base
# helpers (which use each other: no cycle, as test_no_import_cycle checks) and the
# command line, which drives the comparison.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("quotafs", "quotafs.units", "quotafs.errors", "quotafs.interrupts",
     "quotafs.mountinfo", "quotafs.unmounting", "quotafs.users"),
    ("quotafs.model", "quotafs.reference"),
    ("quotafs.options", "quotafs.protocol", "quotafs.statedir", "quotafs.controlsocket"),
    ("quotafs.daemon", "quotafs.client"),
    ("quotafs.compare", "quotafs.sweeps", "quotafs.cli", "quotafs.testing"),
    ("quotafs.__main__",),  # `python -m quotafs`: the command line
)
# sweep runs programs as compare does (compare.program); the plugin's sweep items use it.
_ALSO_ALLOWED = {("quotafs.cli", "quotafs.compare"), ("quotafs.cli", "quotafs.sweeps"),
                 ("quotafs.sweeps", "quotafs.compare"), ("quotafs.testing", "quotafs.sweeps")}


def _part(module: str) -> tuple[int, str]:
    """(layer, part) of a module: its subpackage, or itself for a top-level module."""
    for rank, parts in enumerate(LAYERS):
        for part in parts:
            if module == part or (part != "quotafs" and module.startswith(part + ".")):
                return rank, part
    raise AssertionError(f"{module} is in no layer of docs/architecture.md")


def test_imports_go_down_the_layers() -> None:
    wrong = []
    for module, targets in _graph().items():
        rank, part = _part(module)
        for target in targets:
            target_rank, target_part = _part(target)
            if part == target_part or target_rank < rank or rank == target_rank == 0 or (
                    (part, target_part) in _ALSO_ALLOWED):
                continue
            wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_command_line_loads_the_heavy_parts_only_for_their_commands() -> None:
    """`quotafs status` and the other quick commands start without the Python API, the
    references, doctor's trials or the sweep engine (together about 50 ms of start-up):
    cli/doctor.py and cli/sweep.py import them inside their commands."""
    code = (
        "import sys\n"
        "from quotafs.cli.main import build_parser\n"
        "build_parser().parse_args(['status', '/x'])\n"
        "heavy = ('quotafs.client.api', 'quotafs.client.machine', 'quotafs.sweeps.runner',\n"
        "         'quotafs.reference.loopext4', 'quotafs.reference.tmpfs')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.splitlines()[-1:] == [""], result.stdout
