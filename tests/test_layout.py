"""The package's shape: no import cycles, one reader of MOECLI_* variables, small files, and a README
that names the tree and the environment variables as they are."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from moecli import env

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moecli"
README = (ROOT / "README.md").read_text()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every moecli module `path` imports, at the top or inside functions: `from pkg import mod`
    counts as importing pkg.mod when that is a module, else pkg."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the import graph as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycles():
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    graph = {name: {m for m in deps if m != "moecli"} for name, deps in graph.items()}  # lazy re-exports only
    assert graph["moecli.cli.main"] >= {"moecli.cli.app", "moecli.cli.commands.generate"}  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_env_reads_moecli_variables():
    reads = re.compile(r"""(environ(\.get)?\s*[\[(]\s*|getenv\s*\(\s*)["']MOECLI_""")
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*") if p.suffix in (".py", ".cc", ".h")
                 and p.name != "env.py" and reads.search(p.read_text())]
    assert offenders == []


def test_every_moecli_variable_is_declared_and_documented():
    used = set()
    for p in PACKAGE.rglob("*"):
        if p.suffix in (".py", ".cc", ".h"):
            used |= set(re.findall(r"""["'](MOECLI_[A-Z0-9_]+)["']""", p.read_text()))
    assert used <= set(env.VARIABLES), used - set(env.VARIABLES)
    table = README[README.index("| variable |"):]
    for name, variable in env.VARIABLES.items():
        assert re.search(rf"^\| `{name}` \|", table, re.M), f"README's environment table lacks {name}"


def test_switches_share_one_convention(monkeypatch):
    for value, expected in (("1", True), ("true", True), ("on", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("MOECLI_NO_COMPILE_CACHE", value)
        assert env.switch("MOECLI_NO_COMPILE_CACHE") is expected
    monkeypatch.setenv("MOECLI_CPU_KERNELS", "0")
    assert env.switch("MOECLI_CPU_KERNELS") is False
    monkeypatch.delenv("MOECLI_CPU_KERNELS")
    assert env.switch("MOECLI_CPU_KERNELS") is True   # default on
    monkeypatch.setenv("MOECLI_DEBUG", "maybe")
    import pytest

    from moecli.errors import UsageError

    with pytest.raises(UsageError, match="MOECLI_DEBUG"):
        env.switch("MOECLI_DEBUG")


def test_no_source_file_is_long():
    # Not XLA's vendored FFI headers (csrc/vendor/, copied unchanged from jaxlib).
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*") if p.suffix in (".py", ".cc", ".h")
            and "vendor" not in p.parts and (n := len(p.read_text().splitlines())) > 420}
    assert long == {}


def test_readme_maps_the_tree():
    """Every subpackage of moecli/ appears in README's "How it works" table."""
    section = README[README.index("## How it works"):]
    for folder in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        assert f"moecli/{folder.name}/" in section, folder.name
